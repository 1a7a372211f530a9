"""Convert an official segment-anything PyTorch checkpoint into an amsam_jax SAM directory.

    python -m weights_conversion sam sam_vit_b_01ec64.pth converted/vit_b
    python -m weights_conversion sam sam_vit_b_01ec64.pth converted/vit_b_256 --image-size 256

The output directory holds `params/` (an Orbax checkpoint of the NNX state) and `config.json`
(the SamConfig, the source file's SHA-256, what was resized or re-initialised). It is written to a
temporary sibling and renamed into place, so a failed conversion leaves no partial directory.
"""

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from amsam_jax.build_sam import GLOBAL_ATTN_INDEXES, SamConfig
from amsam_jax.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    OFFICIAL_CHECKPOINTS,
    PARAMS_DIR,
    abstract_state,
    resize_pos_embed,
    resize_rel_pos,
    save_params,
    torch_default_init,
)
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.io import sha256_file
from weights_conversion.mapping import HEAD_PREFIXES, TASK_PREFIX, Transform, target_of

EMBED_DIM_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")


class ConversionError(AmsamError):
    """A checkpoint that cannot be converted; the message is one line naming the problem."""


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.pth` (plain state dict or one nested under a common key) into float32 numpy.

    Raises:
        ConversionError: missing, truncated, corrupt or non-checkpoint file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path}: does not contain a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(
            f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}"
        )
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def infer_config(
    sd: dict[str, np.ndarray],
    model_type: str = "auto",
    image_size: int | None = None,
    num_mask_tokens: int | None = None,
) -> tuple[SamConfig, dict]:
    """Derives the SamConfig of a state dict from its shapes.

    Args:
        sd: torch state dict as numpy.
        model_type: "auto" or the expected type (a mismatch is an error).
        image_size: target input size (default: the checkpoint's).
        num_mask_tokens: target number of mask tokens (default: the checkpoint's).

    Returns:
        the target config and a dict describing the source checkpoint.
    """
    need = [
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.pos_embed",
        "prompt_encoder.no_mask_embed.weight",
        "mask_decoder.mask_tokens.weight",
        "mask_decoder.transformer.layers.0.mlp.lin1.weight",
        "mask_decoder.iou_prediction_head.layers.0.weight",
    ]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConversionError(f"not a SAM checkpoint: missing {', '.join(missing)}")
    embed_dim = sd["image_encoder.patch_embed.proj.weight"].shape[0]
    patch = sd["image_encoder.patch_embed.proj.weight"].shape[-1]
    detected = EMBED_DIM_TO_TYPE.get(embed_dim)
    if detected is None:
        raise ConversionError(f"unknown image encoder width {embed_dim} (768, 1024 or 1280)")
    if model_type not in ("auto", detected):
        raise ConversionError(
            f"checkpoint is {detected} (embed dim {embed_dim}), not the requested {model_type}"
        )
    depth = 1 + max(
        int(m.group(1))
        for k in sd
        if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)) is not None
    )
    head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    src_grid = sd["image_encoder.pos_embed"].shape[1]
    window = (sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[0] + 1) // 2
    global_blocks = tuple(
        i
        for i in range(depth)
        if sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] != 2 * window - 1
    )
    expected = tuple(i for i in GLOBAL_ATTN_INDEXES[detected] if i < depth)
    if global_blocks != expected:
        raise ConversionError(
            f"global-attention blocks {list(global_blocks)} do not match "
            f"{detected}'s {list(expected)}"
        )
    src_tokens = sd["mask_decoder.mask_tokens.weight"].shape[0]
    src_size = src_grid * patch
    image_size = image_size or src_size
    if image_size % patch or image_size > src_size:
        raise ConversionError(
            f"--image-size {image_size}: must be a multiple of {patch} and at most {src_size}"
        )
    num_mask_tokens = num_mask_tokens or src_tokens
    if num_mask_tokens < 1:
        raise ConversionError(f"--num-mask-tokens {num_mask_tokens}: must be at least 1")
    cfg = SamConfig.preset(
        detected,
        image_size=image_size,
        patch_size=patch,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_global_attn_indexes=global_blocks,
        window_size=window,
        prompt_embed_dim=sd["prompt_encoder.no_mask_embed.weight"].shape[1],
        decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        num_multimask_outputs=num_mask_tokens - 1,
    )
    source = {
        "model_type": detected,
        "image_size": src_size,
        "num_mask_tokens": src_tokens,
        "depth": depth,
    }
    return cfg, source


@dataclasses.dataclass(frozen=True)
class Step:
    """How one model parameter is produced from one checkpoint entry."""

    key: str
    transform: Transform
    resize: str | None  # "pos_embed", "rel_pos" (docs/fewshot.md §2.3) or None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shape-level conversion plan: checks everything before any array is touched."""

    steps: dict[str, Step]  # NNX path -> source
    reinitialized: tuple[str, ...]  # NNX paths given a fresh PyTorch-default init
    from_config: tuple[str, ...]  # NNX paths set from the config (non-persistent buffers)
    zero_filled: tuple[str, ...]  # SUM task table absent from a plain SAM checkpoint: zeros
    targets: dict[str, tuple[int, ...]]  # every NNX path -> shape


def _transformed_shape(shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
    if transform is Transform.LINEAR:
        return tuple(reversed(shape))
    if transform is Transform.CONV:
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(shape)


def plan_conversion(
    shapes: dict[str, tuple[int, ...]], cfg: SamConfig, reinit_heads: bool | None = None
) -> Plan:
    """Maps checkpoint keys (by shape only) onto the NNX state of `build_sam(cfg)`.

    Strict: every source key must map, every target must be filled and every shape must fit
    (after the docs/fewshot.md §2.3 resizes of `pos_embed` and global rel-pos tables). All problems
    are collected and raised together.

    Args:
        shapes: torch key -> shape.
        cfg: target architecture.
        reinit_heads: drop the checkpoint's mask tokens, hypernetwork MLPs and IoU head and give
            them a PyTorch-default init (the BLO-SAM reference does this at 256 px). Default: only
            when the number of mask tokens differs from the checkpoint's.

    Raises:
        ConversionError: listing every unmapped key, unfilled target and shape mismatch.
    """
    targets = {
        ".".join(map(str, path)): tuple(v.shape) for path, v in abstract_state(cfg).flat_state()
    }
    if reinit_heads is None:
        tokens = shapes.get("mask_decoder.mask_tokens.weight", (cfg.num_multimask_outputs + 1,))
        reinit_heads = tokens[0] != cfg.num_multimask_outputs + 1
    grid = cfg.grid_size
    steps: dict[str, Step] = {}
    errors: list[str] = []
    for key, shape in shapes.items():
        rule = target_of(key)
        if rule is None:
            errors.append(f"unmapped source key {key} {tuple(shape)}")
            continue
        path, transform = rule
        if reinit_heads and key.startswith(HEAD_PREFIXES):
            continue
        out = _transformed_shape(tuple(shape), transform)
        resize = None
        if path == "image_encoder.pos_embed" and len(out) == 4 and out[1:3] != (grid, grid):
            resize, out = "pos_embed", (out[0], grid, grid, out[3])
        m = re.fullmatch(r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]", path)
        if m and int(m.group(1)) in cfg.encoder_global_attn_indexes and out[0] != 2 * grid - 1:
            resize, out = "rel_pos", (2 * grid - 1, *out[1:])
        if path not in targets:
            errors.append(f"{key} maps to {path}, which the model does not have")
        elif out != targets[path]:
            errors.append(
                f"shape mismatch for {key}: checkpoint {tuple(shape)}, model {targets[path]}"
            )
        else:
            steps[path] = Step(key, transform, resize)
    reinitialized, from_config, zero_filled = [], [], []
    has_task_table = any(p.startswith(TASK_PREFIX) for p in steps)
    for path, shape in targets.items():
        if path in steps:
            continue
        if path in ("pixel_mean", "pixel_std"):  # non-persistent torch buffers
            from_config.append(path)
        elif path.startswith(TASK_PREFIX) and not has_task_table:  # docs/sum.md §4: zero-init
            zero_filled.append(path)
        elif reinit_heads and path.startswith(HEAD_PREFIXES):
            reinitialized.append(path)
        else:
            errors.append(f"model parameter {path} {shape} has no source key")
    if errors:
        raise ConversionError(f"{len(errors)} problem(s): " + "; ".join(errors))
    return Plan(steps, tuple(reinitialized), tuple(from_config), tuple(zero_filled), targets)


def convert_state_dict(
    sd: dict[str, np.ndarray],
    cfg: SamConfig,
    reinit_heads: bool | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Converts a torch SAM state dict (float32 numpy) for `build_sam(cfg)`; see `plan_conversion`.

    Args:
        sd: torch state dict as float32 numpy.
        cfg: target architecture.
        reinit_heads: see `plan_conversion`.
        seed: seed of the head re-initialisation.

    Returns:
        (nested pure dict for `nnx.replace_by_pure_dict`, report of resized/re-initialised keys).
    """
    plan = plan_conversion({k: v.shape for k, v in sd.items()}, cfg, reinit_heads)
    filled: dict[str, np.ndarray] = {}
    for path, step in plan.steps.items():
        x = step.transform.apply(sd[step.key])
        if step.resize == "pos_embed":
            x = resize_pos_embed(x, cfg.grid_size)
        elif step.resize == "rel_pos":
            x = resize_rel_pos(x, 2 * cfg.grid_size - 1)
        filled[path] = x.astype(np.float32)
    for path in plan.from_config:
        filled[path] = np.asarray(getattr(cfg, path), np.float32)
    for path in plan.zero_filled:
        filled[path] = np.zeros(plan.targets[path], np.float32)
    rng = np.random.default_rng(seed)
    for path in plan.reinitialized:
        layer = path.rsplit(".", 1)[0]
        fan_in = None if path.endswith(".weight") else plan.targets[layer + ".kernel"][0]
        filled[path] = torch_default_init(plan.targets[path], fan_in, rng)
    report = {
        "resized": sorted(s.key for s in plan.steps.values() if s.resize),
        "reinitialized": list(plan.reinitialized),
        "reinit_seed": seed,
        "task_prompt": "checkpoint" if not plan.zero_filled and cfg.num_tasks else "zeros",
    }
    nested: dict = {}
    for path, x in filled.items():
        node = nested
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return nested, report


def convert_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_type: str = "auto",
    image_size: int | None = None,
    num_mask_tokens: int | None = None,
    reinit_heads: bool | None = None,
    overwrite: bool = False,
) -> SamConfig:
    """Converts `ckpt` into the directory `out_dir` (atomically: all or nothing).

    Returns:
        the config of the converted model.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    sd = load_torch_state_dict(ckpt)
    try:
        cfg, source = infer_config(sd, model_type, image_size, num_mask_tokens)
        nested, report = convert_state_dict(sd, cfg, reinit_heads)
    except ConversionError as e:
        raise ConversionError(f"{ckpt}: {e}") from None
    digest = sha256_file(ckpt)
    official = [name for name, (_, sha, _) in OFFICIAL_CHECKPOINTS.items() if sha == digest]
    source.update(file=Path(ckpt).name, sha256=digest, official=official[0] if official else None)
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "source": source, **report}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_params(tmp / PARAMS_DIR, nested)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion sam",
        description="Convert an official segment-anything .pth into an amsam_jax SAM directory.",
    )
    parser.add_argument("ckpt", help="official checkpoint, e.g. sam_vit_b_01ec64.pth")
    parser.add_argument("out_dir", help="output directory (params/ + config.json)")
    parser.add_argument("--model-type", default="auto", choices=["auto", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--image-size", type=int, default=None, help="1024 (default) or 256")
    parser.add_argument("--num-mask-tokens", type=int, default=None, help="default: checkpoint's")
    parser.add_argument(
        "--reinit-heads",
        action="store_true",
        default=None,
        help="re-initialise mask tokens, hypernetworks and IoU head (BLO-SAM reference)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = parser.parse_args(argv)
    try:
        cfg = convert_checkpoint(
            args.ckpt,
            args.out_dir,
            args.model_type,
            args.image_size,
            args.num_mask_tokens,
            args.reinit_heads,
            args.overwrite,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.ckpt} -> {args.out_dir} ({cfg.model_type}, {cfg.image_size} px)")
    return 0
