"""Converted SAM directories: checked loading (no torch) and atomic saving.

A directory holds `config.json` (the format tag, the SamConfig as `model`, provenance) and
`params/`, the NNX state as Orbax writes it: an OCDBT key-value store of one zarr array per
parameter, named by its dotted path. Loading checks config.json field by field, builds the model
for it with shapes only and compares every stored array's name, shape and dtype with it before
any value is read; the arrays are then read one at a time with tensorstore (what Orbax reads
with), so a damaged directory is one error naming it, never a model of the wrong size.
"""

import dataclasses
import json
import math
import os
import re
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from amsam_jax.build_sam import MODEL_TYPES, SamConfig, abstract_sam
from amsam_jax.modeling.common import resize_bilinear, resize_linear
from amsam_jax.modeling.sam import Sam
from amsam_jax.utils.errors import AmsamError, first_line
from amsam_jax.utils.io import WriteError, atomic_directory, write_json

FORMAT = "amsam_jax.sam/1"

# The official segment-anything v1.0 checkpoints (Apache-2.0): URL, SHA-256, size in bytes.
OFFICIAL_CHECKPOINTS = {
    "vit_b": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
    ),
    "vit_l": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        None,
    ),
    "vit_h": (
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        None,
    ),
}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CONVERT_HINT = "create one with `python -m weights_conversion sam CKPT OUT_DIR`"
# The SamConfig string fields and their values.
CHOICES = {
    "model_type": MODEL_TYPES,
    "encoder": ("vit", "tiny_vit"),
    "encoder_dtype": ("float32", "bfloat16"),
    "preprocess": ("sam", "medsam"),
}
# Integer fields (and list items) that may be 0; every other one must be positive.
MAY_BE_ZERO = ("window_size", "num_multimask_outputs", "num_tasks", "encoder_global_attn_indexes")
TINY_VIT_LENGTHS = {
    "tiny_vit_embed_dims": 4,
    "tiny_vit_depths": 4,
    "tiny_vit_num_heads": 4,
    "tiny_vit_window_sizes": 4,
    "tiny_vit_merge_strides": 3,
}
# The SUM task table (docs/sum.md §4): a directory converted before it existed loads with zeros.
TASK_TABLE = "prompt_encoder.task_prompt_embedding."


class CheckpointError(AmsamError):
    """A converted-SAM directory that cannot be loaded; one line naming the path and problem."""


def abstract_state(cfg: SamConfig) -> nnx.State:
    """The NNX state of `build_sam(cfg)` as shapes only (nothing is allocated)."""
    return nnx.state(abstract_sam(cfg))


def resize_pos_embed(x: np.ndarray, grid: int) -> np.ndarray:
    """(1, g, g, C) -> (1, grid, grid, C): bilinear, half-pixel, no antialias.

    docs/fewshot.md §2.3.
    """
    return np.asarray(resize_bilinear(jnp.asarray(x), (grid, grid), axes=(1, 2)))


def resize_rel_pos(x: np.ndarray, length: int) -> np.ndarray:
    """(L, hd) -> (length, hd): linear along the length axis only (docs/fewshot.md §2.3)."""
    return np.asarray(resize_linear(jnp.asarray(x), length, axis=0))


def torch_default_init(
    shape: tuple[int, ...], fan_in: int | None, rng: np.random.Generator
) -> np.ndarray:
    """PyTorch-default init of a new head: Embedding N(0, 1) (fan_in None), Linear U(±1/√fan_in)."""
    if fan_in is None:
        return rng.standard_normal(shape).astype(np.float32)
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def adapt_sam(model: Sam, cfg: SamConfig, reinit_heads: bool = False, seed: int = 0) -> Sam:
    """A copy of a converted SAM for another input size or number of mask tokens.

    docs/fewshot.md §2.3.

    `pos_embed` is resized bilinearly and the global blocks' rel-pos tables linearly (half-pixel,
    no antialias); with `reinit_heads` (or a different number of mask tokens) the mask tokens,
    hypernetwork MLPs and IoU head get a fresh PyTorch-default init. Everything else must match.

    Raises:
        CheckpointError: a parameter whose shape cannot be adapted.
    """
    source = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    graphdef, target = nnx.split(abstract_sam(cfg))
    heads = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")
    flat_target = list(nnx.to_flat_state(target))
    shapes = {p: tuple(v.shape) for p, v in flat_target}
    rng = np.random.default_rng(seed)
    values, errors = {}, []
    for path, var in flat_target:
        shape = tuple(var.shape)
        x = source.get(path)
        is_head = path[0] == "mask_decoder" and path[1] in heads
        if x is not None and x.shape == shape and not (reinit_heads and is_head):
            values[path] = x
        elif is_head:
            fan_in = None if path[-1] == "weight" else shapes[(*path[:-1], "kernel")][0]
            values[path] = torch_default_init(shape, fan_in, rng)
        elif x is not None and path == ("image_encoder", "pos_embed"):
            values[path] = resize_pos_embed(x, cfg.grid_size)
        elif x is not None and path[-1] in ("rel_pos_h", "rel_pos_w") and x.shape[1:] == shape[1:]:
            values[path] = resize_rel_pos(x, shape[0])
        else:
            errors.append(
                f"{'.'.join(map(str, path))}: {None if x is None else x.shape} -> {shape}"
            )
    if errors:
        raise CheckpointError("cannot adapt SAM: " + "; ".join(errors))
    flat = [(p, v.replace(jax.device_put(values[p]))) for p, v in flat_target]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_params(path: str | os.PathLike, nested: dict) -> None:
    """Writes a nested dict of arrays as an Orbax checkpoint at `path` (must not exist).

    Raises:
        OSError: the write failed (disk full, no permission, ...).
    """
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(Path(path).absolute(), nested)
        checkpointer.wait_until_finished()
    except ValueError as e:  # tensorstore reports I/O errors as ValueError
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
        raise OSError(first_line(e)) from None
    finally:
        checkpointer.close()  # no write goes on in the background after a failure or Ctrl-C


def _json_type(value: object) -> str:
    names = {dict: "an object", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {value}"
    return names.get(type(value), type(value).__name__)


def _scalar(field: str, label: str, kind: type, value: object, where: Path):
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise CheckpointError(
            where, f"model.{label}: expected {kind.__name__}, got {_json_type(value)}"
        )
    if kind is int and value < (0 if field in MAY_BE_ZERO else 1):
        need = "0 or more" if field in MAY_BE_ZERO else "positive"
        raise CheckpointError(where, f"model.{label}: {value}, must be {need}")
    if kind is float and field != "pixel_mean" and value <= 0:
        raise CheckpointError(where, f"model.{label}: {value}, must be positive")
    if field in CHOICES and value not in CHOICES[field]:
        raise CheckpointError(
            where, f"model.{label}: {value!r} is not one of {', '.join(CHOICES[field])}"
        )
    return float(value) if kind is float else value


def _field(name: str, kind: object, value: object, where: Path):
    if typing.get_origin(kind) is not tuple:
        return _scalar(name, name, kind, value, where)
    args = typing.get_args(kind)
    length = None if args[-1] is Ellipsis else len(args)
    length = TINY_VIT_LENGTHS.get(name, length)
    if not isinstance(value, list) or (length is not None and len(value) != length):
        count = f"{length} " if length is not None else ""
        raise CheckpointError(
            where,
            f"model.{name}: expected a list of {count}{args[0].__name__}, got {_json_type(value)}",
        )
    return tuple(_scalar(name, f"{name}[{i}]", args[0], v, where) for i, v in enumerate(value))


def config_from_dict(model: object, where: str | os.PathLike) -> SamConfig:
    """The SamConfig of config.json's `model`, checked: every field, of its type and range.

    Args:
        model: the parsed `model` object.
        where: the config file, for the messages.

    Raises:
        CheckpointError: not an object, an unknown or missing field, a wrong type, a value out of
            range, or sizes that do not fit together.
    """
    where = Path(where)
    if not isinstance(model, dict):
        raise CheckpointError(where, f"'model' is {_json_type(model)}, not an object")
    fields = {f.name: f.type for f in dataclasses.fields(SamConfig)}
    unknown = sorted(str(k) for k in model if k not in fields)
    if unknown:
        raise CheckpointError(where, f"model has unknown key(s) {', '.join(unknown[:5])}")
    missing = [name for name in fields if name not in model]
    if missing:
        raise CheckpointError(
            where,
            f"model lacks {', '.join(missing[:5])} (re-convert the checkpoint; {CONVERT_HINT})",
        )
    cfg = SamConfig(
        **{name: _field(name, kind, model[name], where) for name, kind in fields.items()}
    )
    problems = []
    if cfg.encoder == "vit" and cfg.image_size % cfg.patch_size:
        problems.append(
            f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"
        )
    if cfg.encoder_embed_dim % cfg.encoder_num_heads:
        problems.append(
            f"encoder_embed_dim {cfg.encoder_embed_dim} is not a multiple of "
            f"encoder_num_heads {cfg.encoder_num_heads}"
        )
    if cfg.prompt_embed_dim % cfg.decoder_num_heads:
        problems.append(
            f"prompt_embed_dim {cfg.prompt_embed_dim} is not a multiple of "
            f"decoder_num_heads {cfg.decoder_num_heads}"
        )
    outside = [i for i in cfg.encoder_global_attn_indexes if i >= cfg.encoder_depth]
    if outside:
        problems.append(f"encoder_global_attn_indexes {outside} are not below encoder_depth")
    if problems:
        raise CheckpointError(where, "model: " + "; ".join(problems))
    return cfg


def read_sam_config(sam_dir: str | os.PathLike) -> tuple[SamConfig, dict]:
    """Reads and checks `config.json` of a converted SAM directory: (SamConfig, full metadata).

    Raises:
        CheckpointError: not a converted directory, unreadable or invalid JSON, not an object, a
            wrong format tag, or a `model` that `config_from_dict` refuses.
    """
    sam_dir = Path(sam_dir)
    cfg_path = sam_dir / CONFIG_FILE
    if not sam_dir.is_dir():
        problem = "is a file, not a directory" if sam_dir.exists() else "no such directory"
        raise CheckpointError(sam_dir, f"{problem} ({CONVERT_HINT})")
    found = {CONFIG_FILE: cfg_path.is_file(), f"{PARAMS_DIR}/": (sam_dir / PARAMS_DIR).is_dir()}
    if not all(found.values()):
        lacking = " or ".join(name for name, ok in found.items() if not ok)
        raise CheckpointError(
            sam_dir, f"not a converted SAM directory (no {lacking}; {CONVERT_HINT})"
        )
    try:
        meta = json.loads(cfg_path.read_bytes())
    except OSError as e:
        raise CheckpointError(cfg_path, f"cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        raise CheckpointError(cfg_path, f"invalid JSON ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(cfg_path, f"holds {_json_type(meta)}, not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(cfg_path, f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if "model" not in meta:
        raise CheckpointError(cfg_path, "has no 'model' (the SamConfig)")
    if not isinstance(meta.get("source", {}), dict):
        raise CheckpointError(cfg_path, f"'source' is {_json_type(meta['source'])}, not an object")
    return config_from_dict(meta["model"], cfg_path), meta


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _open_params(params_path: Path) -> dict:
    """Every stored array of `params/`, opened (metadata read, no values): dotted name -> store."""
    context = ts.Context()
    kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{params_path}/"}}
    try:
        keys = ts.KvStore.open(kvstore, context=context).result().list().result()
    except ValueError as e:
        raise CheckpointError(
            params_path, f"cannot be listed, truncated or corrupt ({first_line(e)})"
        ) from None
    suffix = b"/.zarray"
    names = sorted(k[: -len(suffix)].decode(errors="replace") for k in keys if k.endswith(suffix))
    if not names:
        raise CheckpointError(params_path, "holds no arrays (empty or damaged)")
    # All opens are issued before the first is awaited: tensorstore runs them concurrently.
    opening = {
        name: ts.open(
            {"driver": "zarr", "kvstore": {**kvstore, "path": f"{name}/"}}, read=True,
            context=context,
        )
        for name in names
    }  # fmt: skip
    stores = {}
    for name, future in opening.items():
        try:
            stores[name] = future.result()
        except ValueError as e:
            raise CheckpointError(
                params_path, f"{name} cannot be opened, truncated or corrupt ({first_line(e)})"
            ) from None
    return stores


def _check_stored(sam_dir: Path, expected: dict, stores: dict, zero_filled: set) -> None:
    """Every array config.json's model has is stored with its shape and dtype, and nothing else."""
    problems = []
    for name, var in expected.items():
        if name in stores:
            store = stores[name]
            stored = (tuple(store.shape), np.dtype(store.dtype.numpy_dtype))
            if stored != (tuple(var.shape), np.dtype(var.dtype)):
                problems.append(
                    f"{name} is {stored[1]}{list(stored[0])}, the config needs "
                    f"{np.dtype(var.dtype)}{list(var.shape)}"
                )
    problems += [f"{n} is missing" for n in expected if n not in stores and n not in zero_filled]
    problems += [f"{n} is not in the model" for n in stores if n not in expected]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            sam_dir, f"config.json does not match params/: {'; '.join(problems[:3])}{more}"
        )


def load_sam(sam_dir: str | os.PathLike, encoder_dtype: str | None = None) -> Sam:
    """Loads a SAM converted by `python -m weights_conversion sam` (torch is not needed).

    Args:
        sam_dir: the converted directory.
        encoder_dtype: optional compute dtype override of the frozen encoder ("bfloat16").

    Returns:
        the model, with float32 parameters.

    Raises:
        CheckpointError: a damaged directory (see `read_sam_config`), parameters that do not
            match config.json (missing, extra, other shape or dtype: the first few are named),
            unreadable (truncated, corrupt) or non-finite parameters.
    """
    sam_dir = Path(sam_dir)
    cfg, _ = read_sam_config(sam_dir)
    if encoder_dtype is not None:
        if encoder_dtype not in CHOICES["encoder_dtype"]:
            raise CheckpointError(
                "encoder_dtype", f"{encoder_dtype!r}: expected float32 or bfloat16"
            )
        cfg = dataclasses.replace(cfg, encoder_dtype=encoder_dtype)
    try:
        abstract_model = abstract_sam(cfg)
    except (ValueError, TypeError, ZeroDivisionError, IndexError, OverflowError) as e:
        # A config of valid fields whose sizes still do not make a model.
        raise CheckpointError(
            sam_dir / CONFIG_FILE, f"model does not build ({first_line(e)})"
        ) from None
    graphdef, state = nnx.split(abstract_model)
    flat = list(nnx.to_flat_state(state))
    expected = {_dotted(path): var for path, var in flat}
    params_path = (sam_dir / PARAMS_DIR).absolute()
    stores = _open_params(params_path)
    task = {n for n in expected if n.startswith(TASK_TABLE)}
    zero_filled = task if not task & set(stores) else set()
    _check_stored(sam_dir, expected, stores, zero_filled)
    values, bad = {}, []
    # Every read is issued before the first is awaited (concurrent, as the opens).
    reading = {name: stores[name].read() for name in expected if name not in zero_filled}
    for name, var in expected.items():
        if name in zero_filled:
            values[name] = np.zeros(var.shape, var.dtype)
            continue
        try:
            values[name] = np.asarray(reading[name].result())
        except ValueError as e:
            raise CheckpointError(
                params_path, f"{name} cannot be read, truncated or corrupt ({first_line(e)})"
            ) from None
        if not np.all(np.isfinite(values[name])):
            bad.append(name)
    if bad:
        raise CheckpointError(params_path, f"non-finite values in {', '.join(bad[:5])}")
    # device_put, not jnp.asarray (one XLA compile per distinct shape, see build_sam)
    filled = [(path, var.replace(jax.device_put(values[_dotted(path)]))) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def save_sam(model: Sam, cfg: SamConfig, sam_dir: str | os.PathLike, source: dict) -> None:
    """Writes `model` as a converted-SAM directory that `load_sam` reads (atomically).

    Args:
        model: the model (its full NNX state is saved).
        cfg: its config.
        sam_dir: output directory; must not exist or be empty.
        source: provenance recorded in config.json (e.g. {"file": ..., "sha256": ...}).

    Raises:
        CheckpointError: `sam_dir` exists and is not empty.
        WriteError: it cannot be written (nothing of it is left then).
    """
    sam_dir = Path(sam_dir).absolute()
    if sam_dir.exists() and not (sam_dir.is_dir() and not any(sam_dir.iterdir())):
        raise CheckpointError(sam_dir, "already exists")
    nested = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "source": source}
    try:
        if sam_dir.exists():
            sam_dir.rmdir()  # empty: replaced by the complete directory below
        with atomic_directory(sam_dir) as tmp:
            save_params(tmp / PARAMS_DIR, nested)
            write_json(tmp / CONFIG_FILE, meta)
    except WriteError:
        raise
    except OSError as e:  # from the params writer: disk full, ...
        raise WriteError(sam_dir, f"cannot write ({e.strerror or first_line(e)})", e) from None
