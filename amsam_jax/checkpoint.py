"""Loading converted SAM weights (no torch) and saving/restoring parameter trees with Orbax."""

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from amsam_jax.build_sam import SamConfig, abstract_sam
from amsam_jax.modeling.common import resize_bilinear, resize_linear
from amsam_jax.modeling.sam import Sam
from amsam_jax.utils.errors import AmsamError

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
    flat = [(p, v.replace(jnp.asarray(values[p]))) for p, v in flat_target]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_params(path: str | os.PathLike, nested: dict) -> None:
    """Writes a nested dict of arrays as an Orbax checkpoint at `path` (must not exist)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), nested)
    checkpointer.wait_until_finished()


def read_sam_config(sam_dir: str | os.PathLike) -> tuple[SamConfig, dict]:
    """Reads `config.json` of a converted SAM directory: (SamConfig, full metadata)."""
    sam_dir = Path(sam_dir)
    cfg_path = sam_dir / CONFIG_FILE
    if not cfg_path.is_file() or not (sam_dir / PARAMS_DIR).is_dir():
        raise CheckpointError(
            f"{sam_dir}: not a converted SAM directory (needs {CONFIG_FILE} and {PARAMS_DIR}/; "
            "create one with `python -m weights_conversion sam CKPT OUT_DIR`)"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return SamConfig.from_dict(meta["model"]), meta


def load_sam(sam_dir: str | os.PathLike, encoder_dtype: str | None = None) -> Sam:
    """Loads a SAM converted by `python -m weights_conversion sam` (torch is not needed).

    Args:
        sam_dir: the converted directory.
        encoder_dtype: optional compute dtype override of the frozen encoder ("bfloat16").

    Returns:
        the model, with float32 parameters.
    """
    cfg, _ = read_sam_config(sam_dir)
    if encoder_dtype is not None:
        cfg = dataclasses.replace(cfg, encoder_dtype=encoder_dtype)
    abstract_model = abstract_sam(cfg)
    graphdef, state = nnx.split(abstract_model)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.to_pure_dict())
    params_path = (Path(sam_dir) / PARAMS_DIR).absolute()
    restored = _restore_params(params_path, target)
    bad = [
        ".".join(map(str, p))
        for p, x in jax.tree_util.tree_leaves_with_path(restored)
        if not np.all(np.isfinite(np.asarray(x)))
    ]
    if bad:
        raise CheckpointError(f"{params_path}: non-finite values in {', '.join(bad[:5])}")
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def _restore_params(params_path: Path, target: dict) -> dict:
    """Restores `target`; a directory written before the SUM task table existed gets zeros."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(params_path, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        task = target.get("prompt_encoder", {}).get("task_prompt_embedding")
        if task is not None:
            without = dict(target, prompt_encoder=dict(target["prompt_encoder"]))
            del without["prompt_encoder"]["task_prompt_embedding"]
            try:
                restored = checkpointer.restore(params_path, without)
            except (ValueError, KeyError, FileNotFoundError):
                pass
            else:
                restored["prompt_encoder"]["task_prompt_embedding"] = jax.tree.map(
                    lambda x: np.zeros(x.shape, x.dtype), task
                )
                return restored
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{params_path}: cannot restore ({first})") from None


def save_sam(model: Sam, cfg: SamConfig, sam_dir: str | os.PathLike, source: dict) -> None:
    """Writes `model` as a converted-SAM directory that `load_sam` reads.

    Args:
        model: the model (its full NNX state is saved).
        cfg: its config.
        sam_dir: output directory; must not exist or be empty.
        source: provenance recorded in config.json (e.g. {"file": ..., "sha256": ...}).
    """
    sam_dir = Path(sam_dir).absolute()
    if sam_dir.exists() and any(sam_dir.iterdir()):
        raise CheckpointError(f"{sam_dir}: already exists")
    nested = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    save_params(sam_dir / PARAMS_DIR, nested)
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "source": source}
    (sam_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
