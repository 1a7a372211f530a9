"""Evaluation of a run's checkpoints: `evaluate_workdir`, the CLI, its one-line errors.

The workdir tests share one smoke training run (slow tier: its step compiles for ~1.5 min cold).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from smoke_workdir import smoke_workdir

import amsam_jax
from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.evaluation.fewshot import evaluate_fewshot


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return smoke_workdir(tmp_path_factory)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amsam_jax.evaluate", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )


def test_package_exports_evaluate_fewshot_and_evaluate_workdir_apart_from_the_cli_module():
    import amsam_jax.evaluate as cli  # the CLI module no longer shadows a function of that name

    assert amsam_jax.evaluate_fewshot is evaluate_fewshot
    assert callable(amsam_jax.evaluate_workdir) and callable(cli.main)
    assert {"evaluate_fewshot", "evaluate_workdir"} <= set(amsam_jax.__all__)


@pytest.mark.slow
def test_evaluate_workdir_on_d2_reproduces_the_runs_final_d2_dice(workdir):
    """The run's D2 images scored through evaluate_workdir (cache, SAM, preprocessing) agree
    with the trainer's own end-of-run D2 evaluation."""
    summary = json.loads((workdir / "summary.json").read_text())
    result = amsam_jax.evaluate_workdir(workdir, "final", split="train", overlays=0)
    d2 = [r["dice"] for r in result["per_image"] if r["stem"] in ("scene_002", "scene_003")]
    assert len(result["per_image"]) == 8 and len(d2) == 2
    np.testing.assert_allclose(np.mean(d2), summary["final_d2_dice"], rtol=0, atol=1e-9)
    assert result["checkpoint"] == "final" and result["split"] == "train"
    assert not (workdir / "eval_train").exists()


@pytest.mark.slow
def test_cli_writes_result_json_and_one_overlay_per_test_image(workdir):
    proc = run_cli("--workdir", str(workdir), "--checkpoint", "best")
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    printed = json.loads(proc.stdout)
    saved = json.loads((workdir / "eval_test.json").read_text())
    keys = {"dice", "iou", "dice_original", "checkpoint", "split", "data_dir", "weights"}
    assert keys <= set(printed) and keys | {"per_image"} <= set(saved)
    assert printed["dice"] == saved["dice"] and printed["images"] == 4
    assert saved["data_dir"] == str(bundled_synthetic_dir())
    assert np.isclose(saved["dice"], np.mean([r["dice"] for r in saved["per_image"]]))
    stems = sorted(r["stem"] for r in saved["per_image"])
    overlays = sorted(p.stem for p in (workdir / "eval_test").glob("*.png"))
    assert overlays == stems == ["scene_008", "scene_009", "scene_010", "scene_011"]
    panel = np.asarray(Image.open(workdir / "eval_test" / "scene_008.png"))
    assert panel.shape == (256, 3 * 256, 3)  # image | ground truth | prediction


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_2(workdir, tmp_path):
    assert "no such workdir" in one_line_error(run_cli("--workdir", str(tmp_path / "none")))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(workdir / "config.json", bare / "config.json")
    assert "no checkpoint" in one_line_error(run_cli("--workdir", str(bare)))
    bad_data = ["--workdir", str(workdir), "--data", str(tmp_path / "nodata")]
    assert "no such data folder" in one_line_error(run_cli(*bad_data))
    for sub in ("images", "masks"):
        (tmp_path / "empty" / "test" / sub).mkdir(parents=True)
    empty = ["--workdir", str(workdir), "--data", str(tmp_path / "empty")]
    assert "no images" in one_line_error(run_cli(*empty))
