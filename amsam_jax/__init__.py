"""amsam_jax: Segment Anything in JAX/Flax NNX, with few-shot fine-tuning (AM-SAM, BLO-SAM, SUM).

The package layout is described in docs/layout.md.
"""

from amsam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from amsam_jax.build_sam import SamConfig, build_sam, sam_model_registry
from amsam_jax.checkpoint import CheckpointError, load_sam, save_sam
from amsam_jax.evaluation.fewshot import evaluate_fewshot
from amsam_jax.evaluation.interactive import evaluate_interactive
from amsam_jax.evaluation.workdir import evaluate_workdir
from amsam_jax.predictor import SamPredictor

__all__ = [
    "CheckpointError",
    "SamAutomaticMaskGenerator",
    "SamConfig",
    "SamPredictor",
    "build_sam",
    "evaluate_fewshot",
    "evaluate_interactive",
    "evaluate_workdir",
    "load_sam",
    "sam_model_registry",
    "save_sam",
]
