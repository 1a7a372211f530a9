"""Machinery shared by every recipe's config: the SAM section, dotted overrides, config files.

A recipe's config is a tree of frozen dataclasses. `apply_overrides` replaces a field by its dotted
path (`--set train.epochs=10`, `--set sam.checkpoint=DIR`); `load_config` runs a config file's
`get_config()` (big_vision style: `train/configs/<name>.py[:arg]`).
"""

import dataclasses
import importlib.util
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amsam_jax.build_sam import MODEL_TYPES
from amsam_jax.utils.errors import AmsamError, first_line


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


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """The device mesh a run's steps use (docs/scale.md): how a run is executed, not what it
    computes, so it is left out of `config.json` and a run resumes on any device count."""

    data: int = 0  # devices on the data axis; 0: every device of every process


# ----------------------------------------------------------------------------- validation

# A rule: (dotted path, predicate on the value, what the value must be). Predicates see values of
# the right type already (`check_types` runs first); None passes every rule of an optional field.
Rule = tuple[str, Callable[[Any], bool], str]


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


def positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0), "> 0"


def between(low: float, high: float, open_high: bool = False) -> tuple[Callable, str]:
    if open_high:
        return (lambda v: low <= v < high), f"in [{low:g}, {high:g})"
    return (lambda v: low <= v <= high), f"in [{low:g}, {high:g}]"


def one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def rule(path: str, check: tuple[Callable[[Any], bool], str]) -> Rule:
    return (path, check[0], check[1])


def _value(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _type_ok(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_type_ok, value, args))
    return True  # annotations this checker does not know are not checked


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if annotation is float:
        return "a finite number"
    if origin is tuple:
        return "a list"
    return getattr(annotation, "__name__", str(annotation))


def check_types(cfg, prefix: str = "") -> None:
    """Every field of a config tree has its annotated type (floats finite).

    Raises:
        ConfigError: naming the first field that does not, e.g. `train.epochs='4': expected int`.
    """
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value, annotation = getattr(cfg, field.name), hints[field.name]
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, annotation):
                raise ConfigError(path, f"expected a {annotation.__name__} section")
            check_types(value, f"{path}.")
        elif not _type_ok(value, annotation):
            raise ConfigError(f"{path}={value!r}", f"expected {_type_name(annotation)}")


def check_config(cfg, rules: list[Rule]) -> None:
    """`check_types`, then every rule; the first violation is a ConfigError naming the setting.

    Raises:
        ConfigError: e.g. `train.batch_size=0: must be >= 1`.
    """
    check_types(cfg)
    for path, ok, what in rules:
        value = _value(cfg, path)
        if value is not None and not ok(value):
            raise ConfigError(f"{path}={value!r}", f"must be {what}")


SAM_RULES: list[Rule] = [
    rule("sam.model_type", one_of(*MODEL_TYPES)),
    rule("sam.image_size", at_least(16)),
    rule("sam.num_classes", at_least(1)),
    rule("sam.head_init", one_of("tokens", "single_mask")),
    rule("sam.encoder_dtype", one_of("float32", "bfloat16")),
    rule("sam.download_timeout_s", positive()),
]
MESH_RULES: list[Rule] = [rule("mesh.data", at_least(0))]


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
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
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
    if file.is_dir():
        raise ConfigError(path, "is a folder; expected a config file (train/configs/<name>.py)")
    if not file.is_file():
        raise ConfigError(path, "no such config file")
    if file.suffix != ".py":
        raise ConfigError(
            path, "not a Python config file: --config takes train/configs/<name>.py[:arg]"
        )
    module_spec = importlib.util.spec_from_file_location(f"amsam_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}", f"syntax error ({e.msg})") from None
    except (Exception, SystemExit) as e:  # the file is user code: any failure is the file's
        raise ConfigError(path, f"failed to load ({type(e).__name__}: {first_line(e)})") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(path, "defines no get_config()")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except AmsamError:
        raise
    except (Exception, SystemExit) as e:
        where = f"{path}:{arg}" if arg else path
        raise ConfigError(
            where, f"get_config() failed ({type(e).__name__}: {first_line(e)})"
        ) from None
    if not isinstance(cfg, accepted):
        names = " or ".join(t.__name__ for t in accepted)
        raise ConfigError(path, f"get_config() returned {type(cfg).__name__}, not {names}")
    return cfg
