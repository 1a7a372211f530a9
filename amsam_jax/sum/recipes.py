"""SUM recipes (docs/sum.md §7.2, §11); `train/configs/sum*.py` files return these.

Every recipe accepts the `smoke` argument: a tiny random SAM at 256 px and a few iterations with
the full round structure, a pipeline check in minutes, not a result.
"""

import dataclasses

from amsam_jax.sum.config import SumConfig, SumData, SumTrain


def sum_smoke(cfg: SumConfig) -> SumConfig:
    """Shrinks a SUM recipe to a pipeline check: tiny random SAM at 256 px, a few iterations with
    the full round structure (first round, corrective rounds, mid and last mask-only rounds)."""
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


def _finish_sum(cfg: SumConfig, arg: str | None) -> SumConfig:
    if arg in (None, ""):
        return cfg
    if arg == "smoke":
        return sum_smoke(cfg)
    raise ValueError(f"unknown config argument {arg!r} (only 'smoke')")


def sum_recipe(arg: str | None = None) -> SumConfig:
    """SUM (docs/sum.md §7.2): interactive fine-tuning on human labels + pseudo-labels with U
    from the mask-refinement module, task prompts on."""
    return _finish_sum(SumConfig(name="sum"), arg)


def sum_vanilla(arg: str | None = None) -> SumConfig:
    """Ablation "Vanilla": pseudo-labels used naively (U ≡ 0 in the loss and the sampler)."""
    return _finish_sum(SumConfig(name="sum_vanilla", data=SumData(uncertainty="zeros")), arg)


def sum_no_task_prompt(arg: str | None = None) -> SumConfig:
    """Ablation "SUM w/o task prompt": the task table stays zero and untrained."""
    cfg = SumConfig(name="sum_no_task_prompt", train=SumTrain(use_task_prompt=False))
    return _finish_sum(cfg, arg)
