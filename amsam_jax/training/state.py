"""Saving and restoring a run's state: named pytrees as Orbax checkpoints `ckpt/<kind>/<step>`.

A state is a dict of pytrees (NNX states of the trainable parameters, Optax optimiser states, the
step counter). On disk every leaf is named by its path in that dict (`lower_opt/0/mu/mask_decoder/
.../kernel`), never by its position in a flattened list, so a changed optimiser or parameter set
is a clear error instead of a silent mix-up.
"""

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from amsam_jax.utils.errors import AmsamError, first_line

CKPT_DIR = "ckpt"


class StateError(AmsamError):
    """A checkpoint that cannot be restored into the run's state; one line naming it."""


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    raise TypeError(f"unsupported pytree key {key!r}")


def _leaf_names(tree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = []
    for path, _ in flat:
        name = tuple(_key_name(k) for k in path)
        if len(name) > 1 and name[-1] == "value":  # an NNX Variable's payload
            name = name[:-1]
        names.append(name)
    return names, [x for _, x in flat], treedef


def to_named(tree) -> dict:
    """A pytree as a nested dict of host arrays keyed by the names of its paths."""
    names, leaves, _ = _leaf_names(tree)
    out: dict = {}
    for name, leaf in zip(names, leaves, strict=True):
        node = out
        for part in name[:-1]:
            node = node.setdefault(part, {})
        if name[-1] in node:
            raise ValueError(f"two leaves named {'/'.join(name)}")
        node[name[-1]] = np.asarray(leaf)
    return out


def from_named(template, named: dict, where: str = "checkpoint"):
    """The pytree `template` with every leaf replaced by the array of the same name in `named`.

    Raises:
        StateError: a leaf of the template is missing from `named` or has another shape/dtype.
    """
    names, leaves, treedef = _leaf_names(template)
    out, problems = [], []
    for name, leaf in zip(names, leaves, strict=True):
        node = named
        for part in name:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:
            problems.append(f"{'/'.join(name)} missing")
            continue
        value = np.asarray(node)
        if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
            problems.append(
                f"{'/'.join(name)} is {value.dtype}{list(value.shape)}, expected "
                f"{np.asarray(leaf).dtype}{list(np.shape(leaf))}"
            )
            continue
        out.append(jax.device_put(value))  # not jnp.asarray: no compile per shape
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise StateError(
            where, "does not match this run's state: " + "; ".join(problems[:3]) + more
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def clone_state(state):
    """A copy of a state's arrays that survives donation of the original buffers.

    `jax.device_put(..., may_alias=False)` copies buffer to buffer; `jnp.array(x, copy=True)`
    would compile one small XLA program per distinct shape first (~15 ms each on 2 CPU cores).
    An array that spans several processes keeps its sharding (each copies its own shards); any
    other stays as committed to its device as it was, so a jitted function called with the copy
    finds the compile it made for the original.
    """

    def copy(x):
        spans = isinstance(x, jax.Array) and not x.is_fully_addressable
        return jax.device_put(x, x.sharding if spans else None, may_alias=False)

    return jax.tree.map(copy, state)


def init_optimizer(tx, params):
    """`tx.init(params)` as one jitted program. Run eagerly, Optax's per-leaf `zeros_like`
    compiles one small XLA program per distinct parameter shape (~35 ms each on 2 CPU cores):
    0.5 s for the few-shot state, more for SUM's decoder. The values are the same."""
    return jax.jit(tx.init)(params)


def host_copy(state):
    """The state as host NumPy copies: a snapshot that later steps (which donate and overwrite
    the device buffers) cannot change, e.g. for a checkpoint written in the background."""
    return jax.tree.map(lambda x: np.array(x, copy=True), state)


def host_leaves(state: dict, names: tuple[str, ...]) -> list[np.ndarray]:
    """The leaves of `state[name]` for each name, as host arrays (for exact comparisons)."""
    return [np.asarray(x) for x in jax.tree.leaves(tuple(state[n] for n in names))]


def _manager(directory: Path, create: bool) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=create, enable_async_checkpointing=False
        ),
    )


def kind_dir(workdir: str | os.PathLike, kind: str) -> Path:
    """`workdir/ckpt/<kind>`."""
    return Path(workdir).absolute() / CKPT_DIR / kind


def saved_step(workdir: str | os.PathLike, kind: str) -> int | None:
    """The step of the complete checkpoint `kind`, or None when there is none."""
    directory = kind_dir(workdir, kind)
    if not directory.is_dir():
        return None
    mngr = _manager(directory, create=False)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def save_state(workdir: str | os.PathLike, kind: str, state: dict, meta: dict) -> None:
    """Writes `ckpt/<kind>/<meta["step"]>` synchronously: the named state plus JSON `meta`.

    Orbax writes into a temporary folder and renames it when complete, then deletes the older
    step, so a save killed at any moment leaves the previous checkpoint intact. A checkpoint of the
    same kind at the same step is kept as it is: every run here is a deterministic function of
    (config, step), so it already holds this state.
    """
    directory = kind_dir(workdir, kind)
    step = int(meta["step"])
    mngr = _manager(directory, create=True)
    try:
        if step in mngr.all_steps():
            return
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_named(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        mngr.wait_until_finished()
    finally:
        mngr.close()


def restore_state(
    workdir: str | os.PathLike, kind: str, template: dict
) -> tuple[dict, dict] | None:
    """Restores `ckpt/<kind>` into the structure of `template`.

    Arrays come back host-backed and uncommitted: Orbax returns device-committed arrays, which as
    step inputs would be two more jit cache entries (two extra compiles in every resumed run).

    Returns:
        (state, meta), or None when there is no complete checkpoint of that kind.

    Raises:
        StateError: the checkpoint is unreadable (truncated, corrupt) or holds another state.
    """
    directory = kind_dir(workdir, kind)
    if not directory.is_dir():
        return None
    mngr = _manager(directory, create=False)
    try:
        step = mngr.latest_step()
        if step is None:
            return None
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:  # truncated or corrupt files
            raise StateError(directory / str(step), _unreadable(e)) from None
    finally:
        mngr.close()
    where = directory / str(step)
    meta = restored["meta"]
    step_ok = isinstance(meta, dict) and type(meta.get("step")) is int and meta["step"] >= 0
    if not step_ok:
        raise StateError(
            where / "meta", f"{_DAMAGED}: not an object with a step (got {meta!r:.60})"
        )
    named = jax.tree.map(np.asarray, dict(restored["state"]))
    state = from_named(template, named, str(where))
    return state, dict(meta)


_DAMAGED = "a damaged checkpoint; remove this folder and rerun (the run then starts over)"


def _unreadable(error: BaseException, limit: int = 160) -> str:
    """`cannot restore (...)` with the cause's first line cut to `limit` characters (Orbax's
    and tensorstore's messages embed whole array specs)."""
    cause = first_line(error)
    if len(cause) > limit:
        cause = cause[: limit - 1] + "…"
    return f"cannot restore ({type(error).__name__}: {cause}); {_DAMAGED}"
