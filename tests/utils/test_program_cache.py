"""utils.program_cache: traced programs kept on disk, keyed by everything that changes a trace."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amsam_jax.utils import program_cache


def stateful(traces: list):
    def fn(state, x, hyper):
        traces.append(1)
        new = {"w": state["w"] * hyper["lr"] + x.sum(), "k": state["k"] + 1}
        return new, {"loss": jnp.stack([new["w"].mean(), x.max()])}

    return fn


def args(n=3):
    state = {"w": jnp.arange(n, dtype=jnp.float32), "k": jnp.asarray(0, jnp.int32)}
    return state, jnp.ones((2, n), jnp.float32), {"lr": jnp.asarray(0.5, jnp.float32)}


def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_a_kept_program_computes_what_jit_does_and_loads_without_a_trace(tmp_path):
    traces = []
    fn = stateful(traces)
    expected = jax.jit(fn)(*copy(args()))
    first = program_cache.CachedProgram("toy", fn, "key", tmp_path, None)
    got = first(*copy(args()))
    assert len(traces) == 2 and len(list(tmp_path.glob("toy-*.jaxexport"))) == 1  # jit + export
    # A new instance is what the next run has: it loads the program and does not trace `fn`.
    again = program_cache.CachedProgram("toy", fn, "key", tmp_path, None)
    for result in (got, again(*copy(args()))):
        assert jax.tree.structure(result) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    assert len(traces) == 2
    state, _ = again(*again(*copy(args()))[0:1], *copy(args())[1:])  # its own results go back in
    assert int(state["k"]) == 2 and len(traces) == 2
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("change", ["key", "shapes", "source"])
def test_anything_that_changes_the_trace_traces_again(tmp_path, monkeypatch, change):
    traces = []
    fn = stateful(traces)
    program_cache.CachedProgram("toy", fn, "key", tmp_path, None)(*args())
    assert len(traces) == 1
    key, n = "key", 3
    if change == "key":
        key = "another configuration"
    elif change == "shapes":
        n = 4
    else:
        monkeypatch.setattr(program_cache, "_source_digest", lambda: "edited source")
    program_cache.CachedProgram("toy", fn, key, tmp_path, None)(*args(n))
    assert len(traces) == 2 and len(list(tmp_path.glob("toy-*.jaxexport"))) == 2


def test_an_unreadable_entry_is_traced_again_and_rewritten(tmp_path):
    traces = []
    fn = stateful(traces)
    expected = program_cache.CachedProgram("toy", fn, "key", tmp_path, None)(*args())
    (entry,) = tmp_path.glob("toy-*.jaxexport")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    got = program_cache.CachedProgram("toy", fn, "key", tmp_path, None)(*args())
    assert len(traces) == 2 and entry.stat().st_size > 100
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_unwritable_folder_only_costs_the_next_run_its_trace(tmp_path):
    blocked = tmp_path / "a file"
    blocked.write_text("")
    traces = []
    program = program_cache.CachedProgram("toy", stateful(traces), "key", blocked / "x", None)
    state, _ = program(*args())
    assert int(state["k"]) == 1 and blocked.read_text() == ""


def test_lowering_from_shapes_is_the_compile_calls_find(tmp_path, caplog):
    """`lower` on shapes (a precompile) gives the program that calls with arrays then run: the
    arguments are committed to the device in both, so there is one XLA compile in all."""
    import logging

    program = program_cache.CachedProgram("toy_once", stateful([]), "key", tmp_path, None)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args())
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            program.lower(*shapes).compile()
            state, _ = program(*args())
            program(state, *args()[1:])  # committed results in, uncommitted arrays beside them
    finally:
        jax.config.update("jax_log_compiles", False)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("Finished XLA compilation of jit(toy_once)") for m in messages) == 1


def test_a_program_that_cannot_be_exported_is_traced_as_without_the_cache(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise NotImplementedError("serialization of host_callbacks is not yet implemented")

    monkeypatch.setattr(jax.export, "export", refuse)
    traces = []
    fn = stateful(traces)
    got = program_cache.CachedProgram("toy", fn, "key", tmp_path, None)(*copy(args()))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.jit(fn)(*args())), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.iterdir())


def test_enable_puts_programs_beside_the_xla_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(program_cache._state, "dir", None)
    program_cache.enable(str(tmp_path / "xla") + "/")
    assert program_cache.programs_dir() == tmp_path / "xla-programs"


def test_the_folder_keeps_the_most_recently_used_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(program_cache, "KEPT", 2)
    traces = []
    fn = stateful(traces)

    def run(n):
        program_cache.CachedProgram("toy", fn, "key", tmp_path, None)(*args(n))

    def entries():
        return sorted(tmp_path.glob("toy-*.jaxexport"))

    run(3)
    (first,) = entries()
    run(4)
    (second,) = set(entries()) - {first}
    os.utime(first, (1.0, 1.0))  # the older one, long unused ...
    os.utime(second, (2.0, 2.0))
    run(3)  # ... until loaded again, without a trace: now the most recent
    assert len(traces) == 2 and first.stat().st_mtime > 1.0
    run(5)  # a third entry: the least recently used one (n = 4) goes
    assert len(traces) == 3 and len(entries()) == 2 and first in entries()
    assert second not in entries()
    run(3)
    assert len(traces) == 3
    run(4)
    assert len(traces) == 4  # evicted, so traced again
