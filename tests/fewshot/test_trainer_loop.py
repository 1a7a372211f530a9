"""The few-shot training loop: one compile of the epoch function and of the evaluation for a whole
run, the records it writes, and the per-iteration path of runs whose batches are ragged."""

import dataclasses
import json
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amsam_jax.evaluation import fewshot as evaluation
from amsam_jax.fewshot import trainer
from amsam_jax.fewshot.blo import HYPER_KEYS
from amsam_jax.fewshot.recipes import am_sam
from amsam_jax.utils import program_cache

ITERATION_KEYS = {
    "kind", "step", "epoch", "lower_loss", "upper_loss", "lower_lr", "upper_lr",
    "hypergradient_norm", "lower_grad_norm", "step_time_s",
}  # fmt: skip


def smoke(epochs: int, **train) -> trainer.FewShotConfig:
    cfg = am_sam("smoke")
    sets = {"epochs": epochs, "checkpoint_every_s": 0, "num_samples": 0, **train}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **sets))


@pytest.fixture
def counted(monkeypatch) -> dict:
    """The run's epoch and step functions and a fresh evaluation jit, kept for their caches."""
    seen = {}
    build_step = trainer.build_step

    def recording_build_step(*args, **kwargs):
        step, lower_tx, upper_tx = build_step(*args, **kwargs)
        seen["raw"] = step
        return step, lower_tx, upper_tx

    make_epoch = trainer.make_epoch

    def recording_make_epoch(step, mesh=None):
        seen["epoch"] = make_epoch(step, mesh)
        return seen["epoch"]

    monkeypatch.setattr(trainer, "build_step", recording_build_step)
    monkeypatch.setattr(trainer, "make_epoch", recording_make_epoch)
    predict = evaluation._predict

    def fresh_predict(*args):  # a new function object: jit caches are per function, and other
        return predict(*args)  # tests compile `_predict` for other shapes in this process

    seen["predict"] = jax.jit(fresh_predict, static_argnums=(0, 1))
    monkeypatch.setattr(evaluation, "_predict_jit", lambda: seen["predict"])
    return seen


@pytest.fixture
def traced(monkeypatch) -> list:
    """The name of the thread that traces the step, once per trace of it."""
    names = []
    build_step = trainer.build_step

    def counting_build_step(*args, **kwargs):
        step, lower_tx, upper_tx = build_step(*args, **kwargs)

        def counted_step(*a):
            names.append(threading.current_thread().name)
            return step(*a)

        return counted_step, lower_tx, upper_tx

    monkeypatch.setattr(trainer, "build_step", counting_build_step)
    return names


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_three_epochs_compile_the_epoch_and_the_evaluation_once(tmp_path, counted):
    summary = trainer.train(smoke(3), tmp_path / "run")
    assert summary["steps"] == 6  # 4 shots -> D1 of 2, batch 1: 2 iterations per epoch
    assert counted["epoch"]._cache_size() == 1  # 3 epochs, one compile
    assert counted["predict"]._cache_size() == 1  # 3 epoch-end evaluations + the final ones
    rows = records(tmp_path / "run")
    iterations = [r for r in rows if r["kind"] == "iteration"]
    assert [r["step"] for r in iterations] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in iterations] == [0, 0, 1, 1, 2, 2]
    assert all(set(r) == ITERATION_KEYS for r in iterations)
    assert iterations[0]["step_time_s"] == iterations[1]["step_time_s"] > 0  # the call's mean
    assert [r["step"] for r in rows if r["kind"] == "epoch"] == [2, 4, 6]


@pytest.mark.parametrize("model_type", ["tiny", "tiny_vit"])  # ViT and TinyViT embedding grids
def test_the_epoch_compiled_during_setup_is_the_one_the_loop_calls(tmp_path, caplog, traced,
                                                                   model_type):  # fmt: skip
    """`precompile_epoch` traces and compiles the epoch from the model's shapes while the weights
    load and the embeddings are computed: the step is traced and compiled once in the whole run,
    in that thread (a second trace would be the loop compiling the epoch again, e.g. for
    embeddings or parameters of other shapes than it assumed)."""
    cfg = smoke(2)
    cfg = dataclasses.replace(cfg, sam=dataclasses.replace(cfg.sam, model_type=model_type))
    jax.config.update("jax_log_compiles", True)  # process-wide: the thread's compile is logged
    try:
        with caplog.at_level(logging.WARNING):
            summary = trainer.train(cfg, tmp_path / "run")
    finally:
        jax.config.update("jax_log_compiles", False)
    assert summary["steps"] == 4 and traced == ["precompile-epoch"]
    # It was compiled from the model's shapes before the weights were loaded, once.
    compiles = [r for r in caplog.records if r.getMessage().startswith("Finished XLA compilation")]
    assert sum("jit(epoch)" in r.getMessage() for r in compiles) == 1


def test_weights_that_fail_to_load_cancel_the_epochs_compile(tmp_path, monkeypatch, caplog):
    """The epoch is traced from the model's shapes while the weights load; when they cannot be
    read, the error comes once the trace ends: no XLA compile of the epoch, no thread left."""

    def unreadable(cfg, located):
        raise trainer.TrainError("weights/params", "cannot be read, truncated or corrupt")

    monkeypatch.setattr(trainer, "load_located", unreadable)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(trainer.TrainError, match="corrupt"):
            trainer.train(smoke(2), tmp_path / "run")
    finally:
        jax.config.update("jax_log_compiles", False)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Finished tracing") and "epoch" in m for m in messages)
    assert not any(m.startswith("Finished XLA compilation of jit(epoch)") for m in messages)
    assert not [t for t in threading.enumerate() if t.name == "precompile-epoch"]


def test_the_evaluation_compiled_before_the_first_epoch_is_the_one_the_loop_calls(
    tmp_path, monkeypatch
):
    """`compile_evaluation` compiles D2's evaluation while the epoch's compile runs: the forward
    is traced once in the whole run (epoch-end and final evaluations), before the first epoch."""
    events = []
    predict = evaluation._predict

    def counted_predict(*args):
        events.append("evaluation traced")
        return predict(*args)

    fresh = jax.jit(counted_predict, static_argnums=(0, 1))
    monkeypatch.setattr(evaluation, "_predict_jit", lambda: fresh)
    run_iterations = trainer.run_iterations

    def recording_run_iterations(*args, **kwargs):
        events.append("epoch")
        return run_iterations(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_iterations", recording_run_iterations)
    summary = trainer.train(smoke(2), tmp_path / "run")
    assert summary["steps"] == 4
    assert events == ["evaluation traced", "epoch", "epoch"]


def test_checkpoint_every_splits_the_epoch_and_saves_mid_epoch(tmp_path, counted):
    workdir = tmp_path / "run"
    trainer.train(smoke(2, checkpoint_every=1, checkpoint_every_s=1000), workdir)
    assert counted["epoch"]._cache_size() == 1  # calls of one iteration each
    latest = workdir / "ckpt" / "latest"
    assert [p.name for p in latest.iterdir()] == ["4"]  # the last of the saves at 1, 2, 3, 4


def test_ragged_batches_take_one_jitted_step_per_iteration(tmp_path, counted):
    """6 shots -> D1 and D2 of 3 at batch 2: the second batch of each split is short."""
    cfg = smoke(2, batch_size=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shots=6))
    summary = trainer.train(cfg, tmp_path / "run")
    assert summary["steps"] == 4 and counted["epoch"]._cache_size() == 0
    iterations = [r for r in records(tmp_path / "run") if r["kind"] == "iteration"]
    assert [r["step"] for r in iterations] == [1, 2, 3, 4]
    assert all(set(r) == ITERATION_KEYS for r in iterations)


def test_runs_that_differ_only_in_hyperparameters_lower_one_program(tmp_path):
    """The schedules' and optimisers' numbers reach the step at run time (`Setup.hyper`), so a
    sweep over them (and over the epochs, which set the schedules' length) lowers one epoch
    program, which the persistent XLA cache then compiles once for all its runs; each run still
    trains with its own numbers. A structural setting (the Dice weight) is another program."""

    def lowered_and_lr(epochs=2, **train):
        setup = trainer.build_setup(smoke(epochs, **train), tmp_path / "run", quiet=True)
        assert set(setup.hyper) == set(HYPER_KEYS)
        batches = trainer.Batches.of(setup)
        idx = jnp.zeros((setup.iters_per_epoch,), jnp.int32)
        args = (setup.frozen, batches.d1, batches.d2, idx, idx, setup.hyper)
        text = setup.epoch_fn.lower(setup.initial, *args).as_text()
        _, metrics = setup.epoch_fn(setup.initial, *args)
        lower_lr, _, _ = trainer.schedules(setup.cfg, setup.total_steps)
        expected = [float(lower_lr(k)) for k in range(setup.iters_per_epoch)]
        np.testing.assert_allclose(np.asarray(metrics["lower_lr"]), expected, rtol=1e-6)
        return text, list(np.asarray(metrics["lower_lr"]))

    base, base_lr = lowered_and_lr()
    swept = dict(epochs=5, lower_lr=1e-3, upper_lr=3e-4, weight_decay=0.05, b1=0.8, b2=0.99,
                 eps=1e-6, power=1.0)  # fmt: skip
    other, other_lr = lowered_and_lr(**swept)
    assert other == base
    assert other_lr != base_lr
    assert lowered_and_lr(dice_weight=0.5)[0] != base


def test_a_kept_epoch_program_serves_the_next_run_without_its_trace(
    tmp_path, monkeypatch, caplog, counted, traced
):
    """With the compilation cache on, the epoch's traced program is kept on disk
    (`utils.program_cache`): a second run, here with other learning rates, loads it and traces
    no step. Within a run the epoch and D2's evaluation compile once (the kept program's results
    are committed to the device, and so is everything passed to it), and the kept program trains
    bitwise as the traced one."""
    monkeypatch.setitem(program_cache._state, "dir", tmp_path / "programs")

    def run(name, **train):
        traced.clear()
        caplog.clear()
        jax.config.update("jax_log_compiles", True)
        try:
            with caplog.at_level(logging.WARNING):
                trainer.train(smoke(2, **train), tmp_path / name)
        finally:
            jax.config.update("jax_log_compiles", False)
        messages = [r.getMessage() for r in caplog.records]
        compiles = [sum(m.startswith(f"Finished XLA compilation of jit({f})") for m in messages)
                    for f in ("epoch", "fresh_predict")]  # fmt: skip
        losses = [r["lower_loss"] for r in records(tmp_path / name) if r["kind"] == "iteration"]
        return list(traced), compiles, losses

    first = run("first")
    assert first[:2] == (["precompile-epoch"], [1, 1])
    assert len(list((tmp_path / "programs").glob("epoch-*.jaxexport"))) == 1
    second = run("second", lower_lr=1e-3, upper_lr=3e-4)
    assert second[0] == [] and second[1][0] <= 1  # loaded, not traced
    assert second[2] != first[2]  # its own learning rates
    monkeypatch.setitem(program_cache._state, "dir", None)
    plain = run("plain")
    assert plain[0] == ["precompile-epoch"]
    np.testing.assert_array_equal(first[2], plain[2])
