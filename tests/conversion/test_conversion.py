"""Conversion of official segment-anything checkpoints: completeness, round trip, every error."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sam_reference import build_official, randomize_

from amsam_jax import CheckpointError, SamConfig, load_sam
from amsam_jax.checkpoint import read_sam_config
from amsam_jax.conversion.convert_sam import (
    ConversionError,
    infer_config,
    plan_conversion,
    sha256_file,
)
from amsam_jax.conversion.mapping import HEAD_PREFIXES, Transform, target_of
from weights_conversion.convert_sam_cli import main

pytestmark = pytest.mark.slow

# A small but real ViT-B-shaped checkpoint: 3 blocks (global block 2), 256 px.
SMALL = SamConfig.vit_b(encoder_depth=3, encoder_global_attn_indexes=(2,), image_size=256)


class _Shape:
    """Stands in for a tensor where only `.shape` is read."""

    def __init__(self, shape):
        self.shape = shape


def meta_state_shapes(cfg: SamConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official model's state dict, without allocating it."""
    with torch.device("meta"):
        model = build_official(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
@pytest.mark.parametrize("image_size", [1024, 256])
def test_plan_consumes_every_official_key_and_fills_every_parameter(model_type, image_size):
    shapes = meta_state_shapes(SamConfig.preset(model_type))
    cfg, source = infer_config(
        {k: _Shape(s) for k, s in shapes.items()},
        "auto",
        image_size,
    )
    assert cfg == SamConfig.preset(model_type, image_size=image_size)
    assert source["image_size"] == 1024 and source["model_type"] == model_type
    plan = plan_conversion(shapes, cfg)
    used = {step.key for step in plan.steps.values()}
    assert used == set(shapes)  # every source key consumed
    filled = set(plan.steps) | set(plan.from_config) | set(plan.zero_filled)
    assert filled == set(plan.targets)  # every target filled
    assert plan.reinitialized == ()
    # Only the SUM task table (absent from SAM checkpoints) is zero-filled.
    assert plan.zero_filled == tuple(
        f"prompt_encoder.task_prompt_embedding.{i}.weight" for i in range(4)
    )
    resized = sorted(s.key for s in plan.steps.values() if s.resize)
    if image_size == 1024:
        assert resized == []
    else:  # pos_embed and exactly the global blocks' two tables (docs/fewshot.md §1.1 lists)
        blocks = cfg.encoder_global_attn_indexes
        expected = ["image_encoder.pos_embed"] + [
            f"image_encoder.blocks.{i}.attn.rel_pos_{a}" for i in blocks for a in "hw"
        ]
        assert resized == sorted(expected)


def test_reinit_heads_drops_exactly_the_three_head_families():
    shapes = meta_state_shapes(SamConfig.vit_b())
    cfg = SamConfig.vit_b(image_size=256, num_multimask_outputs=1)  # n = 2 (BLO-SAM binary)
    plan = plan_conversion(shapes, cfg)
    dropped = set(shapes) - {s.key for s in plan.steps.values()}
    assert dropped and all(k.startswith(HEAD_PREFIXES) for k in dropped)
    assert {k for k in shapes if k.startswith(HEAD_PREFIXES)} == dropped
    assert all(p.startswith(HEAD_PREFIXES) for p in plan.reinitialized)
    # iou_token and no_mask_embed stay loaded.
    used = {s.key for s in plan.steps.values()}
    assert {"mask_decoder.iou_token.weight", "prompt_encoder.no_mask_embed.weight"} <= used


def test_mapping_rules_cover_transforms_of_each_layer_kind():
    assert target_of("image_encoder.blocks.3.attn.qkv.weight") == (
        "image_encoder.blocks.3.attn.qkv.kernel",
        Transform.LINEAR,
    )
    assert target_of("prompt_encoder.mask_downscaling.6.weight")[0].endswith("4.kernel")
    assert target_of("mask_decoder.output_upscaling.3.weight") == (
        "mask_decoder.output_upscaling.2.weight",
        Transform.NONE,
    )
    assert target_of("image_encoder.blocks.0.attn.qkv.lora_A") is None
    w = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert Transform.CONV.apply(w).shape == (4, 5, 3, 2)
    assert Transform.CONV.apply(w)[1, 2, 0, 1] == w[1, 0, 1, 2]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    """A random official-code checkpoint saved as {"model": state_dict}, as some trainers do."""
    torch.manual_seed(0)
    model = randomize_(build_official(SMALL), seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "sam_small.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    return path, sd


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weights_conversion", "sam", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_converts_and_load_sam_restores_every_value(small_ckpt, tmp_path):
    path, sd = small_ckpt
    out = tmp_path / "converted"
    proc = run_cli(str(path), str(out))
    assert proc.returncode == 0, proc.stderr
    cfg, meta = read_sam_config(out)
    assert cfg == SMALL
    assert meta["source"]["sha256"] == sha256_file(path)
    assert meta["source"]["model_type"] == "vit_b" and meta["resized"] == []
    model = load_sam(out)
    from flax import nnx

    flat = {
        ".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))
    }
    for key, tensor in sd.items():
        nnx_path, transform = target_of(key)
        np.testing.assert_array_equal(flat[nnx_path], transform.apply(tensor.numpy()), err_msg=key)


def _assert_clean_failure(proc, out: Path, *needles: str) -> None:
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_cli_missing_truncated_corrupt_and_non_checkpoint_files(small_ckpt, tmp_path):
    path, _ = small_ckpt
    out = tmp_path / "out"
    _assert_clean_failure(run_cli(str(tmp_path / "nope.pth"), str(out)), out, "no such file")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_clean_failure(run_cli(str(truncated), str(out)), out, "truncated.pth", "not a readable")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_clean_failure(run_cli(str(garbage), str(out)), out, "garbage.pth", "not a readable")
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    _assert_clean_failure(run_cli(str(not_sd), str(out)), out, "list.pth", "state dict")


def test_cli_wrong_model_type_is_an_error(small_ckpt, tmp_path):
    path, _ = small_ckpt
    out = tmp_path / "out"
    proc = run_cli(str(path), str(out), "--model-type", "vit_l")
    _assert_clean_failure(proc, out, "vit_b", "vit_l")


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_cli_strictness_names_the_key(small_ckpt, tmp_path, damage):
    _, sd = small_ckpt
    sd = dict(sd)
    if damage == "extra":
        sd["image_encoder.blocks.0.attn.qkv.lora_A"] = torch.zeros(4, 768)
        needle = "unmapped source key image_encoder.blocks.0.attn.qkv.lora_A"
    elif damage == "missing":
        del sd["mask_decoder.transformer.layers.1.norm3.bias"]
        needle = "mask_decoder.transformer.layers.1.norm3.bias (256,) has no source key"
    else:
        sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 255)
        needle = (
            "shape mismatch for mask_decoder.iou_token.weight: checkpoint (1, 255), model (1, 256)"
        )
    bad = tmp_path / f"{damage}.pth"
    torch.save(sd, bad)
    out = tmp_path / "out"
    _assert_clean_failure(run_cli(str(bad), str(out)), out, needle)


def test_existing_output_is_kept_unless_overwrite(small_ckpt, tmp_path):
    path, _ = small_ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli(str(path), str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert main([str(path), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and load_sam(out) is not None


def test_load_sam_errors_name_the_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a converted SAM directory"):
        load_sam(tmp_path)
    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_sam(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="format"):
        load_sam(tmp_path)


def test_infer_config_rejects_unknown_width():
    shapes = {k: _Shape(s) for k, s in meta_state_shapes(SamConfig.tiny()).items()}
    with pytest.raises(ConversionError, match="unknown image encoder width 64"):
        infer_config(shapes)
