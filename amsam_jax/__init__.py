"""amsam_jax: Segment Anything in JAX/Flax NNX, with few-shot fine-tuning (AM-SAM, BLO-SAM, SUM)."""

from amsam_jax.build_sam import SamConfig, build_sam, sam_model_registry
from amsam_jax.checkpoint import CheckpointError, load_sam
from amsam_jax.evaluation import evaluate
from amsam_jax.predictor import SamPredictor
from amsam_jax.run_evaluation import evaluate_workdir

__all__ = [
    "CheckpointError",
    "SamConfig",
    "SamPredictor",
    "build_sam",
    "evaluate",
    "evaluate_workdir",
    "load_sam",
    "sam_model_registry",
]
