"""Hostile inputs to `python -m amsam_jax.evaluate`: one `error:` line, exit 2, nothing written.

Each case calls `evaluate.main(argv)` in this process (`hostile.fails_cleanly`). The few-shot
cases copy one cheap workdir (the smoke recipe's config and its untrained state saved as
`ckpt/best`, no training) and damage it: a missing or foreign workdir, a truncated or corrupt
checkpoint, a checkpoint whose metadata lost its step, data without masks or with masks of
another aspect, an empty split, bad flags, outputs that cannot be written (also a full disk after
the evaluation: neither `eval_<split>.json` nor the overlay folder is left). The interactive and
box protocols get their own flags, data, box files and outputs; a thin image (20000 x 20) is
evaluated end to end with box prompts.
"""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hostile import fails_cleanly, write_big_png
from PIL import Image

from amsam_jax import evaluate
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import save_sam
from amsam_jax.fewshot.recipes import am_sam
from amsam_jax.fewshot.trainer import build_setup
from amsam_jax.training.run import Run
from amsam_jax.training.state import save_state
from amsam_jax.utils import io
from amsam_jax.utils.image import MAX_PIXELS_ENV


def write_pair(root: Path, split: str, stem: str, size=(24, 32), mask_size=None, seed=0):
    """An RGB image and a 0/255 mask with a filled rectangle, in the folder format."""
    rng = np.random.default_rng(seed)
    h, w = size
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        root / split / "images" / f"{stem}.png"
    )
    mh, mw = mask_size or size
    mask = np.zeros((mh, mw), np.uint8)
    mask[mh // 4 : max(mh // 4 + 1, 3 * mh // 4), mw // 4 : max(mw // 4 + 1, 3 * mw // 4)] = 255
    Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A few-shot workdir without training: the smoke config and its initial state as `best`."""
    cfg = am_sam("smoke")
    path = tmp_path_factory.mktemp("run") / "run"
    Run(path, cfg.to_dict())
    setup = build_setup(cfg, path, quiet=True)
    save_state(path, "best", setup.initial, {"step": 0})
    return path


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "tiny"
    save_sam(build_sam(SamConfig.tiny(), seed=1), SamConfig.tiny(), path, {"file": "random"})
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Data folders: good, without masks, empty, another mask aspect, a 196 MP image."""
    root = tmp_path_factory.mktemp("data")
    for i in range(2):
        write_pair(root / "good", "test", f"s{i}", seed=i)
    (root / "no_masks" / "test" / "images").mkdir(parents=True)
    shutil.copy(root / "good" / "test" / "images" / "s0.png", root / "no_masks" / "test" / "images")
    for sub in ("images", "masks"):
        (root / "empty" / "test" / sub).mkdir(parents=True)
    write_pair(root / "aspect", "test", "s0", size=(24, 32), mask_size=(30, 10))
    write_pair(root / "bomb", "test", "big", size=(4, 4))
    write_big_png(root / "bomb" / "test" / "images" / "big.png")
    (root / "a_file").write_text("not a folder")
    boxes = {"detector": {"name": "test"}, "boxes": {"s0": {"box": [0, 0, 10, 10]}}}
    (root / "boxes_s0_only.json").write_text(json.dumps(boxes))
    (root / "not_boxes.json").write_text('{"lr": 1}')
    (root / "corrupt_boxes.json").write_text('{"detector": {')
    return root


@pytest.fixture
def run_copy(workdir, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def fewshot(run, *extra):
    return ["--workdir", str(run), "--overlays", "1", *extra]


# ----------------------------------------------------------------------------------------------
# Few-shot: workdirs and checkpoints


def _state_files(run: Path) -> list[Path]:
    step = run / "ckpt" / "best" / "0" / "state"
    return sorted((p for p in step.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: -p.stat().st_size)  # fmt: skip


def _truncate_largest(run):
    data = _state_files(run)[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])


def _empty_every_array(run):
    for data in _state_files(run):
        data.write_bytes(b"")


def _corrupt_largest(run):
    data = _state_files(run)[0]
    raw = bytearray(data.read_bytes())
    raw[: min(len(raw), 256)] = b"\x00" * min(len(raw), 256)
    data.write_bytes(bytes(raw))


def _truncate_manifest(run):
    manifest = run / "ckpt" / "best" / "0" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])


def _meta(text):
    def damage(run):
        (run / "ckpt" / "best" / "0" / "meta" / "metadata").write_text(text)

    return damage


def _unfinished_save(run):
    best = run / "ckpt" / "best"
    (best / "0").rename(best / "0.orbax-checkpoint-tmp-1234")


def _best_is_a_file(run):
    shutil.rmtree(run / "ckpt" / "best")
    (run / "ckpt" / "best").write_text("x")


def _config(text):
    def damage(run):
        (run / "config.json").write_text(text)

    return damage


def _remove(name):
    def damage(run):
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


META_DAMAGED = "ckpt/best/0/meta: a damaged checkpoint"

WORKDIR_CASES = {
    "no config.json": (_remove("config.json"), "no config.json (not a training workdir)"),
    "config.json not JSON": (_config("{"), "config.json: unreadable"),
    "config.json a list": (_config("[1]"), "config.json: not a config object"),
    "no ckpt folder": (_remove("ckpt"), "ckpt/best: no checkpoint"),
    "no best checkpoint": (_remove("ckpt/best"), "ckpt/best: no checkpoint"),
    "best is a file": (_best_is_a_file, "ckpt/best: no checkpoint"),
    "only an unfinished save": (_unfinished_save, "ckpt/best: no checkpoint"),
    "truncated array file": (_truncate_largest, "ckpt/best/0: cannot restore"),
    "emptied array files": (_empty_every_array, "ckpt/best/0: cannot restore"),
    "corrupt array file": (_corrupt_largest, "ckpt/best/0: cannot restore"),
    "truncated manifest": (_truncate_manifest, "ckpt/best/0: cannot restore"),
    "metadata truncated": (_meta('{"st'), "ckpt/best/0: cannot restore"),
    "metadata without step": (_meta("{}"), META_DAMAGED),
    "metadata step not a number": (_meta('{"step": "x"}'), META_DAMAGED),
    "metadata a list": (_meta("[]"), META_DAMAGED),
}


# Orbax leaves an asyncio callback behind when a restore fails (harmless; a process shows nothing).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", list(WORKDIR_CASES))
def test_damaged_workdirs_and_checkpoints_are_one_line(case, run_copy, capsys):
    damage, needle = WORKDIR_CASES[case]
    damage(run_copy)
    fails_cleanly(evaluate.main, fewshot(run_copy), capsys, names=[needle], watch=[run_copy])


def test_a_missing_workdir_is_one_line(tmp_path, capsys):
    fails_cleanly(evaluate.main, fewshot(tmp_path / "none"), capsys,
                  names=["none: no such workdir"], watch=[tmp_path])  # fmt: skip


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    fails_cleanly(evaluate.main, fewshot(tmp_path / "run.json"), capsys,
                  names=["run.json: not a folder"], watch=[tmp_path])  # fmt: skip


def test_another_checkpoint_kind_than_the_saved_one_is_one_line(run_copy, capsys):
    fails_cleanly(evaluate.main, fewshot(run_copy, "--checkpoint", "final"), capsys,
                  names=["ckpt/final: no checkpoint"], watch=[run_copy])  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Few-shot: data, flags, outputs


DATA_CASES = {
    "missing folder": ("missing", [], "missing: no such data folder"),
    "a file": ("a_file", [], "a_file: no such data folder"),
    "no masks": ("no_masks", [], "no_masks/test/masks: no such folder"),
    "empty split": ("empty", [], "empty/test/images: no images"),
    "missing split": ("good", ["--split", "val"], "good/val: no such split folder"),
    "mask of another aspect": ("aspect", [], "another aspect ratio"),
    "196-megapixel image": ("bomb", [], "big.png: image too large: 14000x14000"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_line(case, run_copy, data, capsys):
    folder, extra, needle = DATA_CASES[case]
    args = fewshot(run_copy, "--data", str(data / folder), *extra)
    fails_cleanly(evaluate.main, args, capsys, names=[needle], watch=[run_copy])


FLAG_CASES = {
    "clicks 0": (["--clicks", "0"], "--clicks: must be >= 1, got 0"),
    "clicks negative": (["--clicks", "-2"], "--clicks: must be >= 1"),
    "max images 0": (["--max-images", "0"], "--max-images: must be >= 1, got 0"),
    "max images negative": (["--max-images", "-3"], "--max-images: must be >= 1"),
    "overlays negative": (["--overlays", "-1"], "--overlays: must be >= 0, got -1"),
    "clicks not a number": (["--clicks", "many"], "--clicks"),
    "unknown checkpoint kind": (["--checkpoint", "last"], "--checkpoint"),
    "unknown protocol": (["--protocol", "zero-shot"], "--protocol"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags_are_one_line(case, run_copy, capsys):
    extra, needle = FLAG_CASES[case]
    fails_cleanly(evaluate.main, fewshot(run_copy, *extra), capsys, names=[needle],
                  watch=[run_copy])  # fmt: skip


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_an_invalid_pixel_limit_is_one_line(value, run_copy, capsys, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, value)
    fails_cleanly(evaluate.main, fewshot(run_copy), capsys,
                  names=[f"{MAX_PIXELS_ENV}: invalid value"], watch=[run_copy])  # fmt: skip


def test_a_result_path_that_is_a_folder_fails_before_the_model(run_copy, capsys, monkeypatch):
    (run_copy / "eval_test.json").mkdir()
    monkeypatch.setattr("amsam_jax.evaluation.workdir.load_run_state", _no_model)
    fails_cleanly(evaluate.main, fewshot(run_copy), capsys,
                  names=["eval_test.json: is a directory"], watch=[run_copy])  # fmt: skip


def test_an_overlay_folder_that_is_a_file_fails_before_the_model(run_copy, capsys, monkeypatch):
    (run_copy / "eval_test").write_text("x")
    monkeypatch.setattr("amsam_jax.evaluation.workdir.load_run_state", _no_model)
    fails_cleanly(evaluate.main, fewshot(run_copy), capsys,
                  names=["eval_test: exists and is not a folder"], watch=[run_copy])  # fmt: skip


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the outputs were checked")


def _disk_full_at(name: str, monkeypatch) -> list[str]:
    """Makes the writer of every atomic write fail with ENOSPC for files named `name`."""
    written, real = [], io._write_temporary

    def write(path, content):
        written.append(Path(path).name)
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, content)

    monkeypatch.setattr(io, "_write_temporary", write)
    return written


def test_a_full_disk_leaves_neither_the_result_nor_the_overlays(run_copy, data, capsys,
                                                                monkeypatch):  # fmt: skip
    """The overlay is written first, into the staged folder; then the result file fails."""
    written = _disk_full_at("eval_test.json", monkeypatch)
    args = fewshot(run_copy, "--data", str(data / "good"))
    fails_cleanly(evaluate.main, args, capsys, names=["eval_test.json", "No space left"],
                  watch=[run_copy])  # fmt: skip
    assert written[-2:] == ["s0.png", "eval_test.json"]


def test_a_good_evaluation_writes_the_result_and_replaces_old_overlays(run_copy, data, capsys):
    (run_copy / "eval_test").mkdir()
    (run_copy / "eval_test" / "stale.png").write_bytes(b"an overlay of an earlier evaluation")
    args = ["--workdir", str(run_copy), "--data", str(data / "good")]
    assert evaluate.main(args) == 0, capsys.readouterr().err
    result = json.loads((run_copy / "eval_test.json").read_text())
    assert result["checkpoint_step"] == 0 and len(result["per_image"]) == 2
    assert sorted(p.name for p in (run_copy / "eval_test").iterdir()) == ["s0.png", "s1.png"]


# ----------------------------------------------------------------------------------------------
# Interactive protocol


def interactive(sam_dir, data_dir, out, *extra):
    return ["--protocol", "interactive", "--sam", str(sam_dir), "--data", str(data_dir),
            "--output", str(out / "result.json"), "--clicks", "2", *extra]  # fmt: skip


INTERACTIVE_CASES = {
    "plot of unknown format": (["--plot", "{out}/plot.xyz"], "plot.xyz: unknown plot extension"),
    "plot without extension": (["--plot", "{out}/plot"], "plot: unknown plot extension"),
    "plot is the result": (["--output", "{out}/result.png"], "--plot: "),
    "plot named .json": (["--plot", "{out}/result.json"], "unknown plot extension '.json'"),
    "plot is a folder": (["--plot", "{out}/a_dir"], "a_dir: is a directory"),
    "plot under a file": (["--plot", "{out}/a_file/p.png"], "a_file is not a folder"),
    "unknown task": (["--task", "7"], "--task: '7'"),
    "max images 0": (["--max-images", "0"], "--max-images: must be >= 1"),
    "clicks 0": (["--clicks", "0"], "--clicks: must be >= 1"),
}


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a_dir").mkdir()
    (folder / "a_file").write_text("x")
    return folder


@pytest.mark.parametrize("case", list(INTERACTIVE_CASES))
def test_interactive_bad_flags_and_outputs_are_one_line(case, sam_dir, data, out, capsys):
    extra, needle = INTERACTIVE_CASES[case]
    args = interactive(sam_dir, data / "good", out, *[a.format(out=out) for a in extra])
    fails_cleanly(evaluate.main, args, capsys, names=[needle], watch=[out])


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--protocol", "interactive", "--data", "x"], "needs --sam SAM_DIR or --workdir SUM_RUN"),
     (["--protocol", "interactive", "--workdir", "{run}"], "no sam_finetuned/"),
     (["--protocol", "interactive", "--sam", "{sam}", "--data", "{data}/missing"],
      "missing/test: no such split folder"),
     (["--protocol", "interactive", "--sam", "{sam}", "--data", "{data}/good:9"], "good:9"),
     (["--protocol", "interactive", "--sam", "{sam}", "--data", "{data}/good", "--output",
       "{out}/a_dir"], "a_dir: is a directory")],
)  # fmt: skip
def test_interactive_bad_setups_are_one_line(args, needle, sam_dir, data, run_copy, out, capsys):
    args = [a.format(sam=sam_dir, data=data, run=run_copy, out=out) for a in args]
    fails_cleanly(evaluate.main, args, capsys, names=[needle], watch=[out, run_copy])


def test_interactive_writes_the_result_and_its_plot_together(sam_dir, data, out, capsys,
                                                             monkeypatch):  # fmt: skip
    written = _disk_full_at("result.png", monkeypatch)  # the result JSON is staged, the plot fails
    args = interactive(sam_dir, data / "good", out, "--max-images", "1")
    fails_cleanly(evaluate.main, args, capsys, names=["result.png", "No space left"], watch=[out])
    assert written == ["result.json", "result.png"]
    monkeypatch.undo()
    assert evaluate.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_dir", "a_file", "result.json", "result.png"]


# ----------------------------------------------------------------------------------------------
# Box protocol


def box(sam_dir, data_dir, out, *extra):
    return ["--protocol", "box", "--sam", str(sam_dir), "--data", str(data_dir),
            "--output", str(out / "box.json"), *extra]  # fmt: skip


BOX_CASES = {
    "box file missing": (["--boxes", "{data}/none.json"], "none.json: no such file"),
    "box file is a folder": (["--boxes", "{data}/good"], "good: is a directory, not a box file"),
    "box file not JSON": (["--boxes", "{data}/corrupt_boxes.json"], "not a JSON box file"),
    "JSON, not a box file": (["--boxes", "{data}/not_boxes.json"], "not a box file"),
    "two data folders": (["--data", "{data}/good"], "--data: the box protocol takes one"),
    "an image without a box": (["--boxes", "{data}/boxes_s0_only.json"],
                               "s1.png: no box for this image in the box file"),
    "output is a folder": (["--output", "{out}/a_dir"], "a_dir: is a directory"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BOX_CASES))
def test_box_protocol_bad_inputs_are_one_line(case, sam_dir, data, out, capsys):
    extra, needle = BOX_CASES[case]
    args = box(sam_dir, data / "good", out, *[a.format(data=data, out=out) for a in extra])
    fails_cleanly(evaluate.main, args, capsys, names=[needle], watch=[out])


def test_box_protocol_without_data_is_one_line(sam_dir, out, capsys):
    args = ["--protocol", "box", "--sam", str(sam_dir), "--output", str(out / "box.json")]
    fails_cleanly(evaluate.main, args, capsys, names=["needs --sam"], watch=[out])


def test_a_thin_image_is_evaluated_with_box_prompts(sam_dir, tmp_path, capsys):
    write_pair(tmp_path / "thin", "test", "tall", size=(20000, 20))
    write_pair(tmp_path / "thin", "test", "line", size=(1, 400))
    output = tmp_path / "box.json"
    args = ["--protocol", "box", "--sam", str(sam_dir), "--data", str(tmp_path / "thin"),
            "--output", str(output)]  # fmt: skip
    assert evaluate.main(args) == 0, capsys.readouterr().err
    result = json.loads(output.read_text())
    assert result["images"] == 2
    assert {r["stem"]: r["box"] for r in result["per_image"]} == {
        "line": [100.0, 0.0, 300.0, 1.0],
        "tall": [5.0, 5000.0, 15.0, 15000.0],
    }
    assert all(np.isfinite([r["dice"], r["iou"]]).all() for r in result["per_image"])
