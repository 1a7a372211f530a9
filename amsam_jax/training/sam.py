"""Which SAM a run fine-tunes: a converted directory, the official download, or random weights.

`resolve_sam` is shared by every trainer and by evaluation: it finds the weights named by a run's
`sam` section, adapts them to the run's input size and mask tokens (docs/fewshot.md §2.3), and
returns the key that identifies its encoder in the embedding cache.
"""

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import OFFICIAL_CHECKPOINTS, adapt_sam, load_sam, read_sam_config
from amsam_jax.training.embedder import sam_weights_key
from amsam_jax.training.run import TrainError, log

DEFAULT_SAM_DIR = "checkpoints/sam_vit_b"


def _download_official_vit_b(cache_root: Path, timeout: float) -> Path | None:
    """Downloads and converts the official ViT-B checkpoint once; None if impossible here."""
    url, sha, _ = OFFICIAL_CHECKPOINTS["vit_b"]
    converted = cache_root / "sam_vit_b"
    if (converted / "config.json").is_file():
        return converted
    pth = cache_root / Path(url).name
    if not pth.is_file():
        log(f"sam: trying the official ViT-B download ({url}, timeout {timeout:g} s)")
        tmp = pth.with_suffix(".part")
        cache_root.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                h = hashlib.sha256()
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tmp.unlink(missing_ok=True)
            log(f"sam: download failed ({e})")
            return None
        if h.hexdigest() != sha:
            tmp.unlink(missing_ok=True)
            log(f"sam: downloaded file has SHA-256 {h.hexdigest()}, expected {sha}: discarded")
            return None
        os.replace(tmp, pth)
    try:
        from weights_conversion.convert_sam import ConversionError, convert_checkpoint
    except ImportError as e:  # torch (the `convert` extra) is not installed
        log(f"sam: cannot convert {pth} without the `convert` extra ({e})")
        return None
    try:
        convert_checkpoint(pth, converted)
    except ConversionError as e:
        log(f"sam: conversion failed: {e}")
        return None
    return converted


def resolve_sam(cfg) -> tuple[Any, SamConfig, str, str]:
    """Finds SAM weights: configured dir, $AMSAM_SAM, checkpoints/, download, or random.

    Args:
        cfg: a recipe's config (its `sam` section and `seed` are used).

    Returns:
        (model adapted to the training config, its SamConfig, weights key for the cache,
        a human description that says loudly when weights are random).
    """
    s = cfg.sam
    target = SamConfig.preset(
        s.model_type,
        image_size=s.image_size,
        num_multimask_outputs=s.num_classes,
        encoder_dtype=s.encoder_dtype,
    )
    candidates = [s.checkpoint] if s.checkpoint else [os.environ.get("AMSAM_SAM"), DEFAULT_SAM_DIR]
    sam_dir = next((c for c in candidates if c and Path(c).is_dir()), None)
    if s.checkpoint and sam_dir is None:
        raise TrainError(f"{s.checkpoint}: sam.checkpoint is not a directory")
    if sam_dir is None and s.download and s.model_type == "vit_b":
        cache_root = Path(os.environ.get("AMSAM_HOME", Path.home() / ".cache" / "amsam_jax"))
        downloaded = _download_official_vit_b(cache_root / "checkpoints", s.download_timeout_s)
        sam_dir = str(downloaded) if downloaded else None
    if sam_dir is not None:
        src_cfg, _ = read_sam_config(sam_dir)
        model = load_sam(sam_dir)
        target = dataclasses.replace(
            src_cfg,
            image_size=s.image_size,
            num_multimask_outputs=s.num_classes,
            encoder_dtype=s.encoder_dtype,
        )
        model = adapt_sam(model, target, reinit_heads=s.reinit_heads, seed=cfg.seed)
        key = f"{sam_weights_key(sam_dir, s.encoder_dtype)}-{s.image_size}"
        return model, target, key, f"converted SAM weights from {sam_dir}"
    if not s.allow_random:
        raise TrainError("no SAM weights found (set sam.checkpoint) and sam.allow_random is off")
    model = build_sam(target, seed=cfg.seed)
    key = f"random-{s.model_type}-{s.image_size}-seed{cfg.seed}-{s.encoder_dtype}"
    return (
        model,
        target,
        key,
        (
            f"RANDOM {s.model_type} WEIGHTS (no converted SAM, no download): Dice is a pipeline "
            "check, not a quality number"
        ),
    )
