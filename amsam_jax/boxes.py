"""YOLOv8 ONNX box prompts (spec §6.1): detector, letterbox, NMS, box selection and the box file.

    python -m amsam_jax.boxes --detector yolov8n.onnx --data data/tiktok --output boxes.json

A frozen Ultralytics YOLOv8 detection export runs under ONNX Runtime (CUDA provider when present,
else CPU). Pre- and post-processing mirror Ultralytics 8.4 in numpy, so boxes equal its own
`YOLO("model.onnx").predict(...)` for the same thresholds:

- letterbox: `ultralytics/data/augment.py::LetterBox` (auto=False, centred, pad value 114) with a
  bit-exact numpy copy of OpenCV's uint8 `INTER_LINEAR` resize;
- NMS: `ultralytics/utils/nms.py::non_max_suppression` (single label per box, class-aware offsets
  of 7680 px, at most `MAX_NMS` candidates by score, at most `MAX_DET` kept) with torchvision's
  greedy `nms` (stable descending score order, suppress when IoU > threshold);
- back to the image: `ultralytics/utils/ops.py::scale_boxes` (padding from rounded sides, clip).

The result is cached per dataset as a JSON box file keyed by image stem; `compute_box_file` reuses
entries whose detector settings and image SHA-256 match, so a killed run resumes.
"""

import argparse
import ast
import dataclasses
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from amsam_jax.data import DataError, list_image_files

MAX_DET = 300  # Ultralytics `max_det`: kept boxes per image
MAX_NMS = 30000  # Ultralytics `max_nms`: candidates entering NMS, highest scores first
MAX_WH = 7680  # Ultralytics `max_wh`: per-class coordinate offset for class-aware NMS
PAD_VALUE = 114  # Ultralytics letterbox fill
DEFAULT_IMGSZ = 640
DEFAULT_STRIDE = 32
POLICIES = ("top1", "union", "all")
FALLBACKS = ("full_image", "none")
SPLITS = ("train", "test")
HEAD_STRIDES = ((8, 16, 32), (4, 8, 16, 32), (8, 16, 32, 64))  # YOLOv8, -p2, -p6
# Settings that must match for a box file entry to be reused.
SETTING_KEYS = ("sha256", "imgsz", "conf", "iou", "classes", "policy", "fallback", "max_det")
# OpenCV's fixed-point resize: weights are integers scaled by 2**11 (INTER_RESIZE_COEF_BITS).
_COEF_SCALE = 2048


class BoxError(Exception):
    """A bad input (detector, image, data folder or box file); `str()` is `<file>: <problem>`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem.splitlines()[0] if problem else "unknown error"
        super().__init__(f"{self.path}: {self.problem}")


def report_error(err: BoxError) -> int:
    """Prints `error: <file>: <problem>` to stderr and returns the CLI exit code 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decodes an image file to 8-bit RGB, upright.

    The EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), as the trainer does when it
    reads the same image, so boxes and masks share one frame. Grayscale, palette, RGBA (alpha
    dropped), CMYK and 16-bit images (top 8 bits, as OpenCV's `imread`) become RGB uint8. PIL's
    decompression-bomb limit is kept (about 179 megapixels): larger files are an error, smaller
    huge images are decoded and downsampled by the letterbox.

    Args:
        data: the encoded file.
        path: named in errors.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        BoxError: not an image, truncated, too large, or an unsupported mode.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                return _to_rgb8(img, path)
        except Image.DecompressionBombError as e:
            raise BoxError(path, f"image too large ({e})") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise BoxError(path, f"cannot read image ({e})") from e


def _to_rgb8(img: Image.Image, path: str | os.PathLike) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        gray = (np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise BoxError(path, "floating-point images are not supported; save as 8/16-bit")
    if img.mode in ("P", "PA", "LA"):  # via RGBA: palette transparency would warn otherwise
        img = img.convert("RGBA")
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file to (H, W, 3) uint8 RGB, upright; see `decode_image`."""
    path = Path(path)
    if not path.is_file():
        raise BoxError(path, "no such file")
    return decode_image(path.read_bytes(), path)


def list_images(data_dir: str | os.PathLike, split: str = "all") -> list[Path]:
    """Lists `DIR/{train,test}/images/*`, sorted by file name within each split.

    Args:
        data_dir: the data folder.
        split: "train", "test" or "all" (the splits that exist, train first).

    Returns:
        Image paths.

    Raises:
        BoxError: missing folder, no images, or two images with the same stem (their box file
            keys would collide).
    """
    data_dir = Path(data_dir)
    if split not in (*SPLITS, "all"):
        raise BoxError(data_dir, f"unknown split {split!r}; expected train, test or all")
    splits = SPLITS if split == "all" else (split,)
    folders = [data_dir / s / "images" for s in splits]
    if split == "all":
        folders = [f for f in folders if f.is_dir()]
        if not folders:
            raise BoxError(data_dir, "no train/images or test/images folder")
    paths, seen = [], {}
    for folder in folders:
        try:
            found = list_image_files(folder)
        except DataError as e:
            raise BoxError(e.path, e.problem) from None
        for p in found:
            if p.stem in seen:  # across splits: box file keys are stems
                raise BoxError(p, f"duplicate image stem {p.stem!r} (also {seen[p.stem]})")
            seen[p.stem] = p
        paths += found
    return paths


# ----------------------------------------------------------------------------------------------
# Letterbox and coordinates


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterbox, as `LetterBox.get_params` (auto=False, center=True).

    Attributes:
        image_shape: (H, W) of the original image.
        shape: (H, W) of the letterboxed image (the detector input).
        resized: (H, W) of the image inside the padding.
        top: rows of padding above.
        left: columns of padding on the left.
    """

    image_shape: tuple[int, int]
    shape: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int

    @classmethod
    def fit(cls, image_shape: tuple[int, int], shape: tuple[int, int]) -> "Letterbox":
        h, w = image_shape
        r = min(shape[0] / h, shape[1] / w)
        new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
        dw, dh = (shape[1] - new_w) / 2, (shape[0] - new_h) / 2
        return cls((h, w), tuple(shape), (new_h, new_w), round(dh - 0.1), round(dw - 0.1))


def _resize_taps(
    src: int, dst: int, clamp: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV `resizeGeneric_` linear taps: source indices and 2**11-scaled integer weights.

    OpenCV clamps the fraction to 0 at the x borders but not at the y borders (where it clips the
    row indices instead); `clamp` selects the x behaviour.
    """
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = f - i0.astype(np.float32)
    if clamp:
        f[(i0 < 0) | (i0 >= src - 1)] = 0
    w0 = np.rint((np.float32(1) - f) * _COEF_SCALE).astype(np.int32)
    w1 = np.rint(f * _COEF_SCALE).astype(np.int32)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def resize_linear_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bit-exact numpy copy of `cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`.

    Half-pixel centres, no antialiasing, OpenCV's 11-bit fixed-point weights and its SIMD
    rounding; checked against OpenCV in the tests. Only the needed source rows are read.

    Args:
        image: (H, W, C) uint8.
        size: (h, w) output size.

    Returns:
        (h, w, C) uint8.
    """
    (h, w), (src_h, src_w, channels) = size, image.shape
    if (h, w) == (src_h, src_w):
        return image
    x0, x1, a0, a1 = _resize_taps(src_w, w, clamp=True)
    y0, y1, b0, b1 = _resize_taps(src_h, h, clamp=False)
    rows, inverse = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    src = image[rows].reshape(len(rows), src_w * channels)  # (R, W*C)
    c = np.arange(channels)
    horiz = np.multiply(
        np.take(src, (x0[:, None] * channels + c).ravel(), axis=1),
        np.repeat(a0, channels),
        dtype=np.int32,
    )  # (R, w*C), scaled by 2**11
    horiz += np.multiply(
        np.take(src, (x1[:, None] * channels + c).ravel(), axis=1),
        np.repeat(a1, channels),
        dtype=np.int32,
    )
    horiz >>= 4
    top, bottom = horiz[inverse[:h]], horiz[inverse[h:]]  # (h, w*C) each
    top *= b0[:, None]
    top >>= 16
    bottom *= b1[:, None]
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2  # a weighted mean: already in [0, 255]
    return top.astype(np.uint8).reshape(h, w, channels)


def letterbox(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resizes keeping the aspect ratio and pads with 114 to `shape`, like Ultralytics' LetterBox.

    Args:
        image: (H, W, 3) uint8.
        shape: (h, w) detector input size.

    Returns:
        (h, w, 3) uint8 letterboxed image and its geometry.
    """
    geometry = Letterbox.fit(image.shape[:2], shape)
    resized = resize_linear_uint8(image, geometry.resized)
    out = np.full((*shape, 3), PAD_VALUE, dtype=np.uint8)
    rh, rw = geometry.resized
    out[geometry.top : geometry.top + rh, geometry.left : geometry.left + rw] = resized
    return out, geometry


def scale_boxes(boxes: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """Maps boxes from the letterboxed frame to the original image, as `ops.scale_boxes`.

    Args:
        boxes: (K, 4) float32 xyxy in the letterboxed frame.
        geometry: the letterbox that produced the detector input.

    Returns:
        (K, 4) float32 xyxy in original pixel coordinates, clipped to the image.
    """
    (h, w), (new_h, new_w) = geometry.image_shape, geometry.resized
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] -= geometry.left
    out[:, [1, 3]] -= geometry.top
    out[:, [0, 2]] /= new_w / w
    out[:, [1, 3]] /= new_h / h
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def to_model_frame(boxes: np.ndarray, image_shape: tuple[int, int], size: int = 256) -> np.ndarray:
    """Maps original-image boxes to the SAM input frame: x' = x·size/W, y' = y·size/H (spec §6.1).

    Args:
        boxes: (..., 4) xyxy in original pixel coordinates.
        image_shape: (H, W) of the original image.
        size: side of the square SAM input.

    Returns:
        (..., 4) float32 xyxy in [0, size].
    """
    h, w = image_shape
    scale = np.array([size / w, size / h, size / w, size / h], dtype=np.float32)
    return np.clip(np.asarray(boxes, dtype=np.float32) * scale, 0, size)


# ----------------------------------------------------------------------------------------------
# Post-processing


@dataclasses.dataclass(frozen=True)
class Detections:
    """Kept detections of one image, highest score first.

    Attributes:
        boxes: (K, 4) float32 xyxy.
        scores: (K,) float32.
        classes: (K,) int64.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None
) -> np.ndarray:
    """Greedy NMS with torchvision's semantics (`torchvision.ops.nms` on CPU).

    Boxes are visited by descending score (stable: ties keep input order); a box is dropped when
    its IoU with a kept box is > `iou_threshold` (a NaN IoU of two empty boxes drops nothing).
    Arithmetic is float32 like the C++ kernel. Stopping at `max_keep` gives the same first
    `max_keep` indices as running to the end and truncating.

    Args:
        boxes: (N, 4) float32 xyxy.
        scores: (N,) float32.
        iou_threshold: suppression threshold.
        max_keep: stop after this many kept boxes.

    Returns:
        (K,) int64 indices into `boxes`, by descending score.
    """
    boxes = boxes.astype(np.float32, copy=False)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while order.size and (max_keep is None or len(keep) < max_keep):
            i, rest = order[0], order[1:]
            keep.append(i)
            w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            order = rest[~(iou.astype(np.float64) > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def non_max_suppression(
    prediction: np.ndarray,
    conf: float,
    iou: float,
    classes: Sequence[int] | None = None,
    max_det: int = MAX_DET,
) -> Detections:
    """Decodes one raw YOLOv8 output and runs class-aware NMS, as Ultralytics' function.

    Args:
        prediction: (4 + nc, N) raw head output: cx, cy, w, h, then per-class scores.
        conf: keep candidates whose best class score is > conf.
        iou: NMS IoU threshold.
        classes: class ids to keep; None keeps all.
        max_det: kept boxes at most.

    Returns:
        Detections in the detector's (letterboxed) frame.
    """
    scores_all = prediction[4:]  # (nc, N)
    best = scores_all.argmax(0)
    score = scores_all[best, np.arange(prediction.shape[1])]
    keep = score > conf
    if classes is not None:
        keep &= np.isin(best, np.asarray(classes))
    idx = np.flatnonzero(keep)
    if idx.size > MAX_NMS:
        idx = idx[np.argsort(-score[idx], kind="stable")[:MAX_NMS]]
    xywh = prediction[:4, idx].T.astype(np.float32)  # (n, 4)
    half = xywh[:, 2:] / 2
    boxes = np.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)
    score, cls = score[idx].astype(np.float32), best[idx].astype(np.int64)
    offset = cls.astype(np.float32)[:, None] * np.float32(MAX_WH)
    kept = nms(boxes + offset, score, iou, max_keep=max_det)
    return Detections(boxes[kept], score[kept], cls[kept])


def select_box(detections: Detections, policy: str) -> tuple[np.ndarray, float, int] | None:
    """Chooses the box prompt of one image.

    Args:
        detections: kept detections, highest score first.
        policy: "top1" (highest score; also the selected box of "all") or "union" (the smallest
            box containing every kept box, with the top box's score and class).

    Returns:
        ((4,) float32 xyxy box, score, class id), or None when there is no detection.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if not len(detections.scores):
        return None
    box = detections.boxes[0]
    if policy == "union":
        b = detections.boxes
        box = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()], np.float32)
    return box, float(detections.scores[0]), int(detections.classes[0])


# ----------------------------------------------------------------------------------------------
# Detector


def _parse_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Ultralytics writes Python literals (`str(dict)`) into ONNX metadata_props."""
    out = {}
    for key, value in raw.items():
        if key in ("stride", "batch", "channels"):
            out[key] = int(value)
        elif key in ("imgsz", "names", "args", "end2end", "kpt_shape"):
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
        else:
            out[key] = value
    return out


class YoloDetector:
    """An Ultralytics YOLOv8 detection export (`[B, 4+nc, N]` output) under ONNX Runtime.

    Attributes:
        path: the ONNX file.
        name: its file name.
        sha256: its SHA-256.
        metadata: Ultralytics metadata (names, imgsz, stride, task, ...), parsed.
        names: class id -> name.
        imgsz: (h, w) detector input size.
        stride: the model's largest stride.
        batch_size: images per session run (the static batch, or a chosen one when dynamic).
        providers: ONNX Runtime execution providers in use.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        imgsz: int | tuple[int, int] | None = None,
        batch_size: int | None = None,
        providers: Sequence[str] | None = None,
    ):
        """Loads and validates the model.

        Args:
            path: ONNX file.
            imgsz: input size; default the export's (metadata, else static input shape, else 640).
            batch_size: images per run when the batch axis is dynamic (default 4).
            providers: ONNX Runtime providers; default CUDA when available, then CPU.

        Raises:
            BoxError: missing, non-ONNX or corrupt file, or outputs that are not a YOLOv8 head.
        """
        # Imported here: reading box files (the trainer) must not need ONNX Runtime.
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        self.path = Path(path)
        if not self.path.is_file():
            raise BoxError(self.path, "no such file")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        load_errors = (
            ort_errors.InvalidProtobuf,
            ort_errors.InvalidArgument,
            ort_errors.InvalidGraph,
            ort_errors.NoSuchFile,
            ort_errors.Fail,
        )
        options = ort.SessionOptions()
        # No busy-waiting between runs: spinning workers would starve the thread that decodes and
        # letterboxes the next images (measured 1.5x slower end to end on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except load_errors as e:
            raise BoxError(self.path, f"not a loadable ONNX model ({e})") from e
        self.providers = self.session.get_providers()
        self.name = self.path.name
        self.sha256 = sha256_file(self.path)
        self.metadata = _parse_metadata(self.session.get_modelmeta().custom_metadata_map)
        self._check_head()
        self._resolve_settings(imgsz, batch_size)

    def _check_head(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        channels = inputs[0].shape[1] if len(inputs) == 1 and len(inputs[0].shape) == 4 else 0
        if channels != 3 and isinstance(channels, int):
            shapes = [i.shape for i in inputs]
            raise BoxError(self.path, f"expected one (B, 3, H, W) image input, got {shapes}")
        if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
            raise BoxError(self.path, f"expected a float image input, got {inputs[0].type}")
        shape = outputs[0].shape if len(outputs) == 1 else None
        if shape is None or len(shape) != 3 or not isinstance(shape[1], int) or shape[1] < 5:
            found = [o.shape for o in outputs]
            raise BoxError(
                self.path,
                f"outputs {found} are not a YOLOv8 detection head [B, 4+nc, N] "
                "(segmentation, pose and end-to-end exports are not supported)",
            )
        hw, anchors = inputs[0].shape[2:], shape[2]
        if all(isinstance(d, int) for d in (*hw, anchors)):
            # YOLOv8 heads predict one candidate per cell of the P3-P5 grids (P2 / P6 variants
            # add stride 4 / 64); an end-to-end head gives (B, 300, 6) instead.
            counts = [sum((hw[0] // s) * (hw[1] // s) for s in strides) for strides in HEAD_STRIDES]
            if anchors not in counts:
                raise BoxError(
                    self.path,
                    f"output {shape} is not a YOLOv8 detection head [B, 4+nc, N]: for a {hw} "
                    f"input N would be one of {counts}",
                )
        task = self.metadata.get("task", "detect")
        if task != "detect":
            raise BoxError(self.path, f"a {task!r} export, not a YOLOv8 detection model")
        if self.metadata.get("end2end") is True:
            raise BoxError(self.path, "an end-to-end (NMS-free) export; export with end2end=False")
        self.num_classes = shape[1] - 4
        names = self.metadata.get("names")
        if isinstance(names, dict) and len(names) != self.num_classes:
            raise BoxError(
                self.path, f"metadata has {len(names)} names but the head has {self.num_classes}"
            )
        self.input = inputs[0]

    def _resolve_settings(self, imgsz: int | tuple[int, int] | None, batch_size: int | None):
        input_hw = self.input.shape[2:]
        static_hw = all(isinstance(d, int) for d in input_hw)
        missing = [k for k in ("names", "imgsz", "stride") if k not in self.metadata]
        names = self.metadata.get("names")
        self.names = (
            {int(k): str(v) for k, v in names.items()}
            if isinstance(names, dict)
            else {i: str(i) for i in range(self.num_classes)}
        )
        self.stride = int(self.metadata.get("stride", DEFAULT_STRIDE))
        default = tuple(input_hw) if static_hw else self.metadata.get("imgsz", DEFAULT_IMGSZ)
        size = default if imgsz is None else imgsz
        self.imgsz = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if missing:
            warnings.warn(
                f"{self.path}: no Ultralytics metadata {missing}; assuming names "
                f"0..{self.num_classes - 1}, imgsz {self.imgsz}, stride {self.stride}",
                stacklevel=3,
            )
        if static_hw and self.imgsz != tuple(input_hw):
            raise BoxError(self.path, f"static input {tuple(input_hw)} but imgsz {self.imgsz}")
        if any(s % self.stride for s in self.imgsz):
            raise BoxError(
                self.path, f"imgsz {self.imgsz} is not a multiple of stride {self.stride}"
            )
        static_batch = self.input.shape[0] if isinstance(self.input.shape[0], int) else None
        self.batch_size = static_batch or batch_size or 4
        self.dtype = np.float16 if self.input.type == "tensor(float16)" else np.float32

    def resolve_classes(self, classes: Sequence[str | int] | None) -> list[int] | None:
        """Class filter by name or id ("person", "0", 0) -> sorted ids; None keeps all.

        Raises:
            BoxError: a name or id the detector does not have.
        """
        if classes is None:
            return None
        by_name = {name: i for i, name in self.names.items()}
        ids = set()
        for c in classes:
            if isinstance(c, str) and c in by_name:
                ids.add(by_name[c])
            elif str(c).lstrip("-").isdigit() and int(c) in self.names:
                ids.add(int(c))
            else:
                shown = ", ".join(list(by_name)[:10]) + (", ..." if len(by_name) > 10 else "")
                raise BoxError(self.path, f"unknown class {c!r} (classes: {shown})")
        return sorted(ids)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Runs the network on letterboxed images, `batch_size` at a time.

        Args:
            batch: (B, h, w, 3) uint8 letterboxed RGB.

        Returns:
            (B, 4 + nc, N) float32 raw head output.
        """
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # (B, 3, h, w)
        x = np.divide(x, 255, dtype=np.float32).astype(self.dtype, copy=False)
        outputs = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            n = len(chunk)
            if isinstance(self.input.shape[0], int) and n < self.batch_size:  # static batch: pad
                chunk = np.concatenate(
                    [chunk, np.zeros_like(chunk[:1]).repeat(self.batch_size - n, 0)]
                )
            out = self.session.run(None, {self.input.name: chunk})[0][:n]
            outputs.append(out.astype(np.float32, copy=False))
        return np.concatenate(outputs)


def detect_boxes(
    detector: YoloDetector,
    images: Sequence[np.ndarray],
    conf: float = 0.25,
    iou: float = 0.7,
    classes: Sequence[int] | None = None,
    max_det: int = MAX_DET,
) -> list[Detections]:
    """Detects boxes in RGB images (numpy in, numpy out).

    Args:
        detector: the loaded YOLOv8 export.
        images: each (H, W, 3) uint8 RGB, as `load_image` returns.
        conf: confidence threshold (Ultralytics default 0.25).
        iou: NMS IoU threshold (Ultralytics default 0.7).
        classes: class ids to keep (`detector.resolve_classes`); None keeps all.
        max_det: kept boxes per image at most.

    Returns:
        Per image, detections in its original pixel coordinates, highest score first.
    """
    if not images:
        return []
    boxed = [letterbox(image, detector.imgsz) for image in images]
    raw = detector.run(np.stack([b[0] for b in boxed]))
    return [
        postprocess(pred, geometry, conf, iou, classes, max_det)
        for pred, (_, geometry) in zip(raw, boxed, strict=True)
    ]


def postprocess(
    prediction: np.ndarray,
    geometry: Letterbox,
    conf: float,
    iou: float,
    classes: Sequence[int] | None,
    max_det: int,
) -> Detections:
    """NMS on one raw output, then boxes back to the original image (see `non_max_suppression`).

    Args:
        prediction: (4 + nc, N) raw head output of one letterboxed image.
        geometry: its letterbox.

    Returns:
        Detections in original pixel coordinates.
    """
    det = non_max_suppression(prediction, conf, iou, classes, max_det)
    return Detections(scale_boxes(det.boxes, geometry), det.scores, det.classes)


# ----------------------------------------------------------------------------------------------
# Box file


def _entry(
    detections: Detections, image_shape: tuple[int, int], sha: str, policy: str, fallback: str
) -> dict[str, Any]:
    selected = select_box(detections, policy)
    if selected is None:
        h, w = image_shape
        box = [0.0, 0.0, float(w), float(h)] if fallback == "full_image" else None
        entry = {"box": box, "score": 0.0, "class": -1, "fallback": True}
    else:
        box, score, cls = selected
        entry = {"box": [float(v) for v in box], "score": score, "class": cls, "fallback": False}
    if policy == "all":
        entry["boxes_all"] = [
            {"box": [float(v) for v in b], "score": float(s), "class": int(c)}
            for b, s, c in zip(detections.boxes, detections.scores, detections.classes, strict=True)
        ]
    entry["image_sha256"] = sha
    return entry


def load_box_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a box file written by `compute_box_file`.

    Returns:
        {"detector": {...}, "boxes": {stem: {"box", "score", "class", "fallback", ...}}}.

    Raises:
        BoxError: missing file, invalid JSON or not a box file.
    """
    path = Path(path)
    if not path.is_file():
        raise BoxError(path, "no such file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BoxError(path, f"not a JSON box file ({e})") from e
    if not (isinstance(data, dict) and isinstance(data.get("detector"), dict)):
        raise BoxError(path, "not a box file (no 'detector' section)")
    if not isinstance(data.get("boxes"), dict):
        raise BoxError(path, "not a box file (no 'boxes' section)")
    return data


def write_box_file(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes atomically (temporary file + `os.replace`): a killed run leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    path: Path
    sha: str
    image_shape: tuple[int, int] | None  # None: reused, not decoded
    boxed: np.ndarray | None
    geometry: Letterbox | None


def _prefetch(
    paths: Sequence[Path], load: Callable[[Path], _Loaded], depth: int
) -> Iterator[_Loaded]:
    """Runs `load` on the next `depth` paths in one worker thread while the caller infers."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[Future] = deque()
        for path in paths:
            pending.append(pool.submit(load, path))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def compute_box_file(
    detector: str | os.PathLike | YoloDetector,
    image_paths: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    classes: Sequence[str | int] | None = None,
    policy: str = "top1",
    fallback: str = "full_image",
    max_det: int = MAX_DET,
    progress: bool = False,
    save_every: float = 30.0,
) -> dict[str, Any]:
    """Computes (or completes) the box file of a set of images.

    Entries of an existing `output` whose image SHA-256 matches are reused; its detector settings
    (model SHA-256, imgsz, thresholds, classes, policy, fallback, max_det) must match. The file is
    rewritten atomically every `save_every` seconds and when the run stops, also on an error.

    Args:
        detector: a YoloDetector or a path to the ONNX export.
        image_paths: images; their stems are the keys and must be unique.
        output: box file to resume and write; None computes in memory only.
        conf: confidence threshold.
        iou: NMS IoU threshold.
        classes: class names or ids to keep; None keeps all.
        policy: "top1", "union" or "all" (see `select_box`; "all" adds "boxes_all").
        fallback: box for an image with no detection: "full_image" ([0, 0, W, H]) or "none" (null).
        max_det: kept boxes per image at most.
        progress: show a progress bar on stderr.
        save_every: seconds between intermediate saves.

    Returns:
        The box file: {"detector": {...}, "boxes": {stem: entry}}.

    Raises:
        BoxError: a bad detector, image or existing box file.
    """
    if policy not in POLICIES:
        raise BoxError(output or "<boxes>", f"unknown policy {policy!r}; expected {POLICIES}")
    if fallback not in FALLBACKS:
        raise BoxError(output or "<boxes>", f"unknown fallback {fallback!r}; expected {FALLBACKS}")
    if not isinstance(detector, YoloDetector):
        detector = YoloDetector(detector)
    class_ids = detector.resolve_classes(classes)
    header = {
        "name": detector.name,
        "sha256": detector.sha256,
        "metadata": detector.metadata,
        "imgsz": list(detector.imgsz),
        "conf": conf,
        "iou": iou,
        "classes": class_ids,
        "policy": policy,
        "fallback": fallback,
        "max_det": max_det,
        "input": "original image, EXIF-transposed, RGB uint8",
    }
    paths = [Path(p) for p in image_paths]
    stems = {}
    for p in paths:
        if p.stem in stems:
            raise BoxError(p, f"duplicate image stem {p.stem!r} (also {stems[p.stem]})")
        stems[p.stem] = p
    data = {"detector": header, "boxes": {}}
    if output is not None and Path(output).exists():
        old = load_box_file(output)
        header_json = json.loads(json.dumps(header))  # tuples and int keys as stored
        diff = [k for k in SETTING_KEYS if old["detector"].get(k) != header_json[k]]
        if diff:
            raise BoxError(
                output,
                f"made with other detector settings ({', '.join(diff)}); use another --output",
            )
        data["boxes"] = old["boxes"]
    boxes = data["boxes"]

    def load(path: Path) -> _Loaded:
        if not path.is_file():
            raise BoxError(path, "no such file")
        raw = path.read_bytes()
        sha = sha256_bytes(raw)
        if boxes.get(path.stem, {}).get("image_sha256") == sha:
            return _Loaded(path, sha, None, None, None)
        image = decode_image(raw, path)
        boxed, geometry = letterbox(image, detector.imgsz)
        return _Loaded(path, sha, image.shape[:2], boxed, geometry)

    def flush(batch: list[_Loaded]) -> None:
        raw = detector.run(np.stack([item.boxed for item in batch]))
        for pred, item in zip(raw, batch, strict=True):
            det = postprocess(pred, item.geometry, conf, iou, class_ids, max_det)
            boxes[item.path.stem] = _entry(det, item.image_shape, item.sha, policy, fallback)

    last_save = time.monotonic()
    batch: list[_Loaded] = []
    bar = tqdm(total=len(paths), disable=not progress, unit="img", desc="boxes")
    try:
        for item in _prefetch(paths, load, depth=2 * detector.batch_size):
            if item.boxed is not None:
                batch.append(item)
            if len(batch) == detector.batch_size:
                flush(batch)
                bar.update(len(batch))
                batch = []
            if item.boxed is None:
                bar.update(1)
            if output is not None and time.monotonic() - last_save > save_every:
                write_box_file(data, output)
                last_save = time.monotonic()
        if batch:
            flush(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        if output is not None:
            write_box_file(data, output)
    return data


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.boxes",
        description="Precompute YOLOv8 box prompts for a data folder (DIR/{train,test}/images).",
    )
    parser.add_argument("--detector", required=True, help="YOLOv8 ONNX export")
    parser.add_argument("--data", required=True, help="data folder")
    parser.add_argument("--split", default="all", choices=[*SPLITS, "all"])
    parser.add_argument("--output", required=True, help="box file (JSON); resumed if it exists")
    parser.add_argument("--classes", nargs="+", default=None, help="class names or ids to keep")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--policy", default="top1", choices=POLICIES)
    parser.add_argument("--fallback", default="full_image", choices=FALLBACKS)
    parser.add_argument("--imgsz", type=int, default=None, help="default: the export's")
    parser.add_argument("--batch-size", type=int, default=None, help="dynamic-batch exports")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for flag, value in (("--conf", args.conf), ("--iou", args.iou)):
        if not 0 <= value <= 1:
            print(f"error: {flag}: {value} is not in [0, 1]", file=sys.stderr)
            return 2
    try:
        paths = list_images(args.data, args.split)
        detector = YoloDetector(args.detector, imgsz=args.imgsz, batch_size=args.batch_size)
        data = compute_box_file(
            detector,
            paths,
            args.output,
            conf=args.conf,
            iou=args.iou,
            classes=args.classes,
            policy=args.policy,
            fallback=args.fallback,
            progress=not args.no_progress,
        )
    except BoxError as e:
        return report_error(e)
    entries = [data["boxes"][p.stem] for p in paths]
    fallbacks = sum(e["fallback"] for e in entries)
    print(
        f"{args.output}: {len(entries)} images, {fallbacks} without detection -> "
        f"fallback {args.fallback} ({100 * fallbacks / len(entries):.1f}%); "
        f"detector {detector.name} on {detector.providers[0]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
