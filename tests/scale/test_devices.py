"""Four simulated CPU devices (docs/scale.md §2-3): the sharded SUM and few-shot steps, and a
few-shot training run, equal the single-device ones on the same global batch; a few-shot batch
that does not divide over the devices is refused in one line; a sharded embedding precompute and
the AMG write the same files as a single-device run.

One subprocess (`devices_worker.py`, `XLA_FLAGS=--xla_force_host_platform_device_count=4`) runs
everything once; each test checks one part of what it wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.sum.pseudo_labels import label_folder

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("devices_worker.py")


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("devices")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _states(worker: Path, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    arrays = np.load(worker / "steps.npz")
    one = [arrays[k] for k in sorted(arrays, key=_order) if k.startswith(f"{name}_1_")]
    four = [arrays[k] for k in sorted(arrays, key=_order) if k.startswith(f"{name}_4_")]
    return one, four


def _order(key: str) -> tuple[str, int]:
    head, i = key.rsplit("_", 1)
    return head, int(i)


def _relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """||a - b|| / ||a|| over every leaf of the state together."""
    x = np.concatenate([np.asarray(v, np.float64).ravel() for v in a])
    y = np.concatenate([np.asarray(v, np.float64).ravel() for v in b])
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


@pytest.mark.parametrize("name", ["sum", "fewshot"])
def test_sharded_step_equals_single_device_step(worker, name):
    """2 steps on the same global batches: the 4-device state within 1e-6 (relative, as a whole)
    of the 1-device one. Not bitwise: the per-device partial sums of the loss and gradients are
    added in another order, and Adam's m / sqrt(v) magnifies that noise on the gradient
    components that are near zero (~1e-5 relative on single leaves, ~5e-8 on the whole state)."""
    one, four = _states(worker, name)
    assert len(one) == len(four) > 4
    assert all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(one, four, strict=True))
    assert _relative(one, four) <= 1e-6
    assert max(float(np.abs(x - y).max()) for x, y in zip(one, four, strict=True)) <= 1e-5
    step = [x for x in one if x.dtype == np.int32 and x.shape == ()]
    assert step and all(int(s) == 2 for s in step)  # the step and the optimiser counts


def test_fewshot_trainer_on_four_devices_ends_at_the_single_device_state(worker):
    """The am_sam smoke recipe, 8 shots at batch 4, 2 epochs: the final checkpoint (LoRA, prompt,
    both optimisers, step) of `mesh.data=4` within 1e-6 of `mesh.data=1`'s, and each run wrote
    its metrics, summary and best checkpoint."""
    one, four = _states(worker, "trainer")
    assert len(one) == len(four) > 4
    assert all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(one, four, strict=True))
    assert _relative(one, four) <= 1e-6
    assert max(float(np.abs(x - y).max()) for x, y in zip(one, four, strict=True)) <= 1e-5
    assert any(x.dtype == np.int32 and x.shape == () and int(x) == 2 for x in one)
    for n in (1, 4):
        workdir = worker / f"fewshot_run_{n}_4"
        assert json.loads((workdir / "summary.json").read_text())["steps"] == 2
        assert (workdir / "ckpt" / "best").is_dir() and (workdir / "metrics.jsonl").is_file()


def test_fewshot_batch_that_does_not_divide_is_refused_naming_the_setting(worker):
    message = (worker / "fewshot_error.txt").read_text()
    assert message == (
        "train.batch_size: 2 does not divide over the 4 devices of the mesh (set mesh.data)"
    )
    assert not (worker / "fewshot_run_4_2").exists()  # refused before it wrote anything


def test_sharded_embedding_precompute_writes_the_single_device_files(worker):
    """6 images (not a multiple of 4: the last batch is padded) through 4 devices."""
    files_1 = sorted(p.relative_to(worker / "cache_1") for p in (worker / "cache_1").rglob("*.*"))
    files_4 = sorted(p.relative_to(worker / "cache_4") for p in (worker / "cache_4").rglob("*.*"))
    assert files_1 == files_4 and len([f for f in files_1 if f.suffix == ".npy"]) == 6
    for f in files_1:
        a, b = worker / "cache_1" / f, worker / "cache_4" / f
        if f.suffix == ".npy":
            np.testing.assert_allclose(np.load(a), np.load(b), rtol=1e-6, atol=1e-6)
        else:
            assert a.read_bytes() == b.read_bytes()


def test_amg_on_four_devices_writes_the_single_device_files(worker, tmp_path):
    images = bundled_synthetic_dir() / "test" / "images"
    out = tmp_path / "labels"
    label_folder(build_sam(SamConfig.tiny(), seed=0), images, out, 4, say=lambda m: None,
                 pred_iou_thresh=0.0, stability_score_thresh=0.0)  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (worker / "labels").iterdir())
    assert len([n for n in names if n.endswith(".json")]) == len(list(images.iterdir()))
    for n in names:
        assert (out / n).read_bytes() == (worker / "labels" / n).read_bytes(), n
