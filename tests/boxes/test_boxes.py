"""Tests of the YOLOv8 ONNX box prompts: Ultralytics parity, geometry, NMS, box file, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from yolo_fixtures import (
    export_untrained_yolov8n,
    synthetic_image,
    ultralytics_offline,
    write_dataset,
)

from amsam_jax.boxes import box_file as F
from amsam_jax.boxes import detector as D
from amsam_jax.boxes import geometry as L
from amsam_jax.boxes.__main__ import main as boxes_main
from amsam_jax.utils.image import ImageReadError, read_image
from amsam_jax.utils.io import sha256_file
from amsam_jax.utils.nms import nms
from amsam_jax.utils.resize import resize_linear_uint8

# (H, W) of different sizes and aspect ratios, up- and downscaled by the letterbox.
PARITY_SIZES = [(480, 640), (1000, 300), (50, 70), (333, 1500), (640, 640), (1536, 2048)]
LOW_CONF = 1e-4  # untrained YOLOv8n scores are ~1.6e-4: this keeps tens of boxes per image


@pytest.fixture(scope="session")
def yolo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    ultralytics_offline(root / "ultralytics_config")
    return root


@pytest.fixture(scope="session")
def yolo_onnx(yolo_dir) -> Path:
    """Untrained YOLOv8n with COCO names, static batch 1, 640 px (exported once, ~5 s)."""
    return export_untrained_yolov8n(yolo_dir)


@pytest.fixture(scope="session")
def yolo_onnx_dynamic(yolo_dir) -> Path:
    return export_untrained_yolov8n(yolo_dir, dynamic=True)


@pytest.fixture(scope="session")
def detector(yolo_onnx) -> D.YoloDetector:
    return D.YoloDetector(yolo_onnx)


# ----------------------------------------------------------------------------------------------
# Letterbox and coordinates


def test_resize_is_bit_exact_with_opencv_inter_linear():
    import cv2

    rng = np.random.default_rng(0)
    for _ in range(60):
        src_h, src_w, h, w = (int(v) for v in rng.integers(1, 700, 4))
        image = rng.integers(0, 256, (src_h, src_w, 3), dtype=np.uint8)
        expected = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(resize_linear_uint8(image, (h, w)), expected)


@pytest.mark.parametrize("shape", PARITY_SIZES + [(1, 3000), (3000, 1)])
def test_letterbox_pads_with_114_around_the_resized_image(shape):
    image = np.zeros((*shape, 3), dtype=np.uint8)
    boxed, geometry = L.letterbox(image, (640, 640))
    rh, rw = geometry.resized
    inside = np.zeros((640, 640), dtype=bool)
    inside[geometry.top : geometry.top + rh, geometry.left : geometry.left + rw] = True
    assert boxed.shape == (640, 640, 3) and max(rh, rw) == 640
    assert (boxed[inside] == 0).all() and (boxed[~inside] == L.PAD_VALUE).all()
    assert abs(rh / shape[0] - rw / shape[1]) <= 1 / min(shape)  # aspect ratio kept


@pytest.mark.parametrize("shape", PARITY_SIZES)
def test_scale_boxes_inverts_the_letterbox_mapping(shape):
    h, w = shape
    geometry = L.Letterbox.fit(shape, (640, 640))
    rng = np.random.default_rng(1)
    xy = np.sort(rng.uniform(0, 1, (50, 2, 2)), axis=1) * [w, h]  # (K, corner, xy)
    boxes = xy.reshape(50, 4).astype(np.float32)
    gain = np.array([geometry.resized[1] / w, geometry.resized[0] / h] * 2)
    pad = np.array([geometry.left, geometry.top] * 2)
    letterboxed = (boxes * gain + pad).astype(np.float32)
    np.testing.assert_allclose(L.scale_boxes(letterboxed, geometry), boxes, atol=1e-3 * max(h, w))


def test_rectangle_found_in_letterboxed_image_maps_back_to_its_pixels():
    image = np.zeros((900, 400, 3), dtype=np.uint8)
    image[300:600, 100:250] = 255
    boxed, geometry = L.letterbox(image, (640, 640))
    ys, xs = np.nonzero(boxed[..., 0] >= 128)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)
    back = L.scale_boxes(found, geometry)[0]
    pixel = 900 / 640  # one letterboxed pixel in original pixels
    np.testing.assert_allclose(back, [100, 300, 250, 600], atol=pixel)


def test_scale_boxes_clips_to_the_image():
    geometry = L.Letterbox.fit((100, 200), (640, 640))
    out = L.scale_boxes(np.array([[-50, -50, 700, 700]], np.float32), geometry)
    np.testing.assert_array_equal(out, [[0, 0, 200, 100]])


def test_to_model_frame_scales_each_axis_to_256_and_clips():
    boxes = np.array([[0, 0, 400, 300], [100, 150, 200, 900]], np.float32)
    out = L.to_model_frame(boxes, (300, 400))
    np.testing.assert_allclose(out, [[0, 0, 256, 256], [64, 128, 128, 256]])


# ----------------------------------------------------------------------------------------------
# NMS and selection


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Textbook greedy NMS with scalar float32 arithmetic, as torchvision's C++ loop."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # sorted() is stable
    suppressed, keep = set(), []
    f = np.float32
    for a, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[a + 1 :]:
            if j in suppressed:
                continue
            w = max(f(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(f(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = f(w * h)
            area_i = f((boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]))
            area_j = f((boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]))
            if float(inter / (area_i + area_j - inter)) > iou_threshold:
                suppressed.add(j)
    return keep


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_nms_matches_brute_force_with_clusters_and_tied_scores(iou):
    rng = np.random.default_rng(int(iou * 10))
    centres = rng.uniform(0, 500, (12, 2))
    xy = centres[rng.integers(0, 12, 400)] + rng.normal(0, 8, (400, 2))
    wh = rng.uniform(10, 80, (400, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1).astype(np.float32)
    scores = np.round(rng.uniform(0, 1, 400), 2).astype(np.float32)  # many ties
    keep = nms(boxes, scores, iou)
    assert keep.tolist() == brute_force_nms(boxes, scores, iou)
    assert nms(boxes, scores, iou, max_keep=7).tolist() == keep[:7].tolist()


def raw_head(boxes_xywh: list, scores: list[list[float]]) -> np.ndarray:
    """(4 + nc, N) raw output from per-candidate xywh and class scores."""
    return np.concatenate([np.array(boxes_xywh, np.float32).T, np.array(scores, np.float32).T])


def test_non_max_suppression_is_class_aware_and_filters_classes():
    same = [50, 50, 20, 20]
    pred = raw_head([same, same, same], [[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]])
    det = D.non_max_suppression(pred, conf=0.25, iou=0.7)
    assert det.classes.tolist() == [0, 1] and det.scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_array_equal(det.boxes[0], [40, 40, 60, 60])
    only_1 = D.non_max_suppression(pred, conf=0.25, iou=0.7, classes=[1])
    assert only_1.classes.tolist() == [1]
    assert len(D.non_max_suppression(pred, conf=0.95, iou=0.7).scores) == 0


def test_non_max_suppression_keeps_at_most_max_det():
    rng = np.random.default_rng(0)
    xywh = np.concatenate([rng.uniform(0, 640, (500, 2)), np.full((500, 2), 4.0)], axis=1)
    pred = raw_head(xywh.tolist(), rng.uniform(0.5, 1, (500, 1)).tolist())
    assert len(D.non_max_suppression(pred, conf=0.25, iou=0.7, max_det=300).scores) == 300


def test_select_box_policies():
    det = D.Detections(
        np.array([[10, 10, 20, 20], [30, 5, 40, 15]], np.float32),
        np.array([0.9, 0.5], np.float32),
        np.array([3, 1]),
    )
    box, score, cls = D.select_box(det, "top1")
    assert box.tolist() == [10, 10, 20, 20] and score == pytest.approx(0.9) and cls == 3
    box, score, cls = D.select_box(det, "union")
    assert box.tolist() == [10, 5, 40, 20] and score == pytest.approx(0.9) and cls == 3
    assert D.select_box(det, "all")[0].tolist() == [10, 10, 20, 20]
    empty = D.Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0))
    assert D.select_box(empty, "top1") is None


def test_entry_with_policy_all_lists_every_box_and_fallbacks_follow_the_setting():
    det = D.Detections(np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), np.ones(2), np.ones(2))
    entry = F._entry(det, (10, 20), "abc", "all", "full_image")
    assert entry["box"] == [1, 2, 3, 4] and len(entry["boxes_all"]) == 2
    empty = D.Detections(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0))
    full = F._entry(empty, (10, 20), "abc", "top1", "full_image")
    assert full == {"box": [0, 0, 20, 10], "score": 0.0, "class": -1, "fallback": True,
                    "image_sha256": "abc"}  # fmt: skip
    assert F._entry(empty, (10, 20), "abc", "top1", "none")["box"] is None


# ----------------------------------------------------------------------------------------------
# Images


def saved(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_images_of_any_mode_load_as_rgb_uint8(tmp_path):
    rgb = Image.fromarray(synthetic_image(np.random.default_rng(0), 30, 40))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.full((30, 40), 51400, np.uint16))
    cases = {
        "gray.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": palette,
        "bits.png": rgb.convert("1"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen.png": sixteen,
        "la.png": rgb.convert("LA"),
    }
    for name, image in cases.items():
        out = read_image(saved(tmp_path, image, name))
        assert out.shape == (30, 40, 3) and out.dtype == np.uint8, name
    assert (read_image(tmp_path / "sixteen.png") == 51400 >> 8).all()
    np.testing.assert_array_equal(read_image(saved(tmp_path, rgb, "rgb.png")), np.asarray(rgb))


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = [255, 0, 0]  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = saved(tmp_path, Image.fromarray(stored), "rotated.jpg", exif=exif, quality=95)
    out = read_image(path)
    assert out.shape == (40, 20, 3)
    assert out[:15, :, 0].mean() > 200 and out[25:, :, 0].mean() < 50  # red on top


def test_bad_images_raise_one_line_errors_naming_the_file(tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = saved(tmp_path, Image.new("RGB", (64, 64)), "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    for path, problem in [(text, "cannot read image"), (truncated, "cannot read image"),
                          (tmp_path / "missing.png", "no such file")]:  # fmt: skip
        with pytest.raises(ImageReadError, match=problem) as info:
            read_image(path)
        assert info.value.path == str(path) and "\n" not in str(info.value)
    monkeypatch.setenv("AMSAM_MAX_IMAGE_PIXELS", "1000")  # 64x64 > 1000: over the one limit
    with pytest.raises(ImageReadError, match="image too large"):
        read_image(good)


def test_list_images_sorts_by_name_and_rejects_duplicate_stems(tmp_path):
    root = write_dataset(tmp_path / "data", {"train": [(20, 30)] * 3, "test": [(20, 30)]})
    assert [p.name for p in F.list_split_images(root, "train")] == [
        "train_00.png",
        "train_01.png",
        "train_02.png",
    ]
    assert len(F.list_split_images(root, "all")) == 4
    Image.new("RGB", (8, 8)).save(root / "train" / "images" / "train_01.jpg")
    with pytest.raises(D.BoxError, match="duplicate image stem 'train_01'"):
        F.list_split_images(root, "train")
    with pytest.raises(D.BoxError, match="no such folder"):
        F.list_split_images(tmp_path / "nowhere", "test")


# ----------------------------------------------------------------------------------------------
# Detector loading and bad models


def test_non_onnx_and_corrupt_files_are_rejected(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("hello")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(D.BoxError, match="not a loadable ONNX model"):
            D.YoloDetector(path)
    with pytest.raises(D.BoxError, match="no such file"):
        D.YoloDetector(tmp_path / "missing.onnx")


def tiny_onnx(path: Path, outputs: dict[str, list[int]]) -> Path:
    """A valid ONNX model with one image input and the given output shapes (not YOLO)."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    nodes, infos = [], []
    for name, shape in outputs.items():
        nodes.append(
            helper.make_node("Constant", [], [name], value=helper.make_tensor(
                name + "_value", TensorProto.FLOAT, shape, np.zeros(shape, np.float32).ravel()))
        )  # fmt: skip
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "tiny", [image], infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def test_onnx_models_without_a_yolov8_detection_head_are_rejected(tmp_path):
    cases = {
        "segmentation.onnx": {"output0": [1, 116, 8400], "output1": [1, 32, 160, 160]},
        "classifier.onnx": {"output0": [1, 1000]},
        "end2end.onnx": {"output0": [1, 300, 6]},
        "wrong_grid.onnx": {"output0": [1, 84, 100]},
    }
    for name, outputs in cases.items():
        with pytest.raises(D.BoxError, match="not a YOLOv8 detection head"):
            D.YoloDetector(tiny_onnx(tmp_path / name, outputs))


@pytest.mark.slow
def test_export_without_metadata_warns_and_uses_defaults(yolo_onnx, tmp_path):
    import onnx

    model = onnx.load(yolo_onnx)
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "bare.onnx")
    with pytest.warns(UserWarning, match="no Ultralytics metadata"):
        detector = D.YoloDetector(tmp_path / "bare.onnx")
    assert detector.imgsz == (640, 640) and detector.stride == 32 and detector.names[79] == "79"


@pytest.mark.slow
def test_detector_reads_metadata_and_resolves_classes_by_name_or_id(detector):
    assert detector.names[0] == "person" and detector.imgsz == (640, 640)
    assert detector.stride == 32 and detector.batch_size == 1
    assert detector.providers[-1] == "CPUExecutionProvider"
    assert detector.resolve_classes(["person", "car", 1, "1"]) == [0, 1, 2]
    with pytest.raises(D.BoxError, match="unknown class 'lesion'"):
        detector.resolve_classes(["lesion"])


# ----------------------------------------------------------------------------------------------
# Parity with Ultralytics


@pytest.mark.slow
@pytest.mark.parametrize("conf", [0.0, LOW_CONF])
def test_boxes_equal_ultralytics_postprocessing_of_the_same_onnx_output(detector, conf):
    import torch
    import torchvision  # noqa: F401  (Ultralytics' predict path: torchvision.ops.nms)
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import nms, ops

    rng = np.random.default_rng(0)
    letterbox_ref = LetterBox((640, 640), auto=False, stride=32)
    kept = 0
    for h, w in PARITY_SIZES:
        image = synthetic_image(rng, h, w)
        boxed, geometry = L.letterbox(image, detector.imgsz)
        np.testing.assert_array_equal(
            boxed, letterbox_ref(image=image[..., ::-1].copy())[..., ::-1]
        )
        raw = detector.run(boxed[None])  # (1, 84, 8400)
        ours = D.non_max_suppression(raw[0], conf, 0.7)
        theirs = nms.non_max_suppression(torch.from_numpy(raw), conf, 0.7, max_det=300)[0]
        assert len(theirs) == len(ours.scores) > 0
        np.testing.assert_array_equal(ours.classes, theirs[:, 5].numpy())
        np.testing.assert_allclose(ours.scores, theirs[:, 4].numpy(), rtol=0, atol=0)
        # Exact, in the letterboxed frame and after scale_boxes: the same float32 operations in
        # the same order (xywh -> xyxy, minus the integer pad, divided by the per-axis gain)
        # give the same bits (measured: max |diff| 0.0 px over all sizes). Catches a half-pixel
        # or one-pixel pad offset, a single gain for both axes and a missing clip, which a
        # 0.5 px tolerance lets through.
        np.testing.assert_array_equal(ours.boxes, theirs[:, :4].numpy())
        expected = ops.scale_boxes((640, 640), theirs[:, :4].clone(), (h, w)).numpy()
        np.testing.assert_array_equal(L.scale_boxes(ours.boxes, geometry), expected)
        kept += len(theirs)
    assert kept >= 6 * (300 if conf == 0 else 20)  # NMS parity over many boxes


@pytest.mark.slow
def test_detect_boxes_equals_ultralytics_predict_on_image_files(detector, yolo_onnx, tmp_path):
    from ultralytics import YOLO

    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate(PARITY_SIZES[:4]):
        paths.append(saved(tmp_path, Image.fromarray(synthetic_image(rng, h, w)), f"{i}.png"))
    results = YOLO(str(yolo_onnx), task="detect").predict(
        [str(p) for p in paths], imgsz=640, conf=LOW_CONF, iou=0.7, verbose=False
    )
    ours = D.detect_boxes(detector, [read_image(p) for p in paths], conf=LOW_CONF)
    for det, result in zip(ours, results, strict=True):
        assert len(det.scores) == len(result.boxes) > 0
        # Exact boxes and scores: the same pixels (our reader and letterbox equal cv2's), ONNX
        # Runtime's CPU provider on the same input tensor (Ultralytics opens its own session)
        # and the same float32 postprocessing (measured: max |diff| 0.0 px and 0.0 in score).
        # Catches a letterbox or pad offset of any size, a different resize or colour order at
        # the input, and scores of the wrong class or rescaled.
        np.testing.assert_array_equal(det.boxes, result.boxes.xyxy.numpy())
        np.testing.assert_array_equal(det.scores, result.boxes.conf.numpy())
        np.testing.assert_array_equal(det.classes, result.boxes.cls.numpy())


@pytest.mark.slow
def test_dynamic_batch_export_gives_the_same_boxes_batched(detector, yolo_onnx_dynamic):
    dynamic = D.YoloDetector(yolo_onnx_dynamic, batch_size=3)
    assert dynamic.batch_size == 3
    rng = np.random.default_rng(4)
    images = [synthetic_image(rng, h, w) for h, w in PARITY_SIZES[:5]]
    single = D.detect_boxes(detector, images, conf=LOW_CONF)
    batched = D.detect_boxes(dynamic, images, conf=LOW_CONF)
    for a, b in zip(single, batched, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.5)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Box file and CLI


@pytest.fixture
def dataset(tmp_path) -> Path:
    sizes = {"train": [(120, 160), (90, 200), (200, 100)], "test": [(64, 64), (300, 150)]}
    return write_dataset(tmp_path / "data", sizes)


def count_runs(detector: D.YoloDetector, monkeypatch) -> list[int]:
    """Records the batch size of every network run."""
    calls, run = [], detector.run
    monkeypatch.setattr(detector, "run", lambda batch: calls.append(len(batch)) or run(batch))
    return calls


@pytest.mark.slow
def test_box_file_format_and_class_filter_by_name(detector, dataset, tmp_path):
    paths = F.list_split_images(dataset)
    data = F.compute_box_file(
        detector, paths, tmp_path / "boxes.json", conf=LOW_CONF, classes=["person"]
    )
    assert json.loads((tmp_path / "boxes.json").read_text()) == json.loads(json.dumps(data))
    header = data["detector"]
    assert header["name"] == detector.name and header["sha256"] == detector.sha256
    assert header["classes"] == [0] and header["policy"] == "top1" and header["conf"] == LOW_CONF
    assert header["metadata"]["names"][0] == "person" and header["imgsz"] == [640, 640]
    assert set(data["boxes"]) == {p.stem for p in paths}
    for path in paths:
        entry = data["boxes"][path.stem]
        assert entry["image_sha256"] == sha256_file(path)
        if not entry["fallback"]:
            x0, y0, x1, y1 = entry["box"]
            w, h = Image.open(path).size
            assert entry["class"] == 0 and 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h


@pytest.mark.slow
def test_box_file_resumes_only_new_or_changed_images(detector, dataset, tmp_path, monkeypatch):
    paths = F.list_split_images(dataset)
    output = tmp_path / "boxes.json"
    F.compute_box_file(detector, paths[:2], output, conf=LOW_CONF)
    Image.new("RGB", (50, 50), "white").save(paths[0])  # changed image
    calls = count_runs(detector, monkeypatch)
    data = F.compute_box_file(detector, paths, output, conf=LOW_CONF)
    assert sum(calls) == len(paths) - 1  # all but the unchanged paths[1]
    assert data["boxes"][paths[0].stem]["image_sha256"] == sha256_file(paths[0])
    with pytest.raises(D.BoxError, match=r"other detector settings \(conf\)"):
        F.compute_box_file(detector, paths, output, conf=0.5)


@pytest.mark.slow
def test_a_run_stopped_by_a_bad_image_keeps_finished_entries(detector, dataset, tmp_path):
    paths = F.list_split_images(dataset)
    paths[3].write_bytes(b"broken")
    output = tmp_path / "boxes.json"
    with pytest.raises(D.BoxError, match=paths[3].name):
        F.compute_box_file(detector, paths, output, conf=LOW_CONF)
    assert set(F.load_box_file(output)["boxes"]) == {p.stem for p in paths[:3]}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_cli_writes_boxes_for_every_policy(yolo_onnx, dataset, tmp_path, capsys):
    files = {}
    for policy in D.POLICIES:
        files[policy] = tmp_path / f"{policy}.json"
        args = [
            "--detector",
            str(yolo_onnx),
            "--data",
            str(dataset),
            "--output",
            str(files[policy]),
        ]
        assert (
            boxes_main([*args, "--conf", str(LOW_CONF), "--policy", policy, "--no-progress"]) == 0
        )
        assert "5 images, 0 without detection" in capsys.readouterr().out
    top1, union, every = (json.loads(files[p].read_text())["boxes"] for p in D.POLICIES)
    for stem, entry in top1.items():
        assert "boxes_all" not in entry and "boxes_all" not in union[stem]
        assert (
            every[stem]["box"] == entry["box"]
            and every[stem]["boxes_all"][0]["box"] == entry["box"]
        )
        kept = np.array([b["box"] for b in every[stem]["boxes_all"]])
        assert union[stem]["box"] == [*kept[:, :2].min(0), *kept[:, 2:].max(0)]
        assert union[stem]["score"] == entry["score"] and len(kept) > 1


@pytest.mark.slow
@pytest.mark.parametrize(("fallback", "box"), [("full_image", [0, 0, 160, 120]), ("none", None)])
def test_cli_counts_fallbacks_when_nothing_is_detected(yolo_onnx, dataset, tmp_path, capsys,
                                                       fallback, box):  # fmt: skip
    output = tmp_path / "boxes.json"
    args = ["--detector", str(yolo_onnx), "--data", str(dataset), "--output", str(output)]
    assert boxes_main([*args, "--split", "train", "--fallback", fallback, "--no-progress"]) == 0
    assert (
        f"3 images, 3 without detection -> fallback {fallback} (100.0%)" in capsys.readouterr().out
    )
    entry = json.loads(output.read_text())["boxes"]["train_00"]
    assert entry["fallback"] and entry["box"] == box and entry["class"] == -1


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_code_2(yolo_onnx, dataset, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    cases = [
        (["--detector", str(bad), "--data", str(dataset)], f"error: {bad}: not a loadable ONNX"),
        (["--detector", str(yolo_onnx), "--data", str(tmp_path / "none")], "error: "),
        (["--detector", str(yolo_onnx), "--data", str(dataset), "--classes", "lesion"],
         f"error: {yolo_onnx}: unknown class 'lesion'"),
    ]  # fmt: skip
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "amsam_jax.boxes", *args, "--output", str(tmp_path / "o.json")],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_convert_yolo_rejects_missing_and_non_checkpoint_files(tmp_path, capsys):
    from weights_conversion.convert_yolo import main

    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "out.onnx")]) == 2
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: {tmp_path / 'missing.pt'}: no such file")
    assert "expected an Ultralytics .pt" in err[1]


@pytest.mark.slow
def test_bench_prints_json_throughput(yolo_onnx, capsys):
    from bench.boxes import main

    args = ["--detector", str(yolo_onnx), "--images", "2", "--rounds", "1", "--no-reference"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and report["amsam_jax"]["images_per_s"] > 0
