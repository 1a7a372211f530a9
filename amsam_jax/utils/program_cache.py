"""Traced and lowered programs kept across runs (`jax.export`), beside the persistent XLA cache.

The persistent XLA cache (`utils.runtime.enable_compilation_cache`) skips XLA's compile, but JAX
must still trace a program to look it up. For the few-shot epoch, whose exact hypergradient is
second-order AD, that trace is 1-3 s of Python in every warm run (docs/fewshot.md §5.7).
`CachedProgram` keeps the traced program, exported to StableHLO, in a folder next to the XLA
cache. A later run loads it instead of tracing, and XLA's cache then finds its compile.

An entry's key is the caller's `key` (everything about the configuration that may change the
trace), the argument shapes and dtypes, the source of the `amsam_jax` package, the versions of
JAX, jaxlib, Flax, Optax and NumPy, the backend and the JAX settings that change a trace. A
change to any of them traces again. An unreadable entry is traced again and rewritten.

The folder keeps the `KEPT` most recently used entries: every package edit or upgrade, and every
configuration outside a sweep's numbers, writes a new one (about 0.2 MB for the few-shot epoch),
so the oldest go when a new one is written. A loaded entry counts as used (its mtime is touched).
"""

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from amsam_jax.utils.io import atomic_write, ensure_folder

SUFFIX = ".jaxexport"
KEPT = 64  # entries kept per folder, the most recently used
_state = {"dir": None}  # set by `enable` (the XLA cache's sibling folder); None: off


def enable(xla_cache_dir: str | os.PathLike) -> None:
    """Keeps programs in `<xla_cache_dir>-programs` from now on (`enable_compilation_cache`)."""
    _state["dir"] = Path(f"{os.fspath(xla_cache_dir).rstrip(os.sep)}-programs")


def programs_dir() -> Path | None:
    """Where programs are kept, or None when the persistent compilation cache is off."""
    return _state["dir"]


@functools.cache
def _source_digest() -> str:
    root = Path(__file__).resolve().parents[1]  # the amsam_jax package
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _environment() -> str:
    import flax
    import jaxlib
    import numpy
    import optax

    flags = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
             "jax_threefry_partitionable", "jax_numpy_dtype_promotion")  # fmt: skip
    versions = [m.__version__ for m in (jax, jaxlib, flax, optax, numpy)]
    settings = [f"{f}={getattr(jax.config, f, None)}" for f in flags]
    return "|".join([*versions, jax.default_backend(), *settings, _source_digest()])


class CachedProgram:
    """What `jax.jit(fn, donate_argnums=0, compiler_options=...)` computes, for functions
    fn(state, *rest) -> (state', aux) with state' shaped as `state` and `aux` of dicts, lists and
    tuples of arrays, with its traced program kept in `directory` per argument shapes (see the
    module docstring). Calls and `lower` take the arguments `fn` takes; one device.

    An exported program's results are committed to their device, so every argument is committed
    to the default device before the call (and `lower`'s shapes carry that placement): the
    second call then finds the first one's compile. `place` commits arguments once, where a
    caller passes the same arrays to many calls.
    """

    def __init__(
        self, name: str, fn: Callable, key: str, directory: Path, compiler_options: dict | None
    ):
        self.name, self.fn, self.key, self.directory = name, fn, key, Path(directory)
        self.options = dict(compiler_options or {})
        self._programs: dict = {}
        self._lock = threading.Lock()
        self.placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(self, tree):
        """`tree` with every array committed to the programs' device (arrays that are stay)."""

        def one(x):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.placement)
            if isinstance(x, jax.Array) and x.committed:
                return x
            return jax.device_put(x, self.placement)

        return jax.tree.map(one, tree)

    def __call__(self, *args):
        call, state_tree = self._program(args)
        state_leaves, aux = call(*self.place(jax.tree.leaves(args)))
        return jax.tree.unflatten(state_tree, state_leaves), aux

    def lower(self, *args):
        call, _ = self._program(args)
        return call.lower(*self.place(jax.tree.leaves(args)))

    def _program(self, args: tuple) -> tuple[Any, Any]:
        leaves, tree = jax.tree.flatten(args)
        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        signature = (tree, tuple((s.shape, str(s.dtype)) for s in specs))
        with self._lock:
            if signature not in self._programs:
                state_tree = jax.tree.structure(args[0])

                def flat(*xs):
                    state, aux = self.fn(*jax.tree.unflatten(tree, xs))
                    return jax.tree.leaves(state), aux

                try:
                    exported = self._load_or_export(flat, specs, signature)
                    call = exported.call
                except Exception:  # a program JAX cannot export: traced in every run, as
                    call = flat  # without the cache (an error of `fn` itself shows here again)

                def program(*xs):
                    return call(*xs)

                program.__name__ = self.name
                donate = tuple(range(state_tree.num_leaves))
                jitted = jax.jit(program, donate_argnums=donate, compiler_options=self.options)
                self._programs[signature] = (jitted, state_tree)
            return self._programs[signature]

    def _load_or_export(self, flat: Callable, specs: list, signature: tuple):
        text = "\n".join([self.name, self.key, str(signature), _environment()])
        path = self.directory / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()}{SUFFIX}"
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception:  # missing, truncated or from another JAX: trace it again
            pass
        else:
            with contextlib.suppress(OSError):  # used now: the last to be evicted
                os.utime(path)
            return exported

        exported = jax.export.export(jax.jit(flat))(*specs)
        try:  # atomically: a killed run leaves no half-written entry
            atomic_write(ensure_folder(self.directory) / path.name, bytes(exported.serialize()))
        except OSError:  # an unwritable folder costs only the next run its trace
            pass
        else:
            evict(self.directory, KEPT)
        return exported


def evict(directory: Path, kept: int) -> None:
    """Removes all but the `kept` most recently used entries of `directory` (best effort: an
    entry another process removes or replaces meanwhile is skipped)."""

    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return float("inf")  # gone or replaced meanwhile: not ours to remove

    entries = sorted(Path(directory).glob(f"*{SUFFIX}"), key=used, reverse=True)
    for path in entries[kept:]:
        with contextlib.suppress(OSError):
            path.unlink()
