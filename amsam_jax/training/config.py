"""Machinery shared by every recipe's config: the SAM section, dotted overrides, config files.

A recipe's config is a tree of frozen dataclasses. `apply_overrides` replaces a field by its dotted
path (`--set train.epochs=10`, `--set sam.checkpoint=DIR`); `load_config` runs a config file's
`get_config()` (big_vision style: `train/configs/<name>.py[:arg]`).
"""

import dataclasses
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

from amsam_jax.utils.errors import AmsamError


class ConfigError(AmsamError, ValueError):
    """A config file, override or setting that cannot be used; one line naming it."""


@dataclasses.dataclass(frozen=True)
class SamSection:
    """Which SAM a run fine-tunes, and at which input size (shared by every recipe)."""

    checkpoint: str | None = None  # converted SAM dir; None: $AMSAM_SAM, checkpoints/sam_vit_b, ...
    download: bool = True  # else try the official ViT-B download (SHA-256 checked)
    allow_random: bool = True  # last resort: random weights, said loudly
    model_type: str = "vit_b"  # for download / random init; "tiny" for smoke runs
    image_size: int = 256
    num_classes: int = 1  # n = num_classes + 1 mask tokens
    reinit_heads: bool = True  # the reference drops tokens/hypernetworks/IoU head at 256 px
    # The few-shot class logits: "tokens" (n = num_classes + 1 mask tokens, one per class, heads
    # as reinit_heads says: the reference) or "single_mask" (binary only: the checkpoint's heads
    # kept, background logit 0 and foreground = its single-mask output, so training starts from
    # the pretrained model's own box-prompted mask; docs/fewshot.md §2.3)
    head_init: str = "tokens"
    encoder_dtype: str = "float32"
    download_timeout_s: float = 10.0


def from_dict(cls, d: dict[str, Any]):
    """The dataclass `cls` from its (possibly nested) dict; lists become tuples."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in d:
            continue
        value = d[field.name]
        if dataclasses.is_dataclass(field.type):
            value = from_dict(field.type, value)
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


def apply_overrides(cfg, overrides: list[str]):
    """Applies `section.key=value` (or `key=value` for top-level fields) overrides.

    Raises:
        ConfigError: unknown key or unparsable value (the message names it).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        cfg = _replace_path(cfg, parts, text, key)
    return cfg


def _replace_path(obj, parts: list[str], text: str, full_key: str):
    hints = typing.get_type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"--set {full_key}: unknown key {name!r} (known: {known})")
    if len(parts) == 1:
        if dataclasses.is_dataclass(hints[name]):
            raise ConfigError(f"--set {full_key}: {name!r} is a section; set one of its keys")
        try:
            value = _parse_value(text, hints[name])
        except ValueError as e:
            raise ConfigError(f"--set {full_key}={text}: {e}") from None
        return dataclasses.replace(obj, **{name: value})
    child = getattr(obj, name)
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"--set {full_key}: {name!r} has no sub-keys")
    return dataclasses.replace(obj, **{name: _replace_path(child, parts[1:], text, full_key)})


def load_config(spec: str, accepted: tuple[type, ...]):
    """Loads `get_config(arg)` from a config file given as `path[:arg]`.

    Args:
        spec: `train/configs/<name>.py` or `train/configs/<name>.py:<arg>` (e.g. `:smoke`).
        accepted: the config classes a caller can run.

    Raises:
        ConfigError: missing file, no `get_config`, or a result of another type.
    """
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such config file")
    module_spec = importlib.util.spec_from_file_location(f"amsam_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, accepted):
        names = " or ".join(t.__name__ for t in accepted)
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not {names}")
    return cfg
