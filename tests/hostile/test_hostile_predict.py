"""Hostile inputs to `python -m amsam_jax.predict`: one `error:` line, exit 2, nothing written.

Each case calls `predict.main(argv)` in this process and checks with `hostile.fails_cleanly` that
the error names the file or flag and that the output folder is exactly as before (no `.npz`, no
overlay, no temporary file, no new folder). Outputs are checked before the model loads; write
failures after the prediction (a full disk, no permission, an overlay format that cannot hold the
image, a rename that fails half-way) leave neither output. Thin images (20000 x 20, 20 x 20000,
1 x N) predict end to end; a few cases run `python -m amsam_jax.predict` for the exit status.
"""

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hostile import fails_cleanly, snapshot, write_big_png
from PIL import Image

from amsam_jax import predict
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import save_sam
from amsam_jax.utils.image import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV

BOX = ["--box", "10", "10", "60", "50"]
ROOT = os.geteuid() == 0  # chmod does not stop root: writes are refused by a patched writer


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "tiny"
    save_sam(build_sam(SamConfig.tiny(), seed=1), SamConfig.tiny(), path, {"file": "random"})
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Input files: a photo, damaged images, a 196 MP PNG, thin images, a plain file."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(root / "photo.png")
    good = (root / "photo.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello, I am not an image\n")
    (root / "folder.png").mkdir()
    Image.fromarray(np.full((8, 8), 2.0, np.float32)).save(root / "float.tif")
    write_big_png(root / "bomb.png")
    for name, (h, w) in {"tall": (20000, 20), "wide": (20, 20000), "line": (1, 700)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    (root / "a_file").write_text("a file, not a folder\n")
    return root


@pytest.fixture
def out(tmp_path) -> Path:
    """The watched output folder, with an existing result that a failure must not touch."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.npz").write_bytes(b"previous result")
    (folder / "a_file").write_text("x")
    (folder / "a_dir").mkdir()
    return folder


def argv(sam_dir, image, out, *extra, output="pred.npz"):
    return ["--sam", str(sam_dir), "--image", str(image), "--output", str(out / output), *extra]


# ----------------------------------------------------------------------------------------------
# Outputs that cannot be written: found before the model is loaded


OUTPUT_CASES = {
    # name: (extra argv, output name, what the error names)
    "output is a folder": ([*BOX], "a_dir", "a_dir: is a directory"),
    "output under a file": ([*BOX], "a_file/pred.npz", "a_file is not a folder"),
    "output two folders under a file": ([*BOX], "a_file/x/pred.npz", "a_file is not a folder"),
    "overlay unknown extension": ([*BOX, "--overlay", "{out}/o.xyz"], "p.npz", "'.xyz'"),
    "overlay without extension": ([*BOX, "--overlay", "{out}/overlay"], "p.npz", "(none)"),
    "overlay .npz extension": ([*BOX, "--overlay", "{out}/o.npz"], "p.npz", "'.npz'"),
    "overlay is a folder": ([*BOX, "--overlay", "{out}/a_dir"], "p.npz", "a_dir: is a directory"),
    "overlay under a file": ([*BOX, "--overlay", "{out}/a_file/o.png"], "p.npz", "not a folder"),
    "overlay is the output": ([*BOX, "--overlay", "{out}/same.png"], "same.png", "--overlay"),
    "output folder is new, overlay bad": ([*BOX, "--overlay", "{out}/n/o.bad"], "n/p.npz", ".bad"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_unwritable_outputs_fail_before_the_model_loads(case, sam_dir, inputs, out, capsys,
                                                        monkeypatch):  # fmt: skip
    extra, output, needle = OUTPUT_CASES[case]
    extra = [a.format(out=out) for a in extra]
    monkeypatch.setattr(predict, "load_pretrained", _no_model)
    fails_cleanly(predict.main, argv(sam_dir, inputs / "photo.png", out, *extra, output=output),
                  capsys, names=[needle], watch=[out])  # fmt: skip


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the outputs were checked")


# ----------------------------------------------------------------------------------------------
# Inputs: images, prompts, the SAM directory, the pixel limit


IMAGE_CASES = {
    "missing image": ("missing.png", "missing.png: no such file"),
    "image is a folder": ("folder.png", "folder.png: is a directory"),
    "truncated PNG": ("truncated.png", "truncated.png: cannot read image"),
    "corrupt JPEG": ("corrupt.jpg", "corrupt.jpg: cannot read image"),
    "empty file": ("empty.png", "empty.png: cannot read image (empty file)"),
    "text file": ("text.png", "text.png: cannot read image"),
    "float image outside [0, 1]": ("float.tif", "float.tif: float image with values outside"),
    "196-megapixel PNG": ("bomb.png", "bomb.png: image too large: 14000x14000"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_images_are_one_line_errors(case, sam_dir, inputs, out, capsys, monkeypatch):
    name, needle = IMAGE_CASES[case]
    monkeypatch.setattr(predict, "load_pretrained", _no_model)
    with _warnings_are_errors():  # PIL's DecompressionBombWarning must not be the outcome
        fails_cleanly(predict.main, argv(sam_dir, inputs / name, out, *BOX), capsys,
                      names=[needle], watch=[out])  # fmt: skip


class _warnings_are_errors:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


@pytest.mark.parametrize(
    ("value", "image", "needle"),
    [
        ("abc", "photo.png", f"{MAX_PIXELS_ENV}: invalid value 'abc'"),
        ("-5", "photo.png", f"{MAX_PIXELS_ENV}: invalid value '-5'"),
        ("1.5e6", "photo.png", f"{MAX_PIXELS_ENV}: invalid value"),
        ("1000", "photo.png", "photo.png: image too large: 160x120 = 19,200 pixels"),
        (str(DEFAULT_MAX_IMAGE_PIXELS), "bomb.png", "over the limit of 178,956,970"),
    ],
)
def test_the_pixel_limit_setting_is_honoured(value, image, needle, sam_dir, inputs, out, capsys,
                                             monkeypatch):  # fmt: skip
    monkeypatch.setenv(MAX_PIXELS_ENV, value)
    monkeypatch.setattr(predict, "load_pretrained", _no_model)
    fails_cleanly(predict.main, argv(sam_dir, inputs / image, out, *BOX), capsys,
                  names=[needle], watch=[out])  # fmt: skip


PROMPT_CASES = {
    "box outside the image": (["--box", "10", "20", "300", "90"], "--box 10 20 300 90"),
    "box inverted": (["--box", "50", "20", "10", "90"], "must satisfy"),
    "box with NaN": (["--box", "nan", "0", "5", "5"], "--box nan"),
    "box with infinity": (["--box", "0", "0", "inf", "5"], "--box 0 0 inf"),
    "point outside": (["--point", "500", "5", "1"], "--point 500 5: outside the 160x120"),
    "point negative": (["--point", "-1", "5", "1"], "--point -1 5"),
    "point label 2": (["--point", "5", "5", "2"], "--point label 2"),
    "point label 0.5": (["--point", "5", "5", "0.5"], "--point label 0.5"),
    "no prompt": ([], "give a prompt"),
}


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_bad_prompts_are_one_line_errors(case, sam_dir, inputs, out, capsys, monkeypatch):
    extra, needle = PROMPT_CASES[case]
    monkeypatch.setattr(predict, "load_pretrained", _no_model)
    fails_cleanly(predict.main, argv(sam_dir, inputs / "photo.png", out, *extra), capsys,
                  names=[needle], watch=[out])  # fmt: skip


def test_no_image_and_no_demo_is_one_line(sam_dir, out, capsys):
    args = ["--sam", str(sam_dir), *BOX, "--output", str(out / "p.npz")]
    fails_cleanly(predict.main, args, capsys, names=["--image is required"], watch=[out])


@pytest.mark.parametrize(
    ("sam", "needle"),
    [
        ("missing_sam", "missing_sam: "),
        ("a_file", "a_file: "),
        ("photo.png", "photo.png: "),
    ],
)
def test_bad_sam_directories_are_one_line(sam, needle, inputs, out, capsys):
    """(Damaged SAM directories in detail: tests/hostile/test_hostile_checkpoint.py.)"""
    args = argv(inputs / sam, inputs / "photo.png", out, *BOX)
    fails_cleanly(predict.main, args, capsys, names=[needle], watch=[out])


# ----------------------------------------------------------------------------------------------
# Write failures after the prediction: neither output is left


def _disk_full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_no_output_and_no_temporary(sam_dir, inputs, out, capsys, monkeypatch):
    monkeypatch.setattr(os, "fsync", _disk_full)
    args = argv(sam_dir, inputs / "photo.png", out, *BOX, "--overlay", str(out / "new" / "o.png"))
    needles = ["pred.npz", "cannot write (No space left on device)"]
    fails_cleanly(predict.main, args, capsys, names=needles, watch=[out])


def test_a_full_disk_at_the_overlay_leaves_no_npz(sam_dir, inputs, out, capsys, monkeypatch):
    calls = []
    real = os.fsync

    def second_write_fails(fd):
        calls.append(fd)
        if len(calls) == 2:
            _disk_full(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", second_write_fails)
    args = argv(sam_dir, inputs / "photo.png", out, *BOX, "--overlay", str(out / "o.png"))
    fails_cleanly(predict.main, args, capsys, names=["o.png", "No space left"], watch=[out])
    assert len(calls) == 2


def test_a_read_only_folder_is_one_line(sam_dir, inputs, out, capsys, monkeypatch):
    locked = out / "locked"
    locked.mkdir()
    if ROOT:  # root writes anywhere: refuse the temporary file as a read-only folder would
        real = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        locked.chmod(0o555)
    try:
        args = argv(sam_dir, inputs / "photo.png", out, *BOX, output="locked/pred.npz")
        message = fails_cleanly(predict.main, args, capsys, names=["locked"], watch=[out])
        assert "not writable" in message or "Permission denied" in message
    finally:
        locked.chmod(0o755)


def test_a_rename_failing_half_way_restores_the_previous_files(sam_dir, inputs, out, capsys,
                                                               monkeypatch):  # fmt: skip
    """The second output's rename fails after the first one went in: the first is rolled back,
    and an existing file of that name keeps its old content."""
    (out / "pred.npz").write_bytes(b"the previous prediction")
    real = os.replace

    def overlay_rename_fails(src, dst):
        if Path(dst).name == "o.png":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", overlay_rename_fails)
    args = argv(sam_dir, inputs / "photo.png", out, *BOX, "--overlay", str(out / "o.png"))
    fails_cleanly(predict.main, args, capsys, names=["o.png", "Permission denied"], watch=[out])
    assert (out / "pred.npz").read_bytes() == b"the previous prediction"


def test_an_overlay_format_that_cannot_hold_the_image_leaves_no_npz(sam_dir, inputs, out, capsys):
    """WebP stores at most 16383 pixels a side: found when the overlay is encoded, after the
    prediction and before anything is written."""
    args = argv(sam_dir, inputs / "wide.png", out, "--box", "0", "0", "20000", "20",
                "--overlay", str(out / "o.webp"))  # fmt: skip
    fails_cleanly(predict.main, args, capsys, names=["o.webp", "20000x20", "WEBP"], watch=[out])


# ----------------------------------------------------------------------------------------------
# Thin images work end to end


@pytest.mark.parametrize(
    ("name", "size", "box"),
    [("tall", (20000, 20), "0 0 20 20000"), ("wide", (20, 20000), "0 0 20000 20"),
     ("line", (1, 700), "0 0 700 1")],
)  # fmt: skip
def test_thin_images_predict_full_size_masks(name, size, box, sam_dir, inputs, tmp_path, capsys):
    pred, overlay = tmp_path / "p.npz", tmp_path / "o.png"
    args = argv(sam_dir, inputs / f"{name}.png", tmp_path, "--box", *box.split(),
                "--point", "0", "0", "1", "--overlay", str(overlay), output="p.npz")  # fmt: skip
    assert predict.main(args) == 0, capsys.readouterr().err
    data = np.load(pred)
    assert data["masks"].shape == (1, *size) and data["masks"].dtype == bool
    assert np.isfinite(data["low_res_logits"]).all() and data["iou_predictions"].shape == (1,)
    assert Image.open(overlay).size == size[::-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "p.npz"]


def test_a_failed_run_keeps_an_existing_output_and_a_good_one_replaces_it(sam_dir, inputs, out,
                                                                          capsys):  # fmt: skip
    first = argv(sam_dir, inputs / "photo.png", out, *BOX, "--overlay", str(out / "o.png"))
    assert predict.main(first) == 0
    before = snapshot(out)
    bad = argv(sam_dir, inputs / "corrupt.jpg", out, *BOX, "--overlay", str(out / "o.png"))
    fails_cleanly(predict.main, bad, capsys, names=["corrupt.jpg"], watch=[out])
    assert snapshot(out) == before
    assert predict.main(argv(sam_dir, inputs / "photo.png", out, "--point", "5", "5", "1")) == 0
    assert np.load(out / "pred.npz")["masks"].shape == (1, 120, 160)


# ----------------------------------------------------------------------------------------------
# What only a process shows: the exit status and stderr of `python -m amsam_jax.predict`


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amsam_jax.predict", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_the_process_exits_2_with_one_line_on_a_corrupt_image(sam_dir, inputs, tmp_path):
    outputs = ["--output", str(tmp_path / "out" / "p.npz"), "--overlay", str(tmp_path / "o.png")]
    proc = _run("--sam", str(sam_dir), "--image", str(inputs / "corrupt.jpg"), *BOX, *outputs)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "corrupt.jpg" in lines[0]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The writer behind every CLI's outputs (`amsam_jax.utils.io`)


def test_a_write_error_is_one_line_and_still_an_os_error(tmp_path, monkeypatch):
    from amsam_jax.utils import io

    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    for target, needle in [
        (tmp_path / "a_dir", "a_dir: is a directory"),
        (tmp_path / "a_file" / "x.json", "a_file is not a folder"),
        (tmp_path / "none" / "x.json", "no such folder"),
    ]:
        with pytest.raises(io.WriteError, match=needle) as caught:
            io.write_json(target, {})
        assert isinstance(caught.value, OSError) and "\n" not in str(caught.value)
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(OSError, match=r"x.json: cannot write \(No space left on device\)") as e:
        io.atomic_write(tmp_path / "x.json", b"{}")
    assert e.value.errno == errno.ENOSPC and e.value.strerror == os.strerror(errno.ENOSPC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]


def _failing_encoder(f):
    f.write(b"half an ima")
    raise ValueError("encoder failed")


def test_atomic_outputs_are_all_or_nothing(tmp_path):
    from amsam_jax.utils import io

    (tmp_path / "kept.txt").write_text("old")
    with pytest.raises(ValueError, match="encoder failed"):
        with io.atomic_outputs() as outputs:
            outputs.file(tmp_path / "kept.txt", b"new")
            (outputs.folder(tmp_path / "new" / "overlays") / "a.png").write_bytes(b"png")
            outputs.file(tmp_path / "two.txt", _failing_encoder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
    assert (tmp_path / "kept.txt").read_text() == "old"
    with io.atomic_outputs() as outputs:
        outputs.file(tmp_path / "kept.txt", b"new")
        (outputs.folder(tmp_path / "new" / "overlays") / "a.png").write_bytes(b"png")
    assert (tmp_path / "kept.txt").read_text() == "new"
    assert [p.name for p in (tmp_path / "new" / "overlays").iterdir()] == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt", "new"]
    with pytest.raises(FileExistsError, match="overlays: already exists") as caught:
        with io.atomic_directory(tmp_path / "new" / "overlays"):
            pass
    assert isinstance(caught.value, io.WriteError)
