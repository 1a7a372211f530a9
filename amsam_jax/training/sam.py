"""Which SAM a run fine-tunes: a converted directory, the official download, or random weights.

`resolve_sam` is shared by every trainer and by evaluation: it finds the weights named by a run's
`sam` section (a directory, or a pretrained name such as "litemedsam": `amsam_jax.pretrained`),
adapts them to the run's input size and mask tokens (docs/fewshot.md §2.3), and returns the key
that identifies its encoder in the embedding cache.
"""

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import adapt_sam, load_sam, read_sam_config
from amsam_jax.pretrained import PretrainedError, is_name
from amsam_jax.pretrained import resolve as resolve_pretrained
from amsam_jax.training.config import ConfigError
from amsam_jax.training.embedder import sam_weights_key
from amsam_jax.training.run import TrainError, log

DEFAULT_SAM_DIR = "checkpoints/sam_vit_b"
HEAD_INITS = ("tokens", "single_mask")


# The architecture of each named checkpoint, for a random fallback of the same shape.
NAME_TO_TYPE = {"litemedsam": "litemedsam", "sam_vit_b": "vit_b", "sam_vit_l": "vit_l",
                "sam_vit_h": "vit_h"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LocatedSam:
    """Which weights `resolve_sam` will load, known before any is read: the adapted model's
    config, and the converted directory (None: random weights)."""

    target: SamConfig
    sam_dir: str | None
    model_type: str
    missing: str  # why there are no weights (random ones only)


def resolve_sam(cfg) -> tuple[Any, SamConfig, str, str]:
    """Finds SAM weights: configured dir or name, $AMSAM_SAM, checkpoints/, download, or random.

    `sam.checkpoint` may be a converted directory or a name of `amsam_jax.pretrained` (e.g.
    "litemedsam", fetched and converted on first use). Without it, `$AMSAM_SAM` and
    `checkpoints/sam_vit_b` are tried, then (`sam.download`, model type vit_b) the official
    ViT-B download. When nothing can be had, `sam.allow_random` builds random weights of the
    intended architecture and says so loudly.

    Args:
        cfg: a recipe's config (its `sam` section and `seed` are used).

    Returns:
        (model adapted to the training config, its SamConfig, weights key for the cache,
        a human description that says loudly when weights are random).
    """
    return load_located(cfg, locate_sam(cfg))


def locate_sam(cfg) -> LocatedSam:
    """The first half of `resolve_sam`: checks the `sam` section, finds (or fetches) the weights
    and reads their config, without loading them. A trainer can then build the adapted model's
    shapes (`build_sam.abstract_sam(located.target)`) while `load_located` reads the weights."""
    s = cfg.sam
    if s.head_init not in HEAD_INITS:
        raise TrainError(
            "sam.head_init", f"must be one of {', '.join(HEAD_INITS)}, got {s.head_init!r}"
        )
    if s.head_init == "single_mask" and s.num_classes != 1:
        raise TrainError(
            "sam.head_init", f"single_mask is binary only, sam.num_classes is {s.num_classes}"
        )
    model_type = NAME_TO_TYPE.get(str(s.checkpoint), s.model_type)
    target = SamConfig.preset(
        model_type,
        image_size=s.image_size,
        num_multimask_outputs=s.num_classes,
        encoder_dtype=s.encoder_dtype,
    )
    sam_dir, missing = None, "no converted SAM, no download"
    if is_name(s.checkpoint) or (
        not s.checkpoint and s.download and s.model_type == "vit_b" and not _local_default()
    ):
        name = str(s.checkpoint or "sam_vit_b")
        timeout = 600.0 if s.checkpoint else s.download_timeout_s
        try:
            sam_dir = str(resolve_pretrained(name, timeout))
        except PretrainedError as e:
            if not s.allow_random:
                raise TrainError(None, f"sam.checkpoint={name}: {e.problem}") from None
            missing = f"could not fetch {name}: {e.problem}"
            log(f"sam: {missing}")
    elif s.checkpoint:
        if not Path(s.checkpoint).is_dir():
            raise TrainError(s.checkpoint, "sam.checkpoint is not a directory or a known name")
        sam_dir = s.checkpoint
    else:
        sam_dir = _local_default()
    if sam_dir is not None:
        src_cfg, _ = read_sam_config(sam_dir)
        check_image_size(src_cfg, s.image_size)
        target = dataclasses.replace(
            src_cfg,
            image_size=s.image_size,
            num_multimask_outputs=s.num_classes,
            encoder_dtype=s.encoder_dtype,
        )
        if s.head_init == "single_mask":  # the checkpoint's decoder heads, unchanged
            target = dataclasses.replace(
                target, num_multimask_outputs=src_cfg.num_multimask_outputs
            )
        return LocatedSam(target, sam_dir, model_type, missing)
    if not s.allow_random:
        raise TrainError(
            None, "no SAM weights found (set sam.checkpoint) and sam.allow_random is off"
        )
    check_image_size(target, s.image_size)
    return LocatedSam(target, None, model_type, missing)


def load_located(cfg, located: LocatedSam) -> tuple[Any, SamConfig, str, str]:
    """The second half of `resolve_sam`: loads and adapts the weights `locate_sam` found (or
    builds random ones); returns what `resolve_sam` does."""
    s, target, sam_dir = cfg.sam, located.target, located.sam_dir
    if sam_dir is not None:
        model = load_sam(sam_dir)
        model = adapt_sam(
            model, target, reinit_heads=s.reinit_heads and s.head_init == "tokens", seed=cfg.seed
        )
        key = f"{sam_weights_key(sam_dir, s.encoder_dtype)}-{s.image_size}"
        described = f"{s.checkpoint} ({sam_dir})" if is_name(s.checkpoint) else sam_dir
        return model, target, key, f"converted SAM weights from {described}"
    model = build_sam(target, seed=cfg.seed)
    key = f"random-{located.model_type}-{s.image_size}-seed{cfg.seed}-{s.encoder_dtype}"
    return (
        model,
        target,
        key,
        (
            f"RANDOM {located.model_type} WEIGHTS ({located.missing}): Dice is a pipeline "
            "check, not a quality number"
        ),
    )


def check_image_size(sam_cfg: SamConfig, image_size: int) -> None:
    """`sam.image_size` must be a whole number of the encoder's strides (patches, merges).

    Raises:
        ConfigError: naming the setting and the stride.
    """
    if sam_cfg.encoder == "tiny_vit":
        stride = sam_cfg.tiny_vit_patch_stride * math.prod(sam_cfg.tiny_vit_merge_strides)
        what = "TinyViT encoder's stride (patch embedding x merges)"
    else:
        stride, what = sam_cfg.patch_size, "ViT encoder's patch size"
    if image_size < stride or image_size % stride:
        raise ConfigError(
            f"sam.image_size={image_size}", f"must be a multiple of the {what} {stride}"
        )


def _local_default() -> str | None:
    """`$AMSAM_SAM` or `checkpoints/sam_vit_b`, when it is a directory."""
    candidates = (os.environ.get("AMSAM_SAM"), DEFAULT_SAM_DIR)
    return next((c for c in candidates if c and Path(c).is_dir()), None)
