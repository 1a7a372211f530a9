"""Hostile inputs to `python -m amsam_jax.boxes`: one `error:` line, no empty or partial box file.

Each case calls `boxes.__main__.main(argv)` in this process (`hostile.fails_cleanly`) on small
hand-built ONNX models (a fake YOLOv8 head, and models with the wrong inputs, outputs or
metadata): exit 2, the detector file, flag, image or output named, and the output folder as it
was. A detector that fails at run time, a full disk or a refused write leave no box file (or the
previous one); a run stopped half-way keeps what it finished and the next run resumes, also
after the process was killed inside a write. Thin images (20000 x 20, 20 x 20000, 1 x N) are
boxed end to end.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hostile import changes, fails_cleanly, snapshot, write_big_png
from onnx import TensorProto, helper
from PIL import Image

from amsam_jax.boxes import box_file
from amsam_jax.boxes.__main__ import main
from amsam_jax.boxes.detector import BoxError, YoloDetector
from amsam_jax.utils.image import MAX_PIXELS_ENV

ROOT = os.geteuid() == 0  # chmod does not stop root: writes are refused by a patched writer
SIZE, NC = 64, 2
ANCHORS = sum((SIZE // s) ** 2 for s in (8, 16, 32))  # 84 candidates for a 64 x 64 input


def _constant(name: str, value: np.ndarray):
    kind = TensorProto.INT64 if value.dtype == np.int64 else TensorProto.FLOAT
    tensor = helper.make_tensor(name + "_value", kind, value.shape, value.ravel())
    return helper.make_node("Constant", [], [name], value=tensor)


def fake_yolo(
    path: Path,
    inputs: dict[str, tuple[list, int]] | None = None,
    outputs: dict[str, list] | None = None,
    metadata: dict[str, str] | None = None,
    fail_at_run: bool = False,
) -> Path:
    """A small ONNX model shaped like a YOLOv8 export.

    By default: one float (1, 3, 64, 64) input and a (1, 4 + 2, 84) head output that holds one
    box (centre 32, 32, size 20) of class 0 scored 0.9, with Ultralytics metadata. `inputs` and
    `outputs` replace the tensors (the outputs are then constants, the inputs unused);
    `fail_at_run` reshapes the image to the head's shape, which ONNX Runtime accepts when loading
    and refuses when run.
    """
    uses_image = inputs is None and outputs is None
    inputs = inputs or {"images": ([1, 3, "h", "w"] if fail_at_run else [1, 3, SIZE, SIZE],
                                   TensorProto.FLOAT)}  # fmt: skip
    graph_inputs = [helper.make_tensor_value_info(n, t, s) for n, (s, t) in inputs.items()]
    head = np.zeros((1, 4 + NC, ANCHORS), np.float32)
    head[0, :4, 0], head[0, 4, 0] = [32, 32, 20, 20], 0.9
    if fail_at_run:
        nodes = [_constant("shape", np.asarray(head.shape, np.int64)),
                 helper.make_node("Reshape", ["images", "shape"], ["output0"])]  # fmt: skip
        graph_outputs = {"output0": list(head.shape)}
    elif uses_image:  # the head, plus 0 x the image so that the input is used
        nodes = [_constant("head", head), _constant("zero", np.zeros((), np.float32)),
                 helper.make_node("ReduceMax", ["images"], ["top"], keepdims=0),
                 helper.make_node("Mul", ["top", "zero"], ["nothing"]),
                 helper.make_node("Add", ["head", "nothing"], ["output0"])]  # fmt: skip
        graph_outputs = {"output0": list(head.shape)}
    else:
        graph_outputs = outputs or {"output0": list(head.shape)}
        nodes = [_constant(n, np.zeros(s, np.float32)) for n, s in graph_outputs.items()]
    infos = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in graph_outputs.items()
    ]
    graph = helper.make_graph(nodes, "fake_yolo", graph_inputs, infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    meta = {"task": "detect", "stride": "32", "imgsz": str([SIZE, SIZE]),
            "names": str({i: f"thing{i}" for i in range(NC)}), **(metadata or {})}  # fmt: skip
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    good = fake_yolo(root / "yolo.onnx")
    fake_yolo(root / "fails.onnx", fail_at_run=True)
    (root / "text.onnx").write_text("hello")
    (root / "empty.onnx").write_bytes(b"")
    (root / "half.onnx").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    Image.new("RGB", (8, 8)).save(root / "image.onnx", format="PNG")
    (root / "folder.onnx").mkdir()
    float_input = TensorProto.FLOAT
    for name, kw in {
        "gray_input": dict(inputs={"images": ([1, 1, SIZE, SIZE], float_input)}),
        "int_input": dict(inputs={"images": ([1, 3, SIZE, SIZE], TensorProto.INT64)}),
        "two_inputs": dict(inputs={"images": ([1, 3, SIZE, SIZE], float_input),
                                   "sizes": ([1, 2], float_input)}),
        "flat_input": dict(inputs={"images": ([1, 3, SIZE * SIZE], float_input)}),
        "classifier": dict(outputs={"output0": [1, 1000]}),
        "segmentation": dict(outputs={"output0": [1, 4 + NC + 32, ANCHORS],
                                      "output1": [1, 32, 16, 16]}),
        "end2end": dict(outputs={"output0": [1, 300, 6]}),
        "wrong_grid": dict(outputs={"output0": [1, 4 + NC, 100]}),
        "task_segment": dict(metadata={"task": "segment"}),
        "meta_end2end": dict(metadata={"end2end": "True"}),
        "meta_stride_text": dict(metadata={"stride": "large"}),
        "meta_stride_zero": dict(metadata={"stride": "0"}),
        "meta_names": dict(metadata={"names": str({0: "a", 1: "b", 2: "c"})}),
    }.items():  # fmt: skip
        fake_yolo(root / f"{name}.onnx", **kw)
    return root


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i in range(3):
        _image(root / "good" / "train" / "images" / f"a{i}.png", 50, 70, i)
    _image(root / "good" / "test" / "images" / "b0.png", 40, 30, 9)
    (root / "empty").mkdir()
    (root / "no_images" / "train" / "images").mkdir(parents=True)
    _image(root / "duplicates" / "train" / "images" / "x.png", 10, 10)
    _image(root / "duplicates" / "test" / "images" / "x.png", 10, 10)
    (root / "corrupt" / "train" / "images").mkdir(parents=True)
    (root / "corrupt" / "train" / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (root / "bomb" / "train" / "images").mkdir(parents=True)
    write_big_png(root / "bomb" / "train" / "images" / "big.png")
    (root / "a_file").write_text("not a folder")
    return root


@pytest.fixture
def out(tmp_path) -> Path:
    """The watched output folder: an unrelated JSON, a binary file, a folder, a file."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text('{"lr": 0.001}\n')
    (folder / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (folder / "a_dir").mkdir()
    (folder / "a_file").write_text("x")
    return folder


def argv(detector, data, output, *extra):
    return ["--detector", str(detector), "--data", str(data), "--output", str(output),
            "--no-progress", *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Detector files that are not a YOLOv8 detection export


DETECTOR_CASES = {
    "missing file": ("missing.onnx", "missing.onnx: no such file"),
    "a folder": ("folder.onnx", "folder.onnx: is a directory, not an ONNX model"),
    "text file": ("text.onnx", "text.onnx: not a loadable ONNX model"),
    "empty file": ("empty.onnx", "empty.onnx: not a loadable ONNX model"),
    "truncated ONNX": ("half.onnx", "half.onnx: not a loadable ONNX model"),
    "a PNG": ("image.onnx", "image.onnx: not a loadable ONNX model"),
    "gray input": ("gray_input.onnx", "expected one (B, 3, H, W) image input"),
    "integer input": ("int_input.onnx", "expected a float image input"),
    "two inputs": ("two_inputs.onnx", "expected one (B, 3, H, W) image input"),
    "flat input": ("flat_input.onnx", "expected one (B, 3, H, W) image input"),
    "classifier head": ("classifier.onnx", "not a YOLOv8 detection head"),
    "segmentation head": ("segmentation.onnx", "not a YOLOv8 detection head"),
    "end-to-end head": ("end2end.onnx", "not a YOLOv8 detection head"),
    "wrong candidate count": ("wrong_grid.onnx", "N would be one of"),
    "segmentation task": ("task_segment.onnx", "a 'segment' export"),
    "end-to-end metadata": ("meta_end2end.onnx", "end-to-end (NMS-free) export"),
    "stride not a number": ("meta_stride_text.onnx", "metadata stride='large'"),
    "stride zero": ("meta_stride_zero.onnx", "metadata stride='0'"),
    "names of another head": ("meta_names.onnx", "metadata has 3 names but the head has 2"),
}


@pytest.mark.parametrize("case", list(DETECTOR_CASES))
def test_bad_detector_files_are_one_line(case, models, datasets, out, capsys):
    name, needle = DETECTOR_CASES[case]
    args = argv(models / name, datasets / "good", out / "boxes.json")
    fails_cleanly(main, args, capsys, names=[needle], watch=[out])


# ----------------------------------------------------------------------------------------------
# Flags


FLAG_CASES = {
    "conf above 1": (["--conf", "2"], "--conf: 2.0 is not in [0, 1]"),
    "conf negative": (["--conf", "-0.1"], "--conf: -0.1"),
    "conf NaN": (["--conf", "nan"], "--conf: nan"),
    "iou above 1": (["--iou", "1.5"], "--iou: 1.5"),
    "iou NaN": (["--iou", "nan"], "--iou: nan"),
    "imgsz 0": (["--imgsz", "0"], "--imgsz: must be >= 1, got 0"),
    "imgsz negative": (["--imgsz", "-32"], "--imgsz: must be >= 1"),
    "imgsz not the static input": (["--imgsz", "96"], "static input (64, 64) but imgsz (96, 96)"),
    "imgsz not a number": (["--imgsz", "big"], "--imgsz"),
    "batch size 0": (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    "batch size negative": (["--batch-size", "-4"], "--batch-size: must be >= 1"),
    "unknown class name": (["--classes", "lesion"], "unknown class 'lesion' (classes: thing0"),
    "unknown class id": (["--classes", "0", "7"], "unknown class '7'"),
    "unknown policy": (["--policy", "largest"], "--policy"),
    "unknown split": (["--split", "val"], "--split"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags_are_one_line(case, models, datasets, out, capsys):
    extra, needle = FLAG_CASES[case]
    args = argv(models / "yolo.onnx", datasets / "good", out / "boxes.json", *extra)
    fails_cleanly(main, args, capsys, names=[needle], watch=[out])


# ----------------------------------------------------------------------------------------------
# Data folders and images


DATA_CASES = {
    "missing folder": ("missing", [], "missing: no such folder"),
    "a file": ("a_file", [], "a_file: not a folder"),
    "empty folder": ("empty", [], "empty: no train/images or test/images folder"),
    "no images": ("no_images", [], "no_images/train/images: no images"),
    "missing split": ("no_images", ["--split", "test"], "test/images: no such folder"),
    "duplicate stems": ("duplicates", [], "duplicate image stem 'x'"),
    "corrupt image": ("corrupt", [], "bad.png: cannot read image"),
    "196-megapixel image": ("bomb", [], "big.png: image too large: 14000x14000"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_one_line_and_writes_no_box_file(case, models, datasets, out, capsys):
    data, extra, needle = DATA_CASES[case]
    args = argv(models / "yolo.onnx", datasets / data, out / "boxes.json", *extra)
    fails_cleanly(main, args, capsys, names=[needle], watch=[out])


@pytest.mark.parametrize(
    ("value", "needle"),
    [("abc", f"{MAX_PIXELS_ENV}: invalid value 'abc'"), ("-2", f"{MAX_PIXELS_ENV}: invalid"),
     ("100", "a0.png: image too large: 70x50 = 3,500 pixels, over the limit of 100")],
)  # fmt: skip
def test_the_pixel_limit_setting_is_honoured(value, needle, models, datasets, out, capsys,
                                             monkeypatch):  # fmt: skip
    monkeypatch.setenv(MAX_PIXELS_ENV, value)
    args = argv(models / "yolo.onnx", datasets / "good", out / "boxes.json")
    fails_cleanly(main, args, capsys, names=[needle], watch=[out])


# ----------------------------------------------------------------------------------------------
# Outputs


OUTPUT_CASES = {
    "a folder": ("a_dir", "a_dir: is a directory"),
    "under a file": ("a_file/boxes.json", "a_file is not a folder"),
    "an unrelated JSON": ("config.json", "config.json: not a box file"),
    "a binary file": ("binary.json", "binary.json: not a box file (not UTF-8 text)"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_outputs_that_are_not_box_files_are_left_alone(case, models, datasets, out, capsys):
    name, needle = OUTPUT_CASES[case]
    args = argv(models / "yolo.onnx", datasets / "good", out / name)
    fails_cleanly(main, args, capsys, names=[needle], watch=[out])


def test_a_box_file_of_other_settings_is_left_alone(models, datasets, out, capsys):
    output = out / "boxes.json"
    assert main(argv(models / "yolo.onnx", datasets / "good", output)) == 0
    args = argv(models / "yolo.onnx", datasets / "good", output, "--conf", "0.5")
    needle = "boxes.json: made with other detector settings (conf)"
    fails_cleanly(main, args, capsys, names=[needle], watch=[out])


# ----------------------------------------------------------------------------------------------
# Failures at run time


def test_a_detector_failing_at_run_time_writes_no_box_file(models, datasets, out, capsys):
    args = argv(models / "fails.onnx", datasets / "good", out / "boxes.json")
    fails_cleanly(main, args, capsys, names=["fails.onnx: inference failed"], watch=[out])


def test_a_run_time_failure_leaves_the_previous_box_file_as_it_was(models, datasets, tmp_path,
                                                                  capsys, monkeypatch):  # fmt: skip
    data = tmp_path / "data"
    for i in range(2):
        _image(data / "train" / "images" / f"a{i}.png", 30, 40, i)
    output = tmp_path / "out" / "boxes.json"
    assert main(argv(models / "yolo.onnx", data, output)) == 0
    _image(data / "train" / "images" / "a2.png", 30, 40, 2)  # new: the resume must detect it

    def broken(self, batch):
        raise BoxError(self.path, "inference failed (simulated)")

    monkeypatch.setattr(YoloDetector, "run", broken)
    fails_cleanly(main, argv(models / "yolo.onnx", data, output), capsys,
                  names=["inference failed"], watch=[output.parent])  # fmt: skip


def _fsync_failing(monkeypatch, error):
    def fsync(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_leaves_no_box_file_and_no_temporary(models, datasets, out, capsys,
                                                         monkeypatch):  # fmt: skip
    _fsync_failing(monkeypatch, errno.ENOSPC)
    args = argv(models / "yolo.onnx", datasets / "good", out / "new" / "boxes.json")
    needle = "boxes.json: cannot write (No space left on device)"
    fails_cleanly(main, args, capsys, names=[needle], watch=[out])


def test_a_refused_write_is_one_line(models, datasets, out, capsys, monkeypatch):
    locked = out / "locked"
    locked.mkdir()
    if ROOT:
        real = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        locked.chmod(0o555)
    try:
        args = argv(models / "yolo.onnx", datasets / "good", locked / "boxes.json")
        message = fails_cleanly(main, args, capsys, names=["boxes.json"], watch=[out])
        assert "not writable" in message or "Permission denied" in message
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# Stopped runs resume


def _runs_failing_at(call: int, error: BaseException, monkeypatch) -> list:
    calls, real = [], YoloDetector.run

    def run(self, batch):
        calls.append(len(batch))
        if len(calls) == call:
            raise error
        return real(self, batch)

    monkeypatch.setattr(YoloDetector, "run", run)
    return calls


@pytest.mark.parametrize(
    "error", [BoxError("yolo.onnx", "inference failed (simulated)"), KeyboardInterrupt()]
)
def test_a_run_stopped_half_way_keeps_its_boxes_and_the_next_run_resumes(error, models, datasets,
                                                                         tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    output = tmp_path / "boxes.json"
    args = argv(models / "yolo.onnx", datasets / "good", output)
    _runs_failing_at(3, error, monkeypatch)  # static batch 1: one run per image
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C: exit 130 and one line, no traceback
        assert main(args) == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: interrupted (Ctrl-C)") and "resume" in err[-1]
    else:
        assert main(args) == 2
        assert "inference failed (simulated)" in capsys.readouterr().err
    assert set(json.loads(output.read_text())["boxes"]) == {"a0", "a1"}
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.json"]
    monkeypatch.undo()
    calls = _runs_failing_at(0, RuntimeError(), monkeypatch)
    assert main(args) == 0
    assert len(calls) == 2  # a2 and b0; a0 and a1 were reused
    assert set(json.loads(output.read_text())["boxes"]) == {"a0", "a1", "a2", "b0"}


def test_a_process_killed_inside_a_write_resumes_and_leaves_no_temporary(models, datasets,
                                                                         tmp_path):  # fmt: skip
    """SIGKILL after the box file's temporary is written, before its rename: no box file, a
    stale temporary; the next run removes it and completes."""
    output = tmp_path / "boxes.json"
    args = argv(models / "yolo.onnx", datasets / "good", output)
    code = (
        "import os, signal, sys\n"
        "import amsam_jax.utils.io as io\n"
        "real = io._write_temporary\n"
        "def killed(path, write):\n"
        "    real(path, write)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "io._write_temporary = killed\n"
        "from amsam_jax.boxes.__main__ import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not output.exists()
    assert [p.name.startswith(".boxes.json.") for p in tmp_path.iterdir()] == [True]
    proc = subprocess.run([sys.executable, "-m", "amsam_jax.boxes", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.json"]
    assert len(json.loads(output.read_text())["boxes"]) == 4


def test_an_interrupted_resume_leaves_a_complete_box_file_unchanged(models, datasets, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    output = tmp_path / "boxes.json"
    args = argv(models / "yolo.onnx", datasets / "good", output)
    assert main(args) == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(box_file, "sha256_bytes", _interrupt)  # Ctrl-C while hashing an image
    assert main(args) == 130
    assert changes(before, tmp_path) == []


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# Thin images


def test_thin_images_get_boxes_inside_them(models, tmp_path, capsys):
    sizes = {"tall": (20000, 20), "wide": (20, 20000), "line": (1, 700)}
    for name, (h, w) in sizes.items():
        _image(tmp_path / "data" / "train" / "images" / f"{name}.png", h, w)
    output = tmp_path / "boxes.json"
    assert main(argv(models / "yolo.onnx", tmp_path / "data", output)) == 0
    assert "3 images, 0 without detection" in capsys.readouterr().out
    for name, (h, w) in sizes.items():
        x0, y0, x1, y1 = json.loads(output.read_text())["boxes"][name]["box"]
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, (name, x0, y0, x1, y1)
