"""Hostile inputs to `python -m amsam_jax.pseudo_labels`: one `error:` line, nothing half-written.

Each case calls `pseudo_labels.main(argv)` in this process (`hostile.fails_cleanly`): a generator
setting out of range, a bad folder, SAM directory or pixel-limit setting is exit 2 before the
model loads, naming the flag or file; an unreadable image is exit 1 with its line (the others
are labelled); a full disk or a refused write keeps the images already finished, leaves no
sidecar without its JSON and no folder the run created. The generator's own checks
(`check_generator_settings`) and thin images (20000 x 20, 20 x 20000, 1 x N, also with crop
layers) are tested on a tiny random SAM.
"""

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hostile import changes, fails_cleanly, snapshot, write_big_png
from PIL import Image

from amsam_jax import pseudo_labels
from amsam_jax.automatic_mask_generator import (
    AmgSettingError,
    SamAutomaticMaskGenerator,
    check_generator_settings,
)
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import save_sam
from amsam_jax.utils.image import MAX_PIXELS_ENV

ROOT = os.geteuid() == 0  # chmod does not stop root: writes are refused by a patched writer
# Few points, every mask kept: a short run that writes masks and probabilities.
FAST = ["--points-per-side", "2", "--points-per-batch", "4", "--pred-iou-thresh", "0",
        "--stability-score-thresh", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "tiny"
    save_sam(build_sam(SamConfig.tiny(), seed=1), SamConfig.tiny(), path, {"file": "random"})
    return path


@pytest.fixture(scope="module")
def model():
    return build_sam(SamConfig.tiny(), seed=1)


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Image folders: two small photos, a corrupt one, a 196 MP one, empty, non-images."""
    root = tmp_path_factory.mktemp("folders")
    _image(root / "photos" / "a.png", 24, 32, 0)
    _image(root / "photos" / "b.png", 24, 32, 1)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "bomb").mkdir()
    write_big_png(root / "bomb" / "big.png")
    (root / "empty").mkdir()
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("not an image")
    (root / "a_file").write_text("a file, not a folder")
    bad_sam = root / "bad_sam"
    bad_sam.mkdir()
    (bad_sam / "config.json").write_text("[1, 2]")
    (bad_sam / "params").mkdir()
    return root


@pytest.fixture
def out(tmp_path) -> Path:
    """The watched output folder, holding a finished label of another image."""
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "z.json").write_text('{"image": {}, "annotations": []}')
    (folder / "a_file").write_text("x")
    return folder


def argv(images, out, *extra, sam=None):
    model = ["--sam", str(sam)] if sam else ["--random-tiny"]
    return ["--images", str(images), "--out", str(out), *model, *extra]


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the settings were checked")


# ----------------------------------------------------------------------------------------------
# Settings out of range: exit 2 before the model loads


SETTING_CASES = [
    ("--points-per-side", "0", "must be >= 1"),
    ("--points-per-side", "-3", "must be >= 1"),
    ("--points-per-batch", "0", "must be >= 1"),
    ("--points-per-batch", "-1", "must be >= 1"),
    ("--crop-n-layers", "-1", "must be >= 0"),
    ("--crop-n-points-downscale-factor", "0", "must be >= 1"),
    ("--min-mask-region-area", "-1", "must be >= 0"),
    ("--pred-iou-thresh", "1.5", "must be in [0, 1]"),
    ("--pred-iou-thresh", "-0.1", "must be in [0, 1]"),
    ("--pred-iou-thresh", "nan", "finite"),
    ("--stability-score-thresh", "2", "must be in [0, 1]"),
    ("--stability-score-thresh", "inf", "finite"),
    ("--stability-score-offset", "-1", "must be >= 0"),
    ("--box-nms-thresh", "-0.5", "must be in [0, 1]"),
    ("--box-nms-thresh", "1.01", "must be in [0, 1]"),
    ("--crop-nms-thresh", "7", "must be in [0, 1]"),
]


@pytest.mark.parametrize(("flag", "value", "needle"), SETTING_CASES)
def test_settings_out_of_range_are_named_as_their_flag(flag, value, needle, folders, out, capsys,
                                                       monkeypatch):  # fmt: skip
    monkeypatch.setattr(pseudo_labels, "build_sam", _no_model)
    monkeypatch.setattr(pseudo_labels, "load_pretrained", _no_model)
    args = argv(folders / "photos", out / "new", flag, value)
    fails_cleanly(pseudo_labels.main, args, capsys, names=[f"error: {flag}: ", needle],
                  watch=[out])  # fmt: skip


def test_a_non_integer_setting_is_an_argparse_error(folders, out, capsys):
    args = argv(folders / "photos", out / "new", "--points-per-side", "two")
    fails_cleanly(pseudo_labels.main, args, capsys, names=["--points-per-side"], watch=[out])


# ----------------------------------------------------------------------------------------------
# Folders, SAM directories and the pixel-limit setting: exit 2 before the model loads


FOLDER_CASES = {
    "images missing": ("missing", "new", "missing: no such folder"),
    "images is a file": ("a_file", "new", "a_file: not a folder"),
    "images empty": ("empty", "new", "empty: no images"),
    "images without images": ("no_images", "new", "no_images: no images"),
    "out is a file": ("photos", "a_file", "a_file: exists and is not a folder"),
    "out under a file": ("photos", "a_file/labels", "a_file is not a folder"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_bad_folders_are_one_line(case, folders, out, capsys, monkeypatch):
    images, target, needle = FOLDER_CASES[case]
    monkeypatch.setattr(pseudo_labels, "build_sam", _no_model)
    images = folders / images
    fails_cleanly(pseudo_labels.main, argv(images, out / target), capsys, names=[needle],
                  watch=[out])  # fmt: skip


@pytest.mark.parametrize(
    ("sam", "needle"),
    [("missing_sam", "missing_sam"), ("a_file", "a_file"), ("bad_sam", "config.json"),
     ("photos", "photos")],
)  # fmt: skip
def test_bad_sam_directories_are_one_line(sam, needle, folders, out, capsys):
    args = argv(folders / "photos", out / "new", sam=folders / sam)
    fails_cleanly(pseudo_labels.main, args, capsys, names=[needle], watch=[out])


@pytest.mark.parametrize("value", ["abc", "-1", "1e9"])
def test_an_invalid_pixel_limit_is_named_once_before_the_model(value, folders, out, capsys,
                                                               monkeypatch):  # fmt: skip
    """Exit 2 (not 1 with one line per image, as an unreadable image would give)."""
    monkeypatch.setenv(MAX_PIXELS_ENV, value)
    monkeypatch.setattr(pseudo_labels, "build_sam", _no_model)
    fails_cleanly(pseudo_labels.main, argv(folders / "photos", out / "new"), capsys,
                  names=[f"{MAX_PIXELS_ENV}: invalid value"], watch=[out])  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Unreadable images: exit 1, one line each, nothing written for them


@pytest.mark.parametrize(
    ("folder", "needle"),
    [("corrupt", "bad.png: cannot read image"),
     ("bomb", "big.png: image too large: 14000x14000 = 196,000,000 pixels")],
)  # fmt: skip
def test_unreadable_images_are_exit_1_and_leave_no_folder(folder, needle, folders, out, capsys):
    fails_cleanly(pseudo_labels.main, argv(folders / folder, out / "new", *FAST), capsys,
                  names=[needle], watch=[out], code=1)  # fmt: skip


def test_a_small_pixel_limit_refuses_every_image_and_writes_nothing(folders, out, capsys,
                                                                    monkeypatch):  # fmt: skip
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    needle = "b.png: image too large: 32x24 = 768 pixels"
    fails_cleanly(pseudo_labels.main, argv(folders / "photos", out, *FAST), capsys,
                  names=[needle], watch=[out], code=1)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Write failures: finished images stay, nothing half-written, no folder the run created


def _fsync_failing_at(call: int, monkeypatch, error=errno.ENOSPC) -> list:
    calls, real = [], os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == call:
            raise OSError(error, os.strerror(error))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_full_disk_at_the_first_write_leaves_no_folder(folders, out, capsys, monkeypatch):
    _fsync_failing_at(1, monkeypatch)
    args = argv(folders / "photos", out / "new" / "labels", *FAST)
    fails_cleanly(pseudo_labels.main, args, capsys, names=["a.prob.npz", "No space left"],
                  watch=[out])  # fmt: skip


def test_a_full_disk_at_the_json_leaves_no_sidecar_without_it(folders, out, capsys, monkeypatch):
    """The sidecar is written first, the JSON last: a failed JSON takes its sidecar with it."""
    _fsync_failing_at(2, monkeypatch)
    fails_cleanly(pseudo_labels.main, argv(folders / "photos", out, *FAST), capsys,
                  names=["a.json", "No space left"], watch=[out])  # fmt: skip


def test_a_full_disk_keeps_the_finished_images_and_the_rerun_completes(folders, out, capsys,
                                                                       monkeypatch):  # fmt: skip
    calls = _fsync_failing_at(4, monkeypatch)  # a: sidecar, JSON; b: sidecar, then the JSON fails
    args = argv(folders / "photos", out, *FAST)
    assert pseudo_labels.main(args) == 2
    assert "b.json: cannot write (No space left on device)" in capsys.readouterr().err
    assert len(calls) == 4
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.prob.npz", "a_file", "z.json"]
    monkeypatch.undo()
    before = snapshot(out / "a.json")
    assert pseudo_labels.main(args) == 0
    assert "skip a.png (done)" in capsys.readouterr().out
    assert snapshot(out / "a.json") == before  # resumed, not redone
    assert json.loads((out / "b.json").read_text())["image"]["file_name"] == "b.png"


def test_a_refused_write_is_one_line(folders, out, capsys, monkeypatch):
    target = out / "locked"
    target.mkdir()
    if ROOT:
        real = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        target.chmod(0o555)
    try:
        message = fails_cleanly(pseudo_labels.main, argv(folders / "photos", target, *FAST),
                                capsys, names=["locked"], watch=[out])  # fmt: skip
        assert "not writable" in message or "Permission denied" in message
    finally:
        target.chmod(0o755)


def test_ctrl_c_leaves_no_sidecar_without_its_json(folders, out, capsys, monkeypatch):
    from amsam_jax.data import sa1b

    real = sa1b.atomic_write

    def interrupted_after_the_sidecar(path, write):
        real(path, write)
        if str(path).endswith(".prob.npz"):
            raise KeyboardInterrupt

    monkeypatch.setattr(sa1b, "atomic_write", interrupted_after_the_sidecar)
    before = snapshot(out)
    assert pseudo_labels.main(argv(folders / "photos", out, *FAST)) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted (Ctrl-C)"), last
    assert changes(before, out) == []


# ----------------------------------------------------------------------------------------------
# The generator's checks, and thin images


@pytest.mark.parametrize(
    ("settings", "setting"),
    [(dict(points_per_side=0), "points_per_side"),
     (dict(points_per_side=None), "points_per_side"),
     (dict(points_per_side=4, point_grids=[np.zeros((1, 2))]), "points_per_side"),
     (dict(points_per_side=True), "points_per_side"),
     (dict(points_per_batch=0), "points_per_batch"),
     (dict(crop_n_layers=-2), "crop_n_layers"),
     (dict(crop_n_layers=1.5), "crop_n_layers"),
     (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio"),
     (dict(crop_overlap_ratio=-0.1), "crop_overlap_ratio"),
     (dict(crop_n_points_downscale_factor=0), "crop_n_points_downscale_factor"),
     (dict(min_mask_region_area=-5), "min_mask_region_area"),
     (dict(pred_iou_thresh=float("nan")), "pred_iou_thresh"),
     (dict(stability_score_offset=-0.5), "stability_score_offset"),
     (dict(output_mode="png"), "output_mode"),
     (dict(points_per_side=None, point_grids=[np.zeros((0, 2))]), "point_grids"),
     (dict(points_per_side=None, point_grids=[np.full((4, 2), 1.5)]), "point_grids"),
     (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1),
      "point_grids")],
)  # fmt: skip
def test_the_generator_refuses_settings_out_of_range(settings, setting, model):
    with pytest.raises(AmgSettingError) as caught:
        check_generator_settings(**settings)
    assert caught.value.setting == setting and str(caught.value).startswith(f"{setting}: ")
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=f"^{setting}: "):
        SamAutomaticMaskGenerator(model, **{"points_per_side": 32, **settings})


def test_a_deep_crop_layer_keeps_one_point_where_the_grid_rounds_to_zero(model):
    generator = SamAutomaticMaskGenerator(
        model, points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2
    )
    assert [len(g) for g in generator.point_grids] == [4, 1, 1]


def test_a_one_pixel_high_image_with_crop_layers_generates_masks_inside_it(model):
    """The reference's layer-1 crop boxes of a 1-pixel side include empty ones."""
    size = (1, 60)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    generator = SamAutomaticMaskGenerator(
        model, points_per_side=2, points_per_batch=4, pred_iou_thresh=0.0,
        stability_score_thresh=0.0, crop_n_layers=1, box_nms_thresh=1.0, crop_nms_thresh=1.0,
    )  # fmt: skip
    records = generator.generate(image)
    assert records
    for r in records:
        x, y, w, h = r["crop_box"]
        assert w > 0 and h > 0 and x + w <= size[1] and y + h <= size[0]
        assert r["segmentation"].shape == size and r["probability"].shape == size


THIN = {"tall": (20000, 20), "line": (1, 500)}  # (20 x 20000 is predict's and the boxes' case)


def test_thin_images_are_labelled_end_to_end(tmp_path, sam_dir, capsys):
    images = tmp_path / "images"
    for name, (h, w) in THIN.items():
        _image(images / f"{name}.png", h, w)
    out = tmp_path / "labels"
    assert pseudo_labels.main(argv(images, out, *FAST, sam=sam_dir)) == 0, capsys.readouterr().err
    for name, (h, w) in THIN.items():
        data = json.loads((out / f"{name}.json").read_text())
        assert (data["image"]["height"], data["image"]["width"]) == (h, w)
        prob = np.load(out / f"{name}.prob.npz")["prob"]
        assert prob.shape == (len(data["annotations"]), h, w)


# ----------------------------------------------------------------------------------------------
# What only a process shows: the exit status of `python -m amsam_jax.pseudo_labels`


def test_the_process_exits_2_with_one_line_on_a_bad_setting(folders, tmp_path):
    args = argv(folders / "photos", tmp_path / "labels", "--points-per-side", "0")
    proc = subprocess.run([sys.executable, "-m", "amsam_jax.pseudo_labels", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: --points-per-side: must be >= 1, got 0\n"
    assert list(tmp_path.iterdir()) == []
