"""TrainConfig: frozen dataclasses with dotted `--set section.key=value` overrides."""

import dataclasses
import json
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dir: str | None = None  # folder format DIR/{train,test}/{images,masks}; None: bundled synthetic
    shots: int = 4
    seed: int | None = None  # None: first N of the sorted pool (spec default); int: seeded subset
    sam_pixel_norm: bool = False  # spec §2.4: the reference feeds [0, 1] images unnormalised
    test_split: str = "test"


@dataclasses.dataclass(frozen=True)
class SamSection:
    checkpoint: str | None = None  # converted SAM dir; None: $AMSAM_SAM, checkpoints/sam_vit_b, ...
    download: bool = True  # else try the official ViT-B download (SHA-256 checked)
    allow_random: bool = True  # last resort: random weights, said loudly
    model_type: str = "vit_b"  # for download / random init; "tiny" for smoke runs
    image_size: int = 256
    num_classes: int = 1  # n = num_classes + 1 mask tokens
    reinit_heads: bool = True  # the reference drops tokens/hypernetworks/IoU head at 256 px
    encoder_dtype: str = "float32"
    download_timeout_s: float = 10.0


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
    schedule: str = "clean"  # clean | reference (spec §5.2)
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
    residual: bool = False  # reading (B) of spec §6.2: learn an offset on the box tokens
    conf: float = 0.25
    iou: float = 0.7
    classes: tuple[str, ...] | None = None
    fallback: str = "full_image"


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    enabled: bool = True
    alpha: float = 0.7
    average: str = "batch"  # batch (literal Eq. 11) | sample


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "am_sam"
    seed: int = 42
    data: DataConfig = DataConfig()
    sam: SamSection = SamSection()
    lora: LoraConfig = LoraConfig()
    train: TrainSection = TrainSection()
    boxes: BoxesConfig = BoxesConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d)


def _from_dict(cls, d: dict[str, Any]):
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in d:
            continue
        value = d[field.name]
        if dataclasses.is_dataclass(field.type):
            value = _from_dict(field.type, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def _parse_value(text: str, annotation) -> Any:
    """Parses `text` for a field annotated `annotation` (int, float, bool, str, optional, tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(text, inner[0])
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if origin is tuple:
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Applies `section.key=value` (or `key=value` for top-level fields) overrides.

    Raises:
        ValueError: unknown key or unparsable value (the message names it).
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        cfg = _replace_path(cfg, parts, text, key)
    return cfg


def _replace_path(obj, parts: list[str], text: str, full_key: str):
    hints = typing.get_type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        known = ", ".join(sorted(hints))
        raise ValueError(f"--set {full_key}: unknown key {name!r} (known: {known})")
    if len(parts) == 1:
        if dataclasses.is_dataclass(hints[name]):
            raise ValueError(f"--set {full_key}: {name!r} is a section; set one of its keys")
        try:
            value = _parse_value(text, hints[name])
        except ValueError as e:
            raise ValueError(f"--set {full_key}={text}: {e}") from None
        return dataclasses.replace(obj, **{name: value})
    child = getattr(obj, name)
    if not dataclasses.is_dataclass(child):
        raise ValueError(f"--set {full_key}: {name!r} has no sub-keys")
    return dataclasses.replace(obj, **{name: _replace_path(child, parts[1:], text, full_key)})
