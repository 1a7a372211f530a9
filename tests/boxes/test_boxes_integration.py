"""Box prompts in training: box files mapped to the model frame, `boxes.detector` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amsam_jax.data.folder import DataError
from amsam_jax.fewshot.preprocessing import Split, boxes_for

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "train" / "configs" / "am_sam.py") + ":smoke"


def _split(stems, sizes) -> Split:
    n = len(stems)
    return Split(
        stems=tuple(stems),
        image=np.zeros((n, 4, 4, 3), np.float32),
        label_low=np.zeros((n, 2, 2), np.int32),
        original_size=np.asarray(sizes),
        masks=tuple(np.zeros(s, bool) for s in sizes),
    )


def test_box_file_entries_map_to_the_model_frame_per_image():
    split = _split(["a", "b", "c"], [(100, 200), (50, 50), (300, 100)])
    box_file = {
        "detector": {},
        "boxes": {
            "a": {"box": [20, 10, 100, 50], "score": 0.9, "class": 0, "fallback": False},
            "b": {"box": None, "score": 0.0, "class": -1, "fallback": True},
            "c": {"box": [-5, 0, 120, 300], "score": 0.5, "class": 0, "fallback": False},
        },
    }
    boxes = boxes_for(split, box_file, "boxes.json", 256)
    np.testing.assert_allclose(boxes[0], [20 * 256 / 200, 10 * 256 / 100, 128, 128])
    np.testing.assert_allclose(boxes[1], [0, 0, 256, 256])  # null box: the full frame
    np.testing.assert_allclose(boxes[2], [0, 0, 256, 256])  # clipped to [0, 256]
    with pytest.raises(DataError, match="boxes.json: no box for image 'a'"):
        boxes_for(split, {"detector": {}, "boxes": {}}, "boxes.json", 256)


@pytest.mark.slow
def test_detector_setting_computes_box_file_and_trains_with_boxes(tmp_path):
    from yolo_fixtures import export_untrained_yolov8n, ultralytics_offline

    ultralytics_offline(tmp_path / "yolo_cfg")
    onnx = export_untrained_yolov8n(tmp_path / "yolo")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "amsam_jax.train", "--config", SMOKE, "--workdir", str(workdir)]
    sets = ["train.epochs=1", f"boxes.detector={onnx}", "boxes.conf=0.0001"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    box_file = json.loads((workdir / "boxes.json").read_text())
    assert box_file["detector"]["sha256"] and len(box_file["boxes"]) == 12  # 8 train + 4 test
    summary = json.loads((workdir / "summary.json").read_text())
    assert "fallback rate" in summary["boxes"] and str(workdir / "boxes.json") in summary["boxes"]
