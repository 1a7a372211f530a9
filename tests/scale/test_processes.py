"""Two processes on 127.0.0.1 with `jax.distributed` and Gloo CPU collectives (docs/scale.md §4-5).

A few-shot smoke run on 2 processes runs to its end (process 0 alone writes the metrics and the
summary); the same run is killed the same way as the SUM one below after its second `latest`
save, process 0 stops with one line, and 1 process resumes it to the first run's final state.

A SUM smoke run on 2 processes checkpoints every iteration until process 1 is SIGKILLed after
its third `latest` save (tests/faults.py); process 0 must stop within the heartbeat timeout with
one line saying another process died, and the same command on 1 process resumes to the
uninterrupted 1-process run's parameters (within 1e-6: the first iterations ran on a 2-device
mesh, whose loss sums reduce in another order). A pseudo-labelling run on 2 processes is killed
the same way and finished by 1 process, which labels only what is missing.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from scale_checkpoints import final_leaves

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import load_sam
from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.sum.pseudo_labels import label_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FAULTS = str(ROOT / "tests" / "faults.py")
SMOKE = str(ROOT / "train" / "configs" / "sum_vanilla.py") + ":smoke"
FEWSHOT = str(ROOT / "train" / "configs" / "am_sam.py") + ":smoke"
PEER_LINE = "another process of this run stopped or cannot be reached"
HEARTBEAT_S = 10
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argvs: list[list[str]], env: dict) -> list[subprocess.CompletedProcess]:
    """Runs one command per process of one `jax.distributed` run; waits for all."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i, argv in enumerate(argvs):
        penv = {**env, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(len(argvs))}
        penv.update(JAX_PROCESS_ID=str(i), AMSAM_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S))
        procs.append(
            subprocess.Popen(
                argv, cwd=ROOT, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )  # fmt: skip
        )
    out = []
    for p, argv in zip(procs, argvs, strict=True):
        stdout, stderr = p.communicate(timeout=TIMEOUT_S)
        out.append(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "AMSAM_CACHE": str(tmp_path_factory.mktemp("embeddings")),
    }


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """The bundled images with pseudo-labels next to them: no AMG inside the SUM runs."""
    folder = tmp_path_factory.mktemp("pool") / "images"
    shutil.copytree(bundled_synthetic_dir() / "train" / "images", folder)
    label_folder(build_sam(SamConfig.tiny(), seed=0), folder, folder, 4, say=lambda m: None,
                 pred_iou_thresh=0.0, stability_score_thresh=0.0)  # fmt: skip
    return folder


def sum_argv(workdir: Path, pool: Path, *, fault: str | None = None) -> list[str]:
    if fault:
        head = [sys.executable, FAULTS, fault, "--"]
    else:
        head = [sys.executable, "-m", "amsam_jax.train"]
    argv = [*head, "--config", SMOKE, "--workdir", str(workdir)]
    # Every first prompt a point: one step kind to compile per process (the box kind's sharding
    # is the same; tests/sum covers it).
    sets = ("train.steps=5", "data.eval_split=", f"data.unlabelled={pool}",
            "train.p_first_is_point=1")  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    return argv


def leaves(sam_dir: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_sam(sam_dir)))]


def test_sum_two_processes_killed_stop_with_one_line_and_resume_on_one(tmp_path, env, pool):
    full = tmp_path / "full"
    # The uninterrupted run goes on beside the two processes (its own workdir and coordinator-
    # less: JAX_COORDINATOR_ADDRESS is only in their environment): the cores are shared, the
    # waits (compiles of one thread, the dead peer's detection) overlap.
    ref = subprocess.Popen(sum_argv(full, pool), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    work = tmp_path / "two"
    kill_p1 = "amsam_jax.training.run:Run.save:3:after:latest"
    p0, p1 = launch([sum_argv(work, pool), sum_argv(work, pool, fault=kill_p1)], env)
    _, ref_err = ref.communicate(timeout=TIMEOUT_S)
    assert ref.returncode == 0, ref_err[-3000:]
    assert p1.returncode == -9, p1.stderr[-2000:]
    assert p0.returncode == 3, p0.stderr[-3000:]
    assert PEER_LINE in p0.stderr and "Traceback" not in p0.stderr
    assert not (work / "summary.json").exists()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][:3] == [1, 2, 3]  # process 0 wrote them, once each

    resumed = subprocess.run(sum_argv(work, pool), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: from iteration 3" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    a, b = leaves(full / "sam_finetuned"), leaves(work / "sam_finetuned")
    assert len(a) == len(b) and not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # As in test_devices.py: within 1e-6 of the whole model, Adam's noise on single leaves.
    x = np.concatenate([np.asarray(v, np.float64).ravel() for v in a])
    y = np.concatenate([np.asarray(v, np.float64).ravel() for v in b])
    assert np.linalg.norm(x - y) / np.linalg.norm(x) <= 1e-6
    assert np.abs(x - y).max() <= 1e-5


def fewshot_argv(workdir: Path, *, fault: str | None = None) -> list[str]:
    """The am_sam smoke recipe (4 shots: D1 and D2 of 2) at batch 2: one step per epoch, a
    `latest` save at the end of each of its 3 epochs."""
    if fault:
        head = [sys.executable, FAULTS, fault, "--"]
    else:
        head = [sys.executable, "-m", "amsam_jax.train"]
    argv = [*head, "--config", FEWSHOT, "--workdir", str(workdir)]
    sets = ("train.epochs=3", "train.batch_size=2", "train.checkpoint_every_s=0",
            "train.num_samples=0")  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    return argv


def metric_steps(workdir: Path) -> list[tuple[str, int]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"]) for r in map(json.loads, lines)]


def test_fewshot_two_processes_finish_then_killed_stop_and_resume_on_one(tmp_path, env):
    full = tmp_path / "full"
    p0, p1 = launch([fewshot_argv(full), fewshot_argv(full)], env)
    assert p0.returncode == 0, p0.stderr[-3000:]
    assert p1.returncode == 0, p1.stderr[-3000:]
    # Process 0 alone prints the summary (Gloo's C++ prints a line of its own to stdout first).
    assert json.loads(p0.stdout[p0.stdout.index("{") :])["steps"] == 3 and "{" not in p1.stdout
    assert json.loads((full / "summary.json").read_text())["steps"] == 3
    per_epoch = [("iteration", k) for k in (1, 2, 3)], [("epoch", k) for k in (1, 2, 3)]
    assert metric_steps(full) == [x for pair in zip(*per_epoch, strict=True) for x in pair]
    assert (full / "plots" / "curves.png").is_file() and (full / "ckpt" / "best").is_dir()

    work = tmp_path / "two"
    kill_p1 = "amsam_jax.training.run:Run.save:2:after:latest"
    p0, p1 = launch([fewshot_argv(work), fewshot_argv(work, fault=kill_p1)], env)
    assert p1.returncode == -9, p1.stderr[-2000:]
    assert p0.returncode == 3, p0.stderr[-3000:]
    assert PEER_LINE in p0.stderr and "Traceback" not in p0.stderr
    assert not (work / "summary.json").exists()
    assert metric_steps(work)[:4] == metric_steps(full)[:4]  # epochs 1, 2; once each

    resumed = subprocess.run(fewshot_argv(work), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: from step 2 (epoch 2)" in resumed.stderr
    assert metric_steps(work) == metric_steps(full)
    a, b = final_leaves(full), final_leaves(work)
    assert len(a) == len(b) > 4 and any(x.shape == () and int(x) == 3 for x in b)
    # The last step ran on 1 device instead of 2: within 1e-6 of the whole state.
    x = np.concatenate([np.asarray(v, np.float64).ravel() for v in a])
    y = np.concatenate([np.asarray(v, np.float64).ravel() for v in b])
    assert np.linalg.norm(x - y) / np.linalg.norm(x) <= 1e-6
    assert np.abs(x - y).max() <= 1e-5


def test_pseudo_labels_two_processes_killed_then_finished_by_one(tmp_path, env):
    images = tmp_path / "images"
    shutil.copytree(bundled_synthetic_dir() / "train" / "images", images)
    out = tmp_path / "labels"
    base = [sys.executable, "-m", "amsam_jax.pseudo_labels", "--images", str(images), "--out",
            str(out), "--random-tiny", "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0"]  # fmt: skip
    # Process 1 dies after writing its second image's JSON (its last file of that image).
    kill = "amsam_jax.sum.pseudo_labels:label_image:2:after"
    p0, p1 = launch([base, [sys.executable, FAULTS, kill, "--", "-m", *base[2:]]], env)
    assert p1.returncode == -9, p1.stderr[-2000:]
    assert p0.returncode == 3, p0.stderr[-3000:]
    assert PEER_LINE in p0.stderr
    n = len(list(images.iterdir()))
    done = sorted(p.name for p in out.glob("*.json"))
    assert 2 < len(done) < n  # process 0 finished its half, process 1 two images of its half
    before = {name: (out / name).read_bytes() for name in done}

    one = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for name in done:
        assert f"skip {Path(name).stem}.png (done)" in one.stdout
        assert (out / name).read_bytes() == before[name]  # kept, not redone
    assert len(list(out.glob("*.json"))) == len(list(out.glob("*.prob.npz"))) == n

    reference = tmp_path / "reference"
    ref = subprocess.run([*base[:6], str(reference), *base[7:]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    for p in reference.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
