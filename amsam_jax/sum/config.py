"""SumConfig: the SUM recipe's settings (docs/sum.md §11), same override syntax as FewShotConfig.

`python -m amsam_jax.train --config train/configs/sum.py --set data.labelled=DIR:salient ...`
"""

import dataclasses
import json
from typing import Any

from amsam_jax.sum.loss import SumLossConfig
from amsam_jax.training.config import (
    MESH_RULES,
    SAM_RULES,
    MeshSection,
    SamSection,
    at_least,
    between,
    check_config,
    from_dict,
    one_of,
    positive,
    rule,
)


@dataclasses.dataclass(frozen=True)
class SumData:
    # Human-labelled folders in the few-shot folder format (DIR/<split>/{images,masks}), each
    # with its task ("DIR:salient", "DIR:entity", "DIR:part" or "DIR:1"). A mask PNG holds one
    # mask per distinct non-zero value (binary masks: one). Empty: the bundled synthetic set.
    labelled: tuple[str, ...] = ()
    labelled_split: str = "train"
    # Unlabelled pool: a folder of images with SA-1B-format pseudo-labels (<stem>.json, optional
    # <stem>.prob.npz), or a plain image folder, pseudo-labelled once by the automatic mask
    # generator into <workdir>/pseudo_labels. Empty: the bundled synthetic images.
    unlabelled: str | None = None
    # Uncertainty source (docs/sum.md §3): "maps" (<stem>.refined.npz next to the pseudo-labels or
    # in `refined_dir`), "refiner" (a refiner workdir: maps are computed once into the run),
    # "zeros" (the Vanilla ablation).
    uncertainty: str = "refiner"
    refined_dir: str | None = None
    refiner: str | None = None  # workdir of `python -m amsam_jax.refine train`
    min_ratio: float = 100.0
    min_refine_ratio: float = 100.0
    max_ratio: float = 0.95
    max_num_mask: int = 40
    # Automatic mask generator settings when pseudo-labelling a plain image folder (official
    # SamAutomaticMaskGenerator defaults).
    amg_points_per_side: int = 32
    amg_pred_iou_thresh: float = 0.88
    amg_stability_score_thresh: float = 0.95
    eval_split: str = "test"  # interactive evaluation at the end of the run ("" to skip)
    eval_max_images: int = 8


@dataclasses.dataclass(frozen=True)
class SumTrain:
    steps: int = 1000  # iterations; with mix_mode "alternate" each is two optimiser steps
    mix_mode: str = "alternate"  # alternate | joint
    human_images: int = 4
    human_masks_per_image: int = 16
    pseudo_images: int = 1
    num_point_rounds: int = 8
    num_mask_only_rounds: int = 2
    p_first_is_point: float = 0.5
    box_jitter: str = "sum"  # sum (the reference's shift) | sam (symmetric)
    box_jitter_std_frac: float = 0.1
    box_jitter_max_px: float = 20.0
    sample_frame: str = "1024"  # "1024" (the model frame) | "256" (low-res grid, docs/sum.md §5.7)
    use_uncertainty_sampling: bool = True
    sampling_threshold: float | None = (
        None  # optional hard U < tau (docs/sum.md A7), off by default
    )
    use_task_prompt: bool = True
    lr_pretrained: float = 1e-5
    lr_task: float = 1e-3
    lr_drop_frac: float = 10 / 12
    lr_drop_factor: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    log_every: int = 1
    checkpoint_every_s: float = 30.0
    checkpoint_every: int = 0  # also save `latest` every N iterations (0: time-based only)
    eval_clicks: int = 9


@dataclasses.dataclass(frozen=True)
class SumRefine:
    """The mask-refinement module (docs/sum.md §3.2): a SAM prompt encoder + decoder initialised
    from SAM, trained on the human labels to turn (prompt, SAM's mask) into the GT mask."""

    steps: int = 500
    lr: float = 1e-4
    images: int = 4
    masks_per_image: int = 16
    p_box: float = 0.5  # prompt of a training mask: its tight box, else a uniform point in it
    batch_masks: int = 16  # masks per decoder call when computing maps


@dataclasses.dataclass(frozen=True)
class SumConfig:
    name: str = "sum"
    seed: int = 42
    data: SumData = SumData()
    sam: SamSection = SamSection(image_size=1024, num_classes=3, reinit_heads=False)
    loss: SumLossConfig = SumLossConfig()  # docs/sum.md §6 / §11 (use_uncertainty: the loss's U)
    train: SumTrain = SumTrain()
    refine: SumRefine = SumRefine()
    mesh: MeshSection = MeshSection()  # devices of the step (docs/scale.md); not in config.json

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("mesh")  # how the run is executed, not what it computes: resumable on any mesh
        return {"kind": "sum", **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SumConfig":
        return from_dict(cls, {k: v for k, v in d.items() if k != "kind"})

    def validate(self) -> "SumConfig":
        """Checks every setting's type and range (see RULES).

        Raises:
            ConfigError: naming the first bad setting, e.g. `train.steps=0: must be >= 1`.
        """
        check_config(self, RULES)
        return self


RULES = [
    *SAM_RULES,
    *MESH_RULES,
    rule("data.uncertainty", one_of("maps", "refiner", "zeros")),
    rule("data.min_ratio", at_least(0)),
    rule("data.min_refine_ratio", at_least(0)),
    rule("data.max_ratio", between(0, 1)),
    rule("data.max_num_mask", at_least(1)),
    rule("data.amg_points_per_side", at_least(1)),
    rule("data.amg_pred_iou_thresh", between(0, 1)),
    rule("data.amg_stability_score_thresh", between(0, 1)),
    rule("data.eval_max_images", at_least(0)),
    rule("train.steps", at_least(1)),
    rule("train.mix_mode", one_of("alternate", "joint")),
    rule("train.human_images", at_least(0)),
    rule("train.human_masks_per_image", at_least(1)),
    rule("train.pseudo_images", at_least(0)),
    rule("train.num_point_rounds", at_least(0)),
    rule("train.num_mask_only_rounds", at_least(0)),
    rule("train.p_first_is_point", between(0, 1)),
    rule("train.box_jitter", one_of("sum", "sam")),
    rule("train.box_jitter_std_frac", at_least(0)),
    rule("train.box_jitter_max_px", at_least(0)),
    rule("train.sample_frame", one_of("1024", "256")),
    rule("train.sampling_threshold", between(0, 1)),
    rule("train.lr_pretrained", at_least(0)),
    rule("train.lr_task", at_least(0)),
    rule("train.lr_drop_frac", between(0, 1)),
    rule("train.lr_drop_factor", positive()),
    rule("train.b1", between(0, 1, open_high=True)),
    rule("train.b2", between(0, 1, open_high=True)),
    rule("train.eps", positive()),
    rule("train.log_every", at_least(1)),
    rule("train.checkpoint_every_s", at_least(0)),
    rule("train.checkpoint_every", at_least(0)),
    rule("train.eval_clicks", at_least(1)),
    rule("refine.steps", at_least(1)),
    rule("refine.lr", positive()),
    rule("refine.images", at_least(1)),
    rule("refine.masks_per_image", at_least(1)),
    rule("refine.p_box", between(0, 1)),
    rule("refine.batch_masks", at_least(1)),
    rule("loss.lambda_focal", at_least(0)),
    rule("loss.lambda_dice", at_least(0)),
    rule("loss.lambda_iou", at_least(0)),
    rule("loss.focal_alpha", between(0, 1)),
    rule("loss.focal_gamma", at_least(0)),
    rule("loss.dice_smooth", at_least(0)),
    rule("loss.dice_uncertainty_threshold", between(0, 1)),
    rule("loss.dice_mode", one_of("hard", "soft")),
]


def is_sum_config(d: dict[str, Any]) -> bool:
    """Whether a workdir's config.json holds a SUM run (else a few-shot TrainConfig)."""
    return d.get("kind") == "sum"
