"""A few-shot run killed or interrupted at any moment resumes to the uninterrupted result, bitwise.

Each case kills the smoke run at one exact moment (tests/faults.py places the SIGKILL at the N-th
call of a function, so the moment is hit every time, not by the luck of a sleep), then reruns
the same command and compares the final trainable state, the metrics file and the summary with
an uninterrupted run's. An epoch is one jitted call (`fewshot.trainer.run_iterations`) and
checkpoints are written in a background thread, so the moments are: inside the embedding cache
fill; between two epochs' calls (a `latest` save may still be in flight); amid the metrics records
of an epoch; mid-epoch between two calls of a `train.checkpoint_every=1` run; right after the
first `best` save is written, before any `latest` (with the default 30-s `latest` throttle, so the
rerun starts from scratch over an existing `best`); inside an Orbax save, after its files are
written and before the rename; before `final`; after `final` and before the summary; and a
Ctrl-C, which must stop at the epoch's end with one line, exit 130, and leave a resumable run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amsam_jax.fewshot.trainer import TRAINABLE, load_run_state
from amsam_jax.training.state import host_leaves

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "train" / "configs" / "am_sam.py") + ":smoke"
FAULTS = str(ROOT / "tests" / "faults.py")
ORBAX_FINALIZE = "orbax.checkpoint._src.path.atomicity:AtomicRenameTemporaryPath.finalize"
METRICS_WRITE = "amsam_jax.training.run:JsonlWriter.write"
EPOCH_CALL = "amsam_jax.fewshot.trainer:run_iterations"
SAVE_WRITTEN = "amsam_jax.training.run:save_state"  # what the background thread runs
EVERY_SAVE = ("train.checkpoint_every_s=0",)
STEPS = 12  # 6 epochs of the 2 D1 shots


def train_argv(workdir: Path, *sets: str) -> list[str]:
    argv = ["--config", SMOKE, "--workdir", str(workdir), "--set", "train.epochs=6"]
    for s in sets:
        argv += ["--set", s]
    return argv


def run(argv: list[str], env: dict, faults: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if faults:
        cmd = [sys.executable, FAULTS, *faults, "--", *argv]
    else:
        cmd = [sys.executable, "-m", "amsam_jax.train", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    # A cache of this module's own: the cache-fill moment really writes entries.
    return {**os.environ, "AMSAM_CACHE": str(tmp_path_factory.mktemp("embeddings"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> tuple[list[np.ndarray], dict]:
    workdir = tmp_path_factory.mktemp("ref") / "full"
    proc = run(train_argv(workdir, "train.checkpoint_every_s=0"), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, state, _ = load_run_state(workdir, "final")
    return host_leaves(state, TRAINABLE), json.loads((workdir / "summary.json").read_text())


def assert_resumes_to_reference(workdir: Path, sets: tuple[str, ...], env, reference):
    resumed = run(train_argv(workdir, *sets), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, state, _ = load_run_state(workdir, "final")
    ours, (theirs, summary) = host_leaves(state, TRAINABLE), reference
    assert len(ours) == len(theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    ours_summary = json.loads((workdir / "summary.json").read_text())
    for key in ("steps", "best_d2_dice", "final_d2_dice"):
        assert ours_summary[key] == summary[key], key
    steps = [
        json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == STEPS  # no duplicated or torn lines
    assert not list(workdir.rglob("*.orbax-checkpoint-tmp*")), "a temporary save was left"
    return resumed


MOMENTS = {
    # name: (faults.py spec, extra --set values)
    "embedding_cache_fill": ("amsam_jax.training.embedder:Embedder.encode:1:after", ()),
    "between_epochs": (f"{EPOCH_CALL}:3:before", EVERY_SAVE),
    "amid_an_epochs_records": (f"{METRICS_WRITE}:4:after", EVERY_SAVE),
    "mid_epoch": (f"{EPOCH_CALL}:4:before", ("train.checkpoint_every=1", *EVERY_SAVE)),
    "after_first_best_before_latest": (f"{SAVE_WRITTEN}:1:after:best", ()),
    "inside_an_orbax_save": (f"{ORBAX_FINALIZE}:3:before", EVERY_SAVE),
    "before_final": ("amsam_jax.training.run:Run.save:1:before:final", ()),
    "after_final_before_summary": ("amsam_jax.training.run:Run.write_summary:1:before", ()),
}  # fmt: skip


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_killed_at_a_moment_resumes_bitwise(moment, tmp_path, env, reference):
    spec, sets = MOMENTS[moment]
    workdir = tmp_path / "run"
    if moment == "embedding_cache_fill":  # an empty cache, so the encoder really runs
        env = {**env, "AMSAM_CACHE": str(tmp_path / "cache")}
    killed = run(train_argv(workdir, *sets), env, faults=(spec,))
    assert killed.returncode == -9, f"the fault did not fire: {killed.stderr[-2000:]}"
    assert not (workdir / "summary.json").exists()
    if moment == "after_first_best_before_latest":  # the window of a run that could not resume
        assert (workdir / "ckpt" / "best").is_dir() and not (workdir / "ckpt" / "latest").exists()
    resumed = assert_resumes_to_reference(workdir, sets, env, reference)
    if moment == "after_final_before_summary":
        assert "resume: from step 12" in resumed.stderr


def test_ctrl_c_stops_with_one_line_and_resumes_bitwise(tmp_path, env, reference):
    workdir = tmp_path / "run"
    sets = ("train.checkpoint_every_s=1000",)  # `latest` comes from the interrupt itself
    stopped = run(
        train_argv(workdir, *sets),
        env,
        faults=(f"{METRICS_WRITE}:4:sigint",),
    )
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    # The signal came amid epoch 2's records: the run stops at that epoch's end.
    assert last.startswith("error: SIGINT: stopped at step 4 (end of epoch 2)"), last
    assert "run the same command" in last and str(workdir / "ckpt" / "latest") in last
    resumed = assert_resumes_to_reference(workdir, sets, env, reference)
    assert "resume: from step 4" in resumed.stderr


def test_rerun_of_a_finished_run_says_complete_and_changes_nothing(tmp_path, env, reference):
    workdir = tmp_path / "run"
    first = run(train_argv(workdir), env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    again = assert_resumes_to_reference(workdir, (), env, reference)
    assert "already complete" in again.stderr
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
