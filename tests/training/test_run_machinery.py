"""The run machinery every trainer shares: named-state checkpoints, the run directory, metrics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from amsam_jax.training.run import JsonlWriter, Run, TrainError
from amsam_jax.training.state import (
    StateError,
    clone_state,
    from_named,
    init_optimizer,
    restore_state,
    save_state,
    saved_step,
    to_named,
)


class Tiny(nnx.Module):
    def __init__(self):
        self.layers = nnx.List(
            [nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 1, rngs=nnx.Rngs(1))]
        )
        self.scale = nnx.Param(jnp.ones((2,)))


def make_state():
    params = nnx.state(Tiny(), nnx.Param)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    _, opt = tx.update(grads, opt, params)  # non-trivial moments and count
    return {"params": params, "opt": opt, "step": jnp.asarray(3, jnp.int32)}


def test_init_optimizer_and_clone_state_give_the_eager_values_in_new_buffers():
    params = nnx.state(Tiny(), nnx.Param)
    tx = optax.adamw(1e-3)
    jitted, eager = init_optimizer(tx, params), tx.init(params)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    state = make_state()
    before = [np.asarray(x).copy() for x in jax.tree.leaves(state)]
    clone = clone_state(state)
    jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(state)
    for x, kept in zip(jax.tree.leaves(clone), before, strict=True):
        assert np.array_equal(np.asarray(x), kept)  # the clone survived the donation


def test_named_leaves_are_paths_not_positions():
    named = to_named(make_state())
    assert set(named) == {"params", "opt", "step"}
    assert named["params"]["layers"]["0"]["kernel"].shape == (3, 2)
    mu = named["opt"]["0"]["mu"]  # optax's chain position, then the state's field names
    assert mu["layers"]["1"]["bias"].shape == (1,) and mu["scale"].shape == (2,)
    leaves = jax.tree.leaves(named)
    assert not any(isinstance(k, str) and k.isdigit() and len(k) == 5 for k in named)  # no 00000
    assert len(leaves) == len(jax.tree.leaves(make_state()))


def test_save_restore_round_trip_is_bitwise_and_uncommitted(tmp_path):
    state = make_state()
    save_state(tmp_path, "latest", state, {"step": 3, "note": "x"})
    restored, meta = restore_state(tmp_path, "latest", make_state())
    assert meta == {"step": 3, "note": "x"} and saved_step(tmp_path, "latest") == 3
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and not a.committed
    assert restore_state(tmp_path, "best", make_state()) is None


def test_a_checkpoint_of_another_state_is_a_one_line_error_naming_the_leaf(tmp_path):
    save_state(tmp_path, "latest", make_state(), {"step": 3})
    other = make_state()
    other["params"]["scale"] = nnx.Param(jnp.ones((5,)))
    with pytest.raises(StateError, match=r"params/scale is float32\[2\], expected float32\[5\]"):
        restore_state(tmp_path, "latest", other)
    more = {**make_state(), "extra": jnp.zeros(2)}
    with pytest.raises(StateError, match="extra missing") as e:
        restore_state(tmp_path, "latest", more)
    assert "\n" not in str(e.value)


def test_a_save_at_an_existing_step_keeps_it_and_a_new_step_replaces_it(tmp_path):
    state = make_state()
    save_state(tmp_path, "best", state, {"step": 4})
    save_state(tmp_path, "best", clone_state(state), {"step": 4})  # a deterministic replay
    save_state(tmp_path, "best", state, {"step": 6})
    mngr = ocp.CheckpointManager((tmp_path / "ckpt" / "best").absolute())
    assert mngr.all_steps() == [6]
    mngr.close()


def test_from_named_rebuilds_the_template_structure():
    state = make_state()
    rebuilt = from_named(make_state(), to_named(state))
    assert jax.tree.structure(rebuilt) == jax.tree.structure(state)


def test_metrics_writer_keeps_records_up_to_the_resume_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6))
        + '{"step": 6, "lo'  # what a kill in mid-write leaves
    )
    writer = JsonlWriter(path, keep_until_step=3)
    assert [r["step"] for r in writer.records()] == [1, 2, 3]
    writer.write({"step": 4, "loss": 0.4})
    assert [r["step"] for r in JsonlWriter(path, keep_until_step=10).records()] == [1, 2, 3, 4]
    JsonlWriter(path, keep_until_step=None)  # a fresh run starts a fresh file
    assert not path.exists()


def test_run_refuses_another_config_once_it_has_started(tmp_path):
    run = Run(tmp_path / "w", {"lr": 1.0, "shape": (1, 2)})
    assert json.loads((tmp_path / "w" / "config.json").read_text()) == {"lr": 1.0, "shape": [1, 2]}
    Run(tmp_path / "w", {"lr": 2.0})  # nothing saved yet: the new config replaces the old
    Run(tmp_path / "w", {"lr": 1.0})
    run.save("latest", make_state(), {"step": 1})
    Run(tmp_path / "w", {"lr": 1.0})  # the same config resumes
    with pytest.raises(TrainError, match="holds a run with a different config"):
        Run(tmp_path / "w", {"lr": 2.0})
    (tmp_path / "w" / "config.json").write_text('{"lr": ')
    with pytest.raises(TrainError, match="config.json: unreadable"):
        Run(tmp_path / "w", {"lr": 1.0})


def test_a_setting_added_since_the_run_began_resumes_at_its_default_only(tmp_path):
    defaults = {"train": {"lr": 0.1, "epochs": 10}, "data": {"num_classes": 1, "shots": 2}}
    old = {"train": {"lr": 1.0}, "data": {"shots": 8}}  # written before epochs/num_classes existed
    run = Run(tmp_path / "w", old)
    run.save("latest", make_state(), {"step": 1})
    new = {"train": {"lr": 1.0, "epochs": 10}, "data": {"num_classes": 1, "shots": 8}}
    Run(tmp_path / "w", new, defaults=defaults)  # both added settings at their defaults
    assert json.loads((tmp_path / "w" / "config.json").read_text()) == new
    moved = {"train": {"lr": 1.0, "epochs": 10}, "data": {"num_classes": 3, "shots": 8}}
    with pytest.raises(
        TrainError, match=r"different config \(data.num_classes: 1 in the workdir, 3 now\)"
    ):
        Run(tmp_path / "w", moved, defaults=defaults)
    (tmp_path / "w" / "config.json").write_text(json.dumps(old))
    with pytest.raises(TrainError, match=r"data.num_classes: not in the workdir's config, 3 now"):
        Run(tmp_path / "w", moved, defaults=defaults)  # added, but not at its default
    with pytest.raises(TrainError, match=r"data.num_classes: not in the workdir"):
        Run(tmp_path / "w", new)  # without defaults an added setting is a difference
    (tmp_path / "w" / "config.json").write_text(json.dumps(new))
    with pytest.raises(TrainError, match=r"train.lr: 1.0 in the workdir, 2.0 now"):
        Run(tmp_path / "w", {**new, "train": {"lr": 2.0, "epochs": 10}}, defaults=defaults)


def test_nan_stop_names_the_checkpoint_that_really_exists(tmp_path):
    run = Run(tmp_path / "w", {"a": 1})
    run.check_finite({"loss": 1.0}, "step 0")
    with pytest.raises(TrainError, match="non-finite loss at step 2.*no checkpoint was saved yet"):
        run.check_finite({"loss": float("nan")}, "step 2")
    run.save("latest", make_state(), {"step": 3})
    with pytest.raises(TrainError, match=r"last good checkpoint is .*ckpt/latest \(step 3\)"):
        run.check_finite({"loss": float("inf")}, "step 5")


def test_save_latest_is_timed_unless_forced(tmp_path):
    run = Run(tmp_path / "w", {"a": 1}, checkpoint_every_s=3600)
    assert not run.save_latest(make_state(), {"step": 1})
    assert run.save_latest(make_state(), {"step": 2}, force=True)
    assert saved_step(tmp_path / "w", "latest") == 2
    assert Run(tmp_path / "w2", {"a": 1}, checkpoint_every_s=0).save_latest(
        make_state(), {"step": 1}
    )


@pytest.mark.parametrize("background", [False, True])
def test_best_is_held_and_written_with_the_next_latest_final_stop_or_nan(tmp_path, background):
    ckpt = tmp_path / "w" / "ckpt"
    run = Run(tmp_path / "w", {"a": 1}, checkpoint_every_s=3600, background_saves=background)
    state = make_state()
    run.save_best(state, {"step": 1})
    state["step"] = state["step"] + 1  # a later step must not change the held copy
    run.save_best(make_state(), {"step": 2})  # replaces the first: one write for both
    assert not run.save_latest(state, {"step": 2})  # not due: nothing is written
    assert not (ckpt / "best").exists()
    run.save("latest", state, {"step": 3})
    run.wait_for_saves()
    assert saved_step(tmp_path / "w", "best") == 2
    assert saved_step(tmp_path / "w", "latest") == 3
    restored, meta = restore_state(tmp_path / "w", "best", make_state())
    assert int(restored["step"]) == 3 and meta["step"] == 2  # the held state, its own meta

    run.save_best(state, {"step": 4})
    run.save("final", state, {"step": 4})
    run.wait_for_saves()
    assert saved_step(tmp_path / "w", "best") == 4

    run.save_best(state, {"step": 5})
    with pytest.raises(TrainError, match="non-finite"):
        run.check_finite({"loss": float("nan")}, "step 6")
    assert saved_step(tmp_path / "w", "best") == 5

    run.save_best(state, {"step": 7})
    run.wait_for_saves()
    assert saved_step(tmp_path / "w", "best") == 7
