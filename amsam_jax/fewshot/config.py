"""The few-shot recipe's settings (AM-SAM, BLO-SAM, SAMed): frozen dataclasses, one per section.

`python -m amsam_jax.train --config train/configs/am_sam.py --set train.epochs=10` overrides any
field with its dotted path (`training.config.apply_overrides`); docs/fewshot.md §7 lists them.
"""

import dataclasses
import json
from typing import Any

from amsam_jax.boxes.box_file import FALLBACKS
from amsam_jax.training.config import (
    MESH_RULES,
    SAM_RULES,
    ConfigError,
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

HYPERGRADIENTS = ("exact", "first_order", "darts_fd", "none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dir: str | None = None  # folder format DIR/{train,test}/{images,masks}; None: bundled synthetic
    shots: int = 4
    seed: int | None = (
        None  # None: first N of the sorted pool (docs/fewshot.md §4.2); int: seeded subset
    )
    sam_pixel_norm: bool = (
        False  # docs/fewshot.md §2.4: the reference feeds [0, 1] images unnormalised
    )
    test_split: str = "test"
    # K foreground classes: labels are class ids 0..K (docs/fewshot.md §4.5); 1 = binary (> 0).
    # sam.num_classes follows it (`FewShotConfig.validate`).
    num_classes: int = 1


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 4
    alpha: float | None = None  # None: scale 1 (the reference)
    train_iou_head: bool = False


@dataclasses.dataclass(frozen=True)
class TrainSection:
    epochs: int = 100
    batch_size: int = 1
    hypergradient: str = "exact"  # exact | first_order | darts_fd | none (no upper level)
    bilevel: bool = True  # False (SAMed): lower level on all shots, prompt frozen
    lower_lr: float = 5e-3
    upper_lr: float = 1e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    power: float = 0.9
    schedule: str = "clean"  # clean | reference (docs/fewshot.md §5.2)
    warmup: bool = False
    warmup_period: int = 250
    upper_batch: str = "cycle"  # cycle | first (reference)
    dice_weight: float = 0.8
    hypergradient_clip: float | None = None
    exact_jacobian: str = "adam"  # adam | sgd
    exact_extra_lookahead: bool = False
    fd_radius: float = 0.01
    fd_accumulate_bug: bool = False
    fd_step1_bias: bool = False
    fd_reference_b1: bool = False
    fd_final_attn_quirk: bool = False
    checkpoint_every: int = 0  # extra `latest` saves every N iterations (0: none mid-epoch)
    # `latest` at an epoch end once this many seconds passed since the last save (0: every epoch).
    # A killed run replays from it deterministically, so the result does not depend on it.
    checkpoint_every_s: float = 30.0
    num_samples: int = 4  # overlays written to samples/


@dataclasses.dataclass(frozen=True)
class BoxesConfig:
    file: str | None = None  # box file (python -m amsam_jax.boxes); None: no box prompts
    detector: str | None = None  # YOLOv8 ONNX: compute (or reuse) the box file before training
    residual: bool = False  # reading (B) of docs/fewshot.md §6.2: learn an offset on the box tokens
    conf: float = 0.25
    iou: float = 0.7
    classes: tuple[str, ...] | None = None
    fallback: str = "full_image"
    # M boxes per image from the box file's lists, padded and merged (docs/fewshot.md §6.4);
    # 1: the entry's single box, as the paper.
    max_per_image: int = 1


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    enabled: bool = True
    alpha: float = 0.7
    average: str = "batch"  # batch (literal Eq. 11) | sample


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    name: str = "am_sam"
    seed: int = 42
    data: DataConfig = DataConfig()
    sam: SamSection = SamSection()
    lora: LoraConfig = LoraConfig()
    train: TrainSection = TrainSection()
    boxes: BoxesConfig = BoxesConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    mesh: MeshSection = MeshSection()  # devices of the step (docs/scale.md); not in config.json

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("mesh")  # how the run is executed, not what it computes: resumable on any mesh
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FewShotConfig":
        return from_dict(cls, d)

    def validate(self) -> "FewShotConfig":
        """Checks every setting's type and range (see RULES) and derives `sam.num_classes`.

        `data.num_classes` is the setting; the model gets one mask token per class plus
        background (`sam.num_classes` = K, docs/fewshot.md §4.5). A `sam.num_classes` left at 1
        follows `data.num_classes`; any other value must equal it.

        Returns:
            The config with `sam.num_classes = data.num_classes` (itself when they are equal).

        Raises:
            ConfigError: naming the first bad setting, e.g. `train.batch_size=0: must be >= 1`,
                or a `sam.num_classes` that contradicts `data.num_classes`.
        """
        check_config(self, RULES)
        k, s = self.data.num_classes, self.sam.num_classes
        if s == k:
            return self
        if s != 1:
            raise ConfigError(
                f"sam.num_classes={s}",
                f"contradicts data.num_classes={k}: set data.num_classes only "
                "(sam.num_classes follows it)",
            )
        return dataclasses.replace(self, sam=dataclasses.replace(self.sam, num_classes=k))


RULES = [
    *SAM_RULES,
    *MESH_RULES,
    rule("data.shots", at_least(2)),  # D1 = the first N // 2 shots, D2 the rest
    rule("data.test_split", (bool, "a split folder name")),
    rule("data.num_classes", at_least(1)),
    rule("lora.rank", at_least(1)),
    rule("lora.alpha", positive()),
    rule("train.epochs", at_least(1)),
    rule("train.batch_size", at_least(1)),
    rule("train.hypergradient", one_of(*HYPERGRADIENTS)),
    rule("train.lower_lr", positive()),
    rule("train.upper_lr", at_least(0)),
    rule("train.weight_decay", at_least(0)),
    rule("train.b1", between(0, 1, open_high=True)),
    rule("train.b2", between(0, 1, open_high=True)),
    rule("train.eps", positive()),
    rule("train.power", at_least(0)),
    rule("train.schedule", one_of("clean", "reference")),
    rule("train.warmup_period", at_least(1)),
    rule("train.upper_batch", one_of("cycle", "first")),
    rule("train.dice_weight", between(0, 1)),
    rule("train.hypergradient_clip", positive()),
    rule("train.exact_jacobian", one_of("adam", "sgd")),
    rule("train.fd_radius", positive()),
    rule("train.checkpoint_every", at_least(0)),
    rule("train.checkpoint_every_s", at_least(0)),
    rule("train.num_samples", at_least(0)),
    rule("boxes.conf", between(0, 1)),
    rule("boxes.iou", between(0, 1)),
    rule("boxes.fallback", one_of(*FALLBACKS)),
    rule("boxes.max_per_image", at_least(1)),
    rule("calibration.alpha", between(0, 1)),
    rule("calibration.average", one_of("batch", "sample")),
]
