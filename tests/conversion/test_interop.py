"""BLO-SAM decoder-LoRA checkpoints: layout mapping against the official decoder, round trip.

Slow tier: torch and segment_anything build the reference side.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from sam_reference import official_pair
from smoke_workdir import smoke_workdir

from amsam_jax.build_sam import SamConfig
from amsam_jax.fewshot.blo import StepConfig, TrainingModel, forward, split_trainable
from amsam_jax.fewshot.config import FewShotConfig
from amsam_jax.fewshot.lora import apply_lora, mark_trainable
from amsam_jax.fewshot.trainer import TRAINABLE, build_setup
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.training.state import host_leaves, restore_state
from weights_conversion import blo_sam_lora
from weights_conversion.blo_sam_lora import InteropError

pytestmark = pytest.mark.slow


class LoRAProj(torch.nn.Module):
    """BLO-SAM's `_LoRA_qkv_proj`: proj(x) + w_b(w_a(x)) (same attribute names)."""

    def __init__(self, proj: torch.nn.Linear, rank: int):
        super().__init__()
        self.proj = proj
        self.w_a = torch.nn.Linear(proj.in_features, rank, bias=False)
        self.w_b = torch.nn.Linear(rank, proj.out_features, bias=False)

    def forward(self, x):
        return self.proj(x) + self.w_b(self.w_a(x))


def blo_sam_checkpoint(sam, rank: int, seed: int) -> dict[str, np.ndarray]:
    """Wraps `sam`'s decoder as BLO-SAM's `LoRA_Sam` does (in place), gives every A and B random
    values, and returns what its `save_lora_parameters` would save."""
    g = torch.Generator().manual_seed(seed)
    lists = {"sa": [], "cti": [], "cit": []}
    attns = {
        "sa": "self_attn",
        "cti": "cross_attn_token_to_image",
        "cit": "cross_attn_image_to_token",
    }

    def wrap(attn):
        out = []
        for name in ("q_proj", "v_proj"):
            lora = LoRAProj(getattr(attn, name), rank)
            with torch.no_grad():
                lora.w_a.weight.copy_(0.1 * torch.randn(lora.w_a.weight.shape, generator=g))
                lora.w_b.weight.copy_(0.1 * torch.randn(lora.w_b.weight.shape, generator=g))
            setattr(attn, name, lora)
            out.append(lora)
        return out

    for blk in sam.mask_decoder.transformer.layers:
        for prefix, attr in attns.items():
            lists[prefix] += wrap(getattr(blk, attr))
    q, v = wrap(sam.mask_decoder.transformer.final_attn_token_to_image)
    sd = {}
    for prefix, loras in lists.items():
        sd |= {f"{prefix}_a_{i:03d}": m.w_a.weight for i, m in enumerate(loras)}
        sd |= {f"{prefix}_b_{i:03d}": m.w_b.weight for i, m in enumerate(loras)}
    sd |= {"fati_qa": q.w_a.weight, "fati_qb": q.w_b.weight}
    sd |= {"fati_va": v.w_a.weight, "fati_vb": v.w_b.weight}
    sd["no_mask_embed"] = sam.prompt_encoder.no_mask_embed.weight
    sd |= {k: t for k, t in sam.state_dict().items() if k.startswith("mask_decoder.")}
    return {k: t.detach().numpy().astype(np.float32).copy() for k, t in sd.items()}


@pytest.fixture(scope="module")
def pair():
    cfg = SamConfig.preset("tiny", image_size=256, num_multimask_outputs=1)
    ref, ours = official_pair(cfg, seed=3)
    sd = blo_sam_checkpoint(ref, rank=4, seed=4)
    apply_lora(ours, rank=4)
    mark_trainable(ours)
    return cfg, ref, split_trainable(TrainingModel(PromptDecoder(ours), None)), sd


def test_import_of_a_blo_sam_checkpoint_reproduces_the_official_lora_decoder(pair):
    cfg, ref, trainable, sd = pair
    lower_values, prompt_values, notes = blo_sam_lora.import_tensors(
        sd, trainable.lower, trainable.prompt, trainable.frozen
    )
    assert notes and "iou_prediction_head" in notes[0]
    lower = jax.tree.map(lambda x: x, trainable.lower)
    prompt = jax.tree.map(lambda x: x, trainable.prompt)
    nnx.replace_by_pure_dict(lower, lower_values)
    nnx.replace_by_pure_dict(prompt, prompt_values)
    model = nnx.merge(trainable.graphdef, lower, prompt, trainable.frozen)

    g = cfg.grid_size
    emb = np.random.default_rng(0).standard_normal((1, g, g, cfg.prompt_embed_dim), np.float32)
    ours = forward(model.decoder, emb, None, StepConfig(calibration=False))
    with torch.no_grad():
        dense = ref.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, g, g)
        sparse = torch.zeros((1, 0, cfg.prompt_embed_dim))
        want, _ = ref.mask_decoder.predict_masks(
            torch.from_numpy(emb).permute(0, 3, 1, 2),
            ref.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
        )
    assert float(np.abs(np.asarray(lower_values["decoder"]["mask_decoder"]["transformer"]
                 ["final_attn_token_to_image"]["v_proj"]["lora_b"])).max()) > 0  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), atol=1e-5, rtol=1e-5)


def test_import_maps_every_index_coded_tensor_to_its_transposed_lora_matrix(pair):
    _, _, trainable, sd = pair
    lower_values, prompt_values, _ = blo_sam_lora.import_tensors(
        sd, trainable.lower, trainable.prompt, trainable.frozen
    )
    table = blo_sam_lora.lora_table(depth=2)
    assert len(table) == 28 and set(table) <= set(sd)
    for name, (path, torch_copy) in table.items():
        node = lower_values
        for p in path:
            node = node[p]
        np.testing.assert_array_equal(node, sd[name].T)
        np.testing.assert_array_equal(sd[torch_copy], sd[name])
    np.testing.assert_array_equal(
        prompt_values["decoder"]["prompt_encoder"]["no_mask_embed"]["weight"], sd["no_mask_embed"]
    )


def test_import_rejects_unknown_missing_mismatched_and_frozen_differences(pair):
    _, _, t, sd = pair

    def problem(bad: dict, **kw) -> str:
        with pytest.raises(InteropError) as e:
            blo_sam_lora.import_tensors(bad, t.lower, t.prompt, t.frozen, **kw)
        return str(e.value)

    assert "unknown keys w_a_000" in problem({**sd, "w_a_000": sd["sa_a_000"]})
    assert "missing cit_b_003" in problem({k: v for k, v in sd.items() if k != "cit_b_003"})
    assert "shape" in problem({**sd, "fati_qa": sd["fati_qa"][:, :-1]})
    key = "mask_decoder.transformer.layers.1.self_attn.v_proj.w_a.weight"
    assert "index-coded copy" in problem({**sd, key: sd[key] + 1.0})
    frozen = "mask_decoder.transformer.layers.0.mlp.lin1.weight"
    assert "frozen SAM" in problem({**sd, frozen: sd[frozen] + 1e-6})
    blo_sam_lora.import_tensors(
        {**sd, frozen: sd[frozen] + 1e-6}, t.lower, t.prompt, t.frozen, check_frozen=False
    )


def test_export_then_import_of_a_trained_run_is_bit_identical(tmp_path_factory, tmp_path):
    workdir = smoke_workdir(tmp_path_factory)
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    path = tmp_path / "lora.pth"
    blo_sam_lora.export_workdir(copy, path, "best")
    assert blo_sam_lora.main(["import", "--workdir", str(copy), "--input", str(path)]) == 2
    blo_sam_lora.import_workdir(copy, path, "final", overwrite=True)

    cfg = FewShotConfig.from_dict(json.loads((copy / "config.json").read_text()))
    setup = build_setup(cfg, copy, quiet=True)
    original, _ = restore_state(workdir, "best", setup.initial)
    imported, meta = restore_state(copy, "final", setup.initial)
    assert meta["imported_from"] == str(path) and meta["step"] == 0
    for a, b in zip(
        host_leaves(original, TRAINABLE), host_leaves(imported, TRAINABLE), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(x).max() > 0 for x in host_leaves(imported, TRAINABLE))
    again = tmp_path / "again.pth"
    blo_sam_lora.export_workdir(copy, again, "final")
    first, second = torch.load(path), torch.load(again)
    assert list(first) == list(second)
    for k in first:
        assert torch.equal(first[k], second[k]), k
