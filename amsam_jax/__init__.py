"""amsam_jax: Segment Anything in JAX/Flax NNX, with few-shot fine-tuning (AM-SAM, BLO-SAM, SUM)."""

from amsam_jax.build_sam import SamConfig, build_sam, sam_model_registry
from amsam_jax.checkpoint import CheckpointError, load_sam
from amsam_jax.predictor import SamPredictor

__all__ = [
    "CheckpointError",
    "SamConfig",
    "SamPredictor",
    "build_sam",
    "load_sam",
    "sam_model_registry",
]
