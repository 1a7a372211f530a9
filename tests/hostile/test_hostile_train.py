"""Hostile input to `python -m amsam_jax.train` and `python -m amsam_jax.refine`: config files,
`--set` values, workdirs and damaged workdir files. Each case fails with exit 2, one `error:`
line naming the file or setting, and nothing left behind (no workdir, no config.json)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import fails_cleanly

from amsam_jax.refine import main as refine_main
from amsam_jax.train import main

ROOT = Path(__file__).resolve().parents[2]
FEWSHOT = str(ROOT / "train" / "configs" / "am_sam.py") + ":smoke"
SUM = str(ROOT / "train" / "configs" / "sum.py") + ":smoke"


def config_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / "cfgs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


GOOD = "from amsam_jax.fewshot.recipes import am_sam\n\ndef get_config(arg=None):\n"

CONFIG_FILES = {
    # name: (file name, content, text the error must contain)
    "syntax_error": ("bad.py", "def get_config(:\n", "bad.py:1: syntax error"),
    "raises_on_import": ("boom.py", "raise RuntimeError('no GPU here')\n", "RuntimeError"),
    "missing_module": ("imp.py", "import not_a_module_anywhere\n", "not_a_module_anywhere"),
    "no_get_config": ("none.py", "X = 1\n", "defines no get_config()"),
    "get_config_not_callable": ("nc.py", "get_config = 3\n", "defines no get_config()"),
    "get_config_raises": ("gr.py", GOOD + "    raise KeyError('shots')\n", "get_config() failed"),
    "returns_a_dict": ("dict.py", "def get_config(arg=None):\n    return {}\n", "returned dict"),
    "json_passed_as_config": ("config.json", "{}", "not a Python config file"),
    "exits": ("ex.py", "import sys\nsys.exit(3)\n", "SystemExit"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_bad_config_file(case, tmp_path, capsys):
    name, text, needle = CONFIG_FILES[case]
    path = config_file(tmp_path, name, text)
    workdir = tmp_path / "w"
    line = fails_cleanly(
        main, ["--config", path, "--workdir", str(workdir)], capsys, [name, needle], [tmp_path]
    )
    assert not workdir.exists(), line


def test_missing_config_file_and_folder(tmp_path, capsys):
    fails_cleanly(main, ["--config", str(tmp_path / "nope.py")], capsys, ["nope.py", "no such"])
    fails_cleanly(main, ["--config", str(tmp_path)], capsys, [str(tmp_path), "is a folder"])


def test_unknown_recipe_argument(tmp_path, capsys):
    spec = str(ROOT / "train" / "configs" / "am_sam.py") + ":smok"
    fails_cleanly(main, ["--config", spec, "--workdir", str(tmp_path / "w")], capsys,
                  ["am_sam.py:smok", "unknown config argument"], [tmp_path])  # fmt: skip


FEWSHOT_SETS = {
    # --set value: text the error must contain (the setting is always named)
    "train.batch_size=0": ">= 1",
    "train.batch_size=-2": ">= 1",
    "train.epochs=0": ">= 1",
    "train.epochs=-1": ">= 1",
    "train.hypergradient=newton": "one of exact",
    "train.schedule=cosine": "one of clean",
    "train.lower_lr=0": "> 0",
    "train.lower_lr=nan": "finite",
    "train.upper_lr=inf": "finite",
    "train.upper_lr=-1e-3": ">= 0",
    "train.b1=1": "in [0, 1)",
    "train.dice_weight=1.5": "in [0, 1]",
    "train.fd_radius=0": "> 0",
    "train.weight_decay=-0.1": ">= 0",
    "train.upper_batch=last": "one of cycle",
    "train.checkpoint_every_s=-5": ">= 0",
    "train.epochs=ten": "expected an integer",
    "seed=abc": "expected an integer",
    "lora.rank=0": ">= 1",
    "lora.rank=-4": ">= 1",
    "lora.alpha=0": "> 0",
    "data.shots=1": ">= 2",
    "data.shots=0": ">= 2",
    "data.test_split=": "split folder",
    "data.sam_pixel_norm=maybe": "expected a boolean",
    "sam.model_type=vit_x": "one of vit_b",
    "sam.image_size=0": ">= 16",
    "sam.image_size=250": "multiple of",
    "sam.num_classes=0": ">= 1",
    "sam.head_init=random": "one of tokens",
    "sam.encoder_dtype=float16": "one of float32",
    "calibration.alpha=1.5": "in [0, 1]",
    "calibration.average=pixel": "one of batch",
    "boxes.conf=2": "in [0, 1]",
    "boxes.fallback=skip": "one of full_image",
    "train.nope=1": "unknown key 'nope'",
    "train=1": "is a section",
    "train.epochs.x=1": "has no sub-keys",
    "epochs": "expected key=value",
    "mesh.data=2": "2 devices asked for, 1 exist",
}


@pytest.mark.parametrize("item", list(FEWSHOT_SETS))
def test_bad_fewshot_setting(item, tmp_path, capsys):
    workdir = tmp_path / "w"
    argv = ["--config", FEWSHOT, "--workdir", str(workdir), "--set", item]
    key = item.split("=")[0]
    fails_cleanly(main, argv, capsys, [key, FEWSHOT_SETS[item]], [tmp_path])
    assert not workdir.exists()


SUM_SETS = {
    "train.steps=0": ">= 1",
    "train.mix_mode=mixed": "one of alternate",
    "train.p_first_is_point=2": "in [0, 1]",
    "train.sample_frame=512": "one of 1024",
    "train.eval_clicks=0": ">= 1",
    "train.log_every=0": ">= 1",
    "refine.lr=0": "> 0",
    "refine.batch_masks=0": ">= 1",
    "refine.p_box=-1": "in [0, 1]",
    "data.uncertainty=ensemble": "one of maps",
    "data.max_num_mask=0": ">= 1",
    "data.amg_points_per_side=0": ">= 1",
    "loss.dice_mode=fuzzy": "one of hard",
    "loss.focal_alpha=3": "in [0, 1]",
    "sam.image_size=1000": "multiple of",
}


@pytest.mark.parametrize("item", list(SUM_SETS))
def test_bad_sum_setting(item, tmp_path, capsys):
    workdir = tmp_path / "w"
    argv = ["--config", SUM, "--workdir", str(workdir), "--set", item]
    fails_cleanly(main, argv, capsys, [item.split("=")[0], SUM_SETS[item]], [tmp_path])
    assert not workdir.exists()


@pytest.mark.parametrize("item", ["refine.steps=0", "refine.images=0", "sam.image_size=8"])
def test_bad_refiner_setting(item, tmp_path, capsys):
    argv = ["train", "--config", SUM, "--workdir", str(tmp_path / "r"), "--set", item]
    fails_cleanly(refine_main, argv, capsys, [item.split("=")[0]], [tmp_path])


def test_bad_data_folder_leaves_no_workdir(tmp_path, capsys):
    workdir = tmp_path / "w"
    argv = ["--config", FEWSHOT, "--workdir", str(workdir), "--set", f"data.dir={tmp_path}/no"]
    fails_cleanly(main, argv, capsys, [f"{tmp_path}/no"], [tmp_path])
    assert not workdir.exists()


def test_workdir_that_is_a_file_or_under_a_file(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    fails_cleanly(main, ["--config", FEWSHOT, "--workdir", str(file)], capsys,
                  [str(file), "is a file"], [tmp_path])  # fmt: skip
    fails_cleanly(main, ["--config", FEWSHOT, "--workdir", str(file / "w")], capsys,
                  [str(file / "w"), "cannot create"], [tmp_path])  # fmt: skip


def test_existing_workdir_keeps_its_files_after_a_failed_start(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    argv = ["--config", FEWSHOT, "--workdir", str(workdir), "--set", f"data.dir={tmp_path}/no"]
    fails_cleanly(main, argv, capsys, [f"{tmp_path}/no"])
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------ damaged workdir files


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (2 epochs), made once; each test damages a copy."""
    workdir = tmp_path_factory.mktemp("finished") / "w"
    cmd = [sys.executable, "-m", "amsam_jax.train", "--config", FEWSHOT, "--workdir", str(workdir),
           "--set", "train.checkpoint_every_s=0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def copy_of(finished: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    return workdir


def argv_of(workdir: Path) -> list[str]:
    return ["--config", FEWSHOT, "--workdir", str(workdir), "--set", "train.checkpoint_every_s=0"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated", "a list", "empty"])
def test_corrupt_config_json(damage, finished, tmp_path, capsys):
    workdir = copy_of(finished, tmp_path)
    path = workdir / "config.json"
    text = {"garbage": "\x00\xff{", "truncated": path.read_text()[:40], "a list": "[1]",
            "empty": ""}[damage]  # fmt: skip
    path.write_text(text, errors="surrogateescape")
    fails_cleanly(main, argv_of(workdir), capsys, [str(path)], [workdir])


@pytest.mark.slow
def test_truncated_latest_checkpoint_is_a_clear_error(finished, tmp_path, capsys):
    workdir = copy_of(finished, tmp_path)
    (workdir / "summary.json").unlink()  # the run is not finished: it must restore `latest`
    files = [p for p in (workdir / "ckpt" / "latest").rglob("*") if p.is_file()]
    for f in files:
        if f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails_cleanly(main, argv_of(workdir), capsys, [str(workdir / "ckpt" / "latest")], [workdir])


@pytest.mark.slow
def test_torn_last_metrics_line_is_dropped_on_resume(finished, tmp_path, capsys):
    workdir = copy_of(finished, tmp_path)
    (workdir / "summary.json").unlink()
    metrics = workdir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"kind": "iteration", "st')  # what a kill in mid-write leaves
    assert main(argv_of(workdir)) == 0, capsys.readouterr().err
    assert metrics.read_text() == good
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 4
