"""The SUM recipe end to end (`python -m amsam_jax.train --config train/configs/sum.py:smoke`):
artefacts, kill-and-resume equality, ablation configs, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import load_sam
from amsam_jax.data.synthetic import bundled_synthetic_dir, make_synthetic_dataset
from amsam_jax.refine import main as refine_main
from amsam_jax.sum.data import PseudoSet, Shapes, make_batch
from amsam_jax.sum.pseudo_labels import label_folder
from amsam_jax.sum.recipes import sum_no_task_prompt, sum_recipe, sum_vanilla
from amsam_jax.sum.trainer import step_config
from amsam_jax.train import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "train" / "configs" / "sum.py") + ":smoke"


def cmd(workdir: Path, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "amsam_jax.train", "--config", SMOKE, "--workdir", str(workdir)]
    for s in sets:
        args += ["--set", s]
    return args


def leaves(sam_dir: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_sam(sam_dir)))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("sum") / "full"
    proc = subprocess.run(cmd(workdir), capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_smoke_run_writes_every_artefact(uninterrupted):
    w = uninterrupted
    records = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("human_loss", "pseudo_loss", "human_focal", "pseudo_dice", "pseudo_iou_mse"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert {r["human_first_prompt"] for r in records} <= {"box", "point"}
    # Pseudo-labels (automatic mask generator), refiner, maps, exported model, evaluation.
    assert len(list((w / "pseudo_labels").glob("*.json"))) == 8
    assert len(list((w / "pseudo_labels").glob("*.prob.npz"))) == 8
    assert (w / "refiner" / "refiner_sam" / "config.json").is_file()
    assert len(list((w / "refined").glob("*.refined.npz"))) == 8
    sam = load_sam(w / "sam_finetuned")
    table = np.asarray(sam.prompt_encoder.task_embeddings())
    assert np.all(table[0] == 0) and np.abs(table[1]).max() > 0  # salient row trained
    assert not table[2:].any()  # no entity/part data: untouched
    result = json.loads((w / "eval_interactive.json").read_text())
    assert len(result["task_0"]["miou"]) == 3 and result["task_0"]["num_masks"] == 2
    for f in ("curves.png", "clicks.png"):
        assert (w / "plots" / f).stat().st_size > 0
    summary = json.loads((w / "summary.json").read_text())
    assert "RANDOM" in summary["weights"] and summary["iterations"] == 8


# A SUM run killed at every stage in turn, each rerun dying at the next moment: during the
# pseudo-labelling, the refiner's training, the refined-map writing, the SUM iterations, a Ctrl-C,
# inside the export of the fine-tuned SAM (files written, folder not yet renamed), before the
# interactive evaluation and before the summary. tests/faults.py places each fault at the N-th
# call of a function, so every moment is hit every time. The last rerun must finish with the
# uninterrupted run's model and metrics, bitwise.
FAULTS = str(ROOT / "tests" / "faults.py")
MOMENTS = [
    ("pseudo_labelling", "amsam_jax.sum.pseudo_labels:write_annotations:3:after", -9),
    ("refiner_training", "amsam_jax.training.run:JsonlWriter.write:2:after", -9),
    ("refined_maps", "amsam_jax.sum.refiner:write_refined:3:after", -9),
    ("sum_iterations", "amsam_jax.sum.trainer:human_batch:3:after", -9),
    ("ctrl_c", "amsam_jax.sum.trainer:human_batch:2:sigint", 130),
    ("inside_the_export", "amsam_jax.sum.trainer:save_sam:1:after", -9),
    ("before_evaluation", "amsam_jax.sum.trainer:evaluate_interactive:1:before", -9),
    ("before_summary", "amsam_jax.training.run:Run.write_summary:1:before", -9),
]


@pytest.mark.slow
def test_killed_at_every_stage_in_turn_resumes_bitwise(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    argv = cmd(workdir)[3:]  # the CLI's arguments, after `python -m amsam_jax.train`
    for name, spec, code in MOMENTS:
        proc = subprocess.run([sys.executable, FAULTS, spec, "--", *argv], capture_output=True,
                              text=True, timeout=900, cwd=ROOT)  # fmt: skip
        assert proc.returncode == code, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert not (workdir / "summary.json").exists(), name
        if code == 130:
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith("error: SIGINT: stopped at iteration"), last
            assert "Traceback" not in proc.stderr
    resumed = subprocess.run(cmd(workdir), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, reference = leaves(workdir / "sam_finetuned"), leaves(uninterrupted / "sam_finetuned")
    assert len(ours) == len(reference)
    assert all(np.array_equal(a, b) for a, b in zip(ours, reference, strict=True))
    for name in ("metrics.jsonl", "refiner/metrics.jsonl"):
        steps = [json.loads(line)["step"] for line in (workdir / name).read_text().splitlines()]
        assert steps == sorted(set(steps)), name  # no duplicated or torn lines
    assert [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").open())] == list(
        range(1, 9)
    )
    ours_eval = json.loads((workdir / "eval_interactive.json").read_text())
    assert ours_eval == json.loads((uninterrupted / "eval_interactive.json").read_text())
    assert not list(workdir.glob(".sam_finetuned.tmp-*")), "the killed export's folder was left"
    again = subprocess.run(cmd(workdir), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_changed_config_on_existing_workdir_is_refused(uninterrupted, capsys):
    argv = ["--config", SMOKE, "--workdir", str(uninterrupted), "--set", "train.steps=9"]
    assert main(argv) == 2
    assert "different config" in capsys.readouterr().err


def test_ablation_recipes_switch_exactly_their_component():
    base, vanilla, no_tp = sum_recipe(), sum_vanilla(), sum_no_task_prompt()
    assert base.data.uncertainty == "refiner" and vanilla.data.uncertainty == "zeros"
    assert step_config(base).use_task_prompt and not step_config(no_tp).use_task_prompt
    for cfg in (vanilla, no_tp):  # everything else is the SUM recipe
        assert cfg.loss == base.loss and cfg.sam == base.sam and cfg.refine == base.refine
    assert vanilla.train == base.train and no_tp.data == base.data
    s = step_config(base)
    assert (s.num_point_rounds, s.num_mask_only_rounds, s.size) == (8, 2, 1024)
    assert (base.train.lr_pretrained, base.train.lr_task) == (1e-5, 1e-3)
    assert (base.data.min_ratio, base.data.max_num_mask, base.data.max_ratio) == (100, 40, 0.95)


def test_vanilla_pool_has_no_uncertainty(tmp_path):
    """U ≡ 0 for the Vanilla source: no refined maps are read and the batch says so."""
    images = bundled_synthetic_dir() / "train" / "images"
    label_folder(build_sam(SamConfig.tiny()), images, tmp_path, 4, say=lambda m: None,
                 pred_iou_thresh=0.0, stability_score_thresh=0.0)  # fmt: skip
    pool = PseudoSet(images, tmp_path, use_refined=False, size=256, min_ratio=1.0)
    entry = next(e for e in (pool.load(i, np.random.default_rng(0)) for i in range(8)) if e)
    assert entry.refined is None and entry.task == 0
    assert np.isfinite(entry.seed).all()  # SA-1B seed points are the backup points
    batch = make_batch([entry], np.zeros((1, 16, 16, 32), np.float32), Shapes(1, 4, 256, 64),
                       np.random.default_rng(0))  # fmt: skip
    assert not batch["has_refined"].any()
    # With maps required, an image without a refined file is skipped, not trained on as U = 0.
    strict = PseudoSet(images, tmp_path, tmp_path, use_refined=True, size=256, min_ratio=1.0)
    assert strict.load(0, np.random.default_rng(0)) is None
    assert "no refined maps" in next(iter(strict.skipped.values()))


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--config", SMOKE, "--workdir", str(tmp_path / "w1")]
    assert (
        main([*argv, "--set", f"data.unlabelled={empty}", "--set", "data.uncertainty=zeros"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and str(empty) in err
    data = tmp_path / "data"
    make_synthetic_dataset(data, n_train=2, n_test=1, seed=0, size=(40, 50))
    mask = sorted((data / "train" / "masks").iterdir())[0]
    mask.write_bytes(b"not a png")
    argv = ["--config", SMOKE, "--workdir", str(tmp_path / "w2")]
    assert main([*argv, "--set", f"data.labelled={data}:salient", "--set", "data.uncertainty=zeros",
                 "--set", f"data.unlabelled={empty}"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and ("empty" in err or mask.name in err)
    assert main([*argv, "--set", "data.labelled=/nonexistent:sky"]) == 2
    assert "unknown task 'sky'" in capsys.readouterr().err
    Image.new("RGB", (4, 4)).save(empty / "x.png")
    assert not (tmp_path / "w1" / "ckpt").exists()


@pytest.mark.slow
def test_refine_apply_cli_reproduces_the_runs_maps(uninterrupted, tmp_path, capsys):
    w = uninterrupted
    images = bundled_synthetic_dir() / "train" / "images"
    argv = ["apply", "--refiner", str(w / "refiner"), "--images", str(images)]
    argv += ["--labels", str(w / "pseudo_labels"), "--out", str(tmp_path), "--batch-masks", "4"]
    assert refine_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 8
    for ours in sorted(tmp_path.glob("*.refined.npz")):
        with np.load(ours) as a, np.load(w / "refined" / ours.name) as b:
            assert np.array_equal(a["prob"], b["prob"]) and a["prob"].dtype == np.uint8
            assert a["valid"].all()
    no_labels = ["apply", "--refiner", str(w / "refiner"), "--images", str(images)]
    assert refine_main([*no_labels, "--out", str(tmp_path)]) == 2  # no json next to the images
    assert "missing annotation file" in capsys.readouterr().err


def test_refiner_run_has_the_config_guard_and_resume_correct_metrics(tmp_path, capsys):
    workdir = tmp_path / "refiner"
    argv = ["train", "--config", SMOKE, "--workdir", str(workdir), "--set", "refine.steps=2"]
    assert refine_main([*argv, "--set", "train.checkpoint_every_s=0"]) == 0
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert refine_main([*argv, "--set", "train.checkpoint_every_s=0"]) == 0  # finished: no-op
    # A kill after step 2's metrics line but before the end: `latest` holds step 1, no summary.
    shutil.rmtree(workdir / "refiner_sam")
    (workdir / "summary.json").unlink()
    assert refine_main([*argv, "--set", "train.checkpoint_every_s=0"]) == 0
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # replayed, not duplicated
    capsys.readouterr()
    assert refine_main([*argv, "--set", "train.checkpoint_every_s=5"]) == 2
    assert "holds a run with a different config" in capsys.readouterr().err


@pytest.mark.slow
def test_sum_smoke_run_on_a_tiny_tinyvit_sam(tmp_path, capsys):
    """SUM end to end (automatic mask generator, refiner, interactive evaluation) on TinyViT."""
    workdir = tmp_path / "tv"
    argv = ["--config", SMOKE, "--workdir", str(workdir), "--set", "sam.model_type=tiny_vit"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "RANDOM tiny_vit WEIGHTS" in summary["weights"]
    assert len(list((workdir / "pseudo_labels").glob("*.json"))) == 8
    assert (workdir / "eval_interactive.json").is_file()
    sam = load_sam(workdir / "sam_finetuned")
    assert sam.image_encoder.__class__.__name__ == "TinyViT"
