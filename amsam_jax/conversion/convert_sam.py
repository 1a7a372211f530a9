"""Convert a SAM-family PyTorch checkpoint into an amsam_jax SAM directory, without torch.

The architecture is detected from the shapes: SAM ViT-B/L/H, and the TinyViT SAMs (MobileSAM,
LiteMedSAM); SUM checkpoints bring their task table. The command line is `convert_sam_cli`.

The output directory holds `params/` (an Orbax checkpoint of the NNX state) and `config.json`
(the SamConfig, the source file's SHA-256, what was resized or re-initialised). It is written to a
temporary sibling and renamed into place, so a failed conversion leaves no partial directory.
"""

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
from flax import nnx

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
from amsam_jax.conversion.mapping import HEAD_PREFIXES, TASK_PREFIX, Transform, target_of
from amsam_jax.conversion.torch_pickle import (
    CheckpointReadError,
    UnpicklingRefused,
    load_state_dict,
)
from amsam_jax.utils.errors import AmsamError, first_line
from amsam_jax.utils.io import (
    WriteError,
    atomic_directory,
    check_output_folder,
    sha256_file,
    write_json,
)

EMBED_DIM_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
TINY_VIT_KEY = "image_encoder.layers.0.blocks.0.conv1.c.weight"
TINY_TYPES = ("mobile_sam", "litemedsam")
DECODER_KEYS = (
    "prompt_encoder.no_mask_embed.weight",
    "mask_decoder.mask_tokens.weight",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    "mask_decoder.iou_prediction_head.layers.0.weight",
)
# TinyViT's patch merging keeps the resolution when it widens to one of these (a quirk of
# MobileSAM's tiny_vit_sam.py, kept by LiteMedSAM): the merge stride is a function of the width.
STRIDE_1_WIDTHS = (320, 448, 576)
# Both TinyViT SAMs reshape the last stage to a 64 x 64 grid (hard-coded in their forward).
TINY_VIT_GRID = 64


class ConversionError(AmsamError):
    """A checkpoint that cannot be converted; the message is one line naming the problem."""


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.pth` (plain state dict or one nested under a common key) into float32 NumPy.

    No torch is needed and nothing in the file is executed (`amsam_jax.conversion.torch_pickle`:
    a pickle that names anything but tensors and dicts is refused).

    Raises:
        ConversionError: missing, truncated, corrupt, code-carrying or non-checkpoint file.
    """
    path = Path(path)
    try:
        sd = load_state_dict(path)
    except UnpicklingRefused as e:
        raise ConversionError(str(e)) from None
    except CheckpointReadError as e:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e.problem})") from None
    return {k: np.asarray(v, dtype=np.float32) for k, v in sd.items()}


def check_options(image_size: int | None, num_mask_tokens: int | None) -> None:
    """The checks of the size options that need no checkpoint (bounds from it come later).

    Raises:
        ConversionError: an image size or number of mask tokens below 1.
    """
    if image_size is not None and image_size < 1:
        raise ConversionError(
            "--image-size", f"{image_size}: must be a positive multiple of the patch size"
        )
    if num_mask_tokens is not None and num_mask_tokens < 1:
        raise ConversionError("--num-mask-tokens", f"{num_mask_tokens}: must be at least 1")


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
    if TINY_VIT_KEY in sd:
        return _infer_tiny_vit(sd, model_type, image_size, num_mask_tokens)
    need = [
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.pos_embed",
        *DECODER_KEYS,
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
    check_options(image_size, num_mask_tokens)
    src_tokens = sd["mask_decoder.mask_tokens.weight"].shape[0]
    src_size = src_grid * patch
    image_size = src_size if image_size is None else image_size
    if image_size % patch or image_size > src_size:
        raise ConversionError(
            f"--image-size {image_size}: must be a multiple of {patch} and at most {src_size}"
        )
    num_mask_tokens = src_tokens if num_mask_tokens is None else num_mask_tokens
    cfg = SamConfig.preset(
        detected,
        image_size=image_size,
        patch_size=patch,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_global_attn_indexes=global_blocks,
        window_size=window,
        **_decoder_fields(sd, num_mask_tokens),
    )
    source = {
        "model_type": detected,
        "image_size": src_size,
        "num_mask_tokens": src_tokens,
        "depth": depth,
    }
    return cfg, source


def _decoder_fields(sd: dict, num_mask_tokens: int) -> dict:
    """The prompt-encoder and mask-decoder sizes read from the weights, shared by all encoders."""
    return {
        "prompt_embed_dim": sd["prompt_encoder.no_mask_embed.weight"].shape[1],
        "decoder_mlp_dim": sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        "iou_head_hidden_dim": sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        "num_multimask_outputs": num_mask_tokens - 1,
    }


def _count(sd: dict, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k)) is not None})


def _infer_tiny_vit(
    sd: dict[str, np.ndarray], model_type: str, image_size: int | None, num_mask_tokens: int | None
) -> tuple[SamConfig, dict]:
    """The SamConfig of a TinyViT checkpoint (MobileSAM, LiteMedSAM) from its shapes."""
    check_options(image_size, num_mask_tokens)
    missing = [k for k in DECODER_KEYS if k not in sd]
    if missing:
        raise ConversionError(f"not a SAM checkpoint: missing {', '.join(missing)}")
    stages = _count(sd, r"image_encoder\.layers\.(\d+)\.")
    if stages != 4:
        raise ConversionError(f"TinyViT image encoder with {stages} stages, expected 4")
    dims, depths, heads, windows = [], [], [], []
    for i in range(4):
        depths.append(_count(sd, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\."))
        if i == 0:
            conv1 = sd[TINY_VIT_KEY]
            dims.append(conv1.shape[1])
            expand = conv1.shape[0] / conv1.shape[1]
            heads.append(1)
            windows.append(7)
            continue
        block = f"image_encoder.layers.{i}.blocks.0"
        dims.append(sd[f"{block}.attn.qkv.weight"].shape[1])
        h, offsets = sd[f"{block}.attn.attention_biases"].shape
        heads.append(h)
        window = round(offsets**0.5)
        if window * window != offsets:
            raise ConversionError(f"{block}.attn.attention_biases: {offsets} offsets, not a square")
        windows.append(window)
    heads[0] = heads[1]  # stage 0 is convolutional: its head count is never used
    patch_kernel = sd["image_encoder.patch_embed.seq.0.c.weight"].shape[-1]
    if patch_kernel not in (1, 3):
        raise ConversionError(f"TinyViT patch embedding kernel {patch_kernel}, expected 3 or 1")
    patch_stride = 4 if patch_kernel == 3 else 1
    detected = "mobile_sam" if patch_stride == 4 else "litemedsam"
    if model_type not in ("auto", detected):
        raise ConversionError(f"checkpoint is {detected}, not the requested {model_type}")
    merge = tuple(1 if dims[i + 1] in STRIDE_1_WIDTHS else 2 for i in range(3))
    native = TINY_VIT_GRID * patch_stride * int(np.prod(merge))
    if image_size not in (None, native):
        raise ConversionError(
            f"--image-size {image_size}: a {detected} checkpoint runs at {native} px only"
        )
    block = "image_encoder.layers.1.blocks.0"
    src_tokens = sd["mask_decoder.mask_tokens.weight"].shape[0]
    num_mask_tokens = src_tokens if num_mask_tokens is None else num_mask_tokens
    cfg = SamConfig.preset(
        detected,
        image_size=native,
        tiny_vit_embed_dims=tuple(dims),
        tiny_vit_depths=tuple(depths),
        tiny_vit_num_heads=tuple(heads),
        tiny_vit_window_sizes=tuple(windows),
        tiny_vit_merge_strides=merge,
        tiny_vit_patch_stride=patch_stride,
        tiny_vit_mbconv_expand_ratio=expand,
        tiny_vit_local_conv_size=sd[f"{block}.local_conv.c.weight"].shape[-1],
        mlp_ratio=sd[f"{block}.mlp.fc1.weight"].shape[0] / dims[1],
        **_decoder_fields(sd, num_mask_tokens),
    )
    source = {
        "model_type": detected,
        "image_size": native,
        "num_mask_tokens": src_tokens,
        "depth": sum(depths),
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
    dropped: tuple[str, ...] = ()  # source keys the model deliberately does not use


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
        ".".join(map(str, path)): tuple(v.shape)
        for path, v in nnx.to_flat_state(abstract_state(cfg))
    }
    if reinit_heads is None:
        tokens = shapes.get("mask_decoder.mask_tokens.weight", (cfg.num_multimask_outputs + 1,))
        reinit_heads = tokens[0] != cfg.num_multimask_outputs + 1
    grid = cfg.grid_size
    steps: dict[str, Step] = {}
    errors: list[str] = []
    dropped: list[str] = []
    mismatched: set[str] = set()
    for key, shape in shapes.items():
        rule = target_of(key)
        if rule is None:
            errors.append(f"unmapped source key {key} {tuple(shape)}")
            continue
        path, transform = rule
        if transform is Transform.DROP:
            dropped.append(key)
            continue
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
            mismatched.add(path)  # reported once, not again as unfilled
        else:
            steps[path] = Step(key, transform, resize)
    reinitialized, from_config, zero_filled = [], [], []
    has_task_table = any(p.startswith(TASK_PREFIX) for p in steps)
    for path, shape in targets.items():
        if path in steps or path in mismatched:
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
        more = f"; ... (+{len(errors) - 8} more)" if len(errors) > 8 else ""
        raise ConversionError(f"{len(errors)} problem(s): " + "; ".join(errors[:8]) + more)
    return Plan(
        steps, tuple(reinitialized), tuple(from_config), tuple(zero_filled), targets, tuple(dropped)
    )


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
        "dropped": len(plan.dropped),
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

    The options and the output location are checked before the checkpoint is read; a failed or
    interrupted write leaves neither `out_dir` (an old one is kept) nor a temporary folder, nor
    the parent folders it created.

    Returns:
        the config of the converted model.

    Raises:
        ConversionError: bad options, an unreadable or non-SAM checkpoint (see
            `load_torch_state_dict`, `infer_config`, `plan_conversion`), an existing `out_dir`
            without `overwrite`.
        WriteError: an output that is a file or under one, or a failed write (disk full, ...).
    """
    out_dir = Path(out_dir).absolute()
    check_options(image_size, num_mask_tokens)
    check_output_folder(out_dir)  # a file in the way, a folder that is not writable
    if out_dir.exists() and not overwrite:
        raise ConversionError(out_dir, "already exists (pass --overwrite to replace it)")
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

    try:
        # A temporary sibling renamed into place (stale ones of killed runs are removed first);
        # on a failure or Ctrl-C neither it nor the folders created above it are left.
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            save_params(tmp / PARAMS_DIR, nested)
            write_json(tmp / CONFIG_FILE, meta)
    except WriteError:
        raise
    except OSError as e:  # from the params writer: disk full, ...
        raise WriteError(out_dir, f"cannot write ({e.strerror or first_line(e)})", e) from None
    return cfg
