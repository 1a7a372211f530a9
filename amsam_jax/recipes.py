"""Experiment recipes (spec §7); `train/configs/<name>.py` files return these.

Every recipe accepts the `smoke` argument (big_vision's `runlocal`): a tiny random SAM, 2 epochs,
no download — a pipeline check in seconds, not a result.
"""

import dataclasses

from amsam_jax.configs import (
    BoxesConfig,
    CalibrationConfig,
    DataConfig,
    SamSection,
    TrainConfig,
    TrainSection,
)


def smoke(cfg: TrainConfig) -> TrainConfig:
    """Shrinks a recipe to a seconds-long pipeline check."""
    return dataclasses.replace(
        cfg,
        sam=dataclasses.replace(cfg.sam, model_type="tiny", download=False, checkpoint=None),
        train=dataclasses.replace(cfg.train, epochs=2),
        data=dataclasses.replace(cfg.data, shots=4),
    )


def _finish(cfg: TrainConfig, arg: str | None) -> TrainConfig:
    if arg in (None, ""):
        return cfg
    if arg == "smoke":
        return smoke(cfg)
    raise ValueError(f"unknown config argument {arg!r} (only 'smoke')")


def am_sam(arg: str | None = None) -> TrainConfig:
    """AM-SAM: BLO-SAM + YOLO box prompts (when a box file/detector is set) + mask calibration."""
    return _finish(TrainConfig(name="am_sam"), arg)


def blo_sam(arg: str | None = None) -> TrainConfig:
    """BLO-SAM with the project defaults: exact hypergradient, clean schedules, no calibration."""
    return _finish(TrainConfig(name="blo_sam", calibration=CalibrationConfig(enabled=False)), arg)


def blo_sam_reference(arg: str | None = None) -> TrainConfig:
    """Everything faithful to the released BLO-SAM script (spec §5, §10)."""
    cfg = TrainConfig(
        name="blo_sam_reference",
        seed=42,
        calibration=CalibrationConfig(enabled=False),
        train=TrainSection(
            hypergradient="first_order",
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


def samed(arg: str | None = None) -> TrainConfig:
    """SAMed baseline: LoRA on the decoder trained on all shots, no bi-level prompt learning."""
    cfg = TrainConfig(
        name="samed",
        calibration=CalibrationConfig(enabled=False),
        train=TrainSection(bilevel=False, hypergradient="none"),
    )
    return _finish(cfg, arg)


def calibration_only(arg: str | None = None) -> TrainConfig:
    """Ablation (paper Table 4): BLO-SAM + mask calibration, no box prompts."""
    cfg = TrainConfig(name="ablation_calibration_only", boxes=BoxesConfig())
    return _finish(cfg, arg)


def boxes_only(arg: str | None = None) -> TrainConfig:
    """Ablation (paper Table 4): BLO-SAM + YOLO box prompts, no calibration (set boxes.*)."""
    cfg = TrainConfig(name="ablation_boxes_only", calibration=CalibrationConfig(enabled=False))
    return _finish(cfg, arg)


def embedded_default() -> TrainConfig:
    """What `python -m amsam_jax.train` runs with no arguments."""
    return am_sam()


# ----------------------------------------------------------------------------- SUM (sum.md)


def sum_smoke(cfg):
    """Shrinks a SUM recipe to a pipeline check: tiny random SAM at 256 px, a few iterations with
    the full round structure (first round, corrective rounds, mid and last mask-only rounds)."""
    from amsam_jax.sum_config import SumConfig

    assert isinstance(cfg, SumConfig)
    return dataclasses.replace(
        cfg,
        sam=dataclasses.replace(
            cfg.sam, model_type="tiny", image_size=256, download=False, checkpoint=None
        ),
        data=dataclasses.replace(
            cfg.data,
            max_num_mask=4,
            amg_points_per_side=4,
            amg_pred_iou_thresh=0.0,
            amg_stability_score_thresh=0.0,
            eval_max_images=2,
        ),
        train=dataclasses.replace(
            cfg.train,
            steps=8,
            # One image x 4 masks for both sources: both step kinds share their compilations.
            human_images=1,
            human_masks_per_image=4,
            num_point_rounds=2,
            eval_clicks=3,
            checkpoint_every=1,
        ),
        # Box prompts only in the smoke refiner: one compiled step instead of two.
        refine=dataclasses.replace(
            cfg.refine, steps=2, images=1, masks_per_image=4, batch_masks=4, p_box=1.0
        ),
    )


def _finish_sum(cfg, arg: str | None):
    if arg in (None, ""):
        return cfg
    if arg == "smoke":
        return sum_smoke(cfg)
    raise ValueError(f"unknown config argument {arg!r} (only 'smoke')")


def sum_recipe(arg: str | None = None):
    """SUM (spec sum.md §7.2): interactive fine-tuning on human labels + pseudo-labels with U
    from the mask-refinement module, task prompts on."""
    from amsam_jax.sum_config import SumConfig

    return _finish_sum(SumConfig(name="sum"), arg)


def sum_vanilla(arg: str | None = None):
    """Ablation "Vanilla": pseudo-labels used naively (U ≡ 0 in the loss and the sampler)."""
    from amsam_jax.sum_config import SumConfig, SumData

    return _finish_sum(SumConfig(name="sum_vanilla", data=SumData(uncertainty="zeros")), arg)


def sum_no_task_prompt(arg: str | None = None):
    """Ablation "SUM w/o task prompt": the task table stays zero and untrained."""
    from amsam_jax.sum_config import SumConfig, SumTrain

    cfg = SumConfig(name="sum_no_task_prompt", train=SumTrain(use_task_prompt=False))
    return _finish_sum(cfg, arg)
