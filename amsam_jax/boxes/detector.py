"""A YOLOv8 detector under ONNX Runtime (the only onnxruntime import), with Ultralytics' NMS.

A frozen Ultralytics YOLOv8 detection export runs under ONNX Runtime (CUDA provider when present,
else CPU). Pre- and post-processing mirror Ultralytics 8.4 in NumPy, so boxes equal its own
`YOLO("model.onnx").predict(...)` for the same thresholds: the letterbox is `boxes.geometry`;
NMS is `ultralytics/utils/nms.py::non_max_suppression` (single label per box, class-aware offsets
of 7680 px, at most `MAX_NMS` candidates by score, at most `MAX_DET` kept) with torchvision's
greedy `nms`. Arrays in and out are NumPy; the loaded detector is passed to whoever needs it.
"""

import ast
import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amsam_jax.boxes.geometry import Letterbox, letterbox, scale_boxes
from amsam_jax.utils.errors import AmsamError, first_line
from amsam_jax.utils.io import sha256_file
from amsam_jax.utils.nms import nms

MAX_DET = 300  # Ultralytics `max_det`: kept boxes per image
MAX_NMS = 30000  # Ultralytics `max_nms`: candidates entering NMS, highest scores first
MAX_WH = 7680  # Ultralytics `max_wh`: per-class coordinate offset for class-aware NMS
DEFAULT_IMGSZ = 640
DEFAULT_STRIDE = 32
POLICIES = ("top1", "union", "all")
HEAD_STRIDES = ((8, 16, 32), (4, 8, 16, 32), (8, 16, 32, 64))  # YOLOv8, -p2, -p6


class BoxError(AmsamError):
    """A bad input (detector, image, data folder or box file); `str()` is `<file>: <problem>`."""


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


def _parse_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """Ultralytics writes Python literals (`str(dict)`) into ONNX metadata_props.

    Raises:
        BoxError: a `stride`, `batch` or `channels` entry that is not a positive whole number.
    """
    out = {}
    for key, value in raw.items():
        if key in ("stride", "batch", "channels"):
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = 0
            if out[key] < 1:
                raise BoxError(path, f"metadata {key}={value!r} is not a positive whole number")
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
            BoxError: missing, non-ONNX or corrupt file, an input that is not one float
                (B, 3, H, W) image, outputs that are not a YOLOv8 head, bad metadata, or an
                `imgsz` / `batch_size` below 1 (named as such).
        """
        # Imported here: reading box files (the trainer) must not need ONNX Runtime.
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        self.path = Path(path)
        if self.path.is_dir():
            raise BoxError(self.path, "is a directory, not an ONNX model")
        if not self.path.is_file():
            raise BoxError(self.path, "no such file")
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise BoxError("batch_size", f"must be >= 1, got {batch_size!r}")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        # Every error class of ONNX Runtime's bindings (all plain Exception subclasses).
        self._ort_errors = tuple(
            v for v in vars(ort_errors).values() if isinstance(v, type) and issubclass(v, Exception)
        )
        options = ort.SessionOptions()
        # No busy-waiting between runs: spinning workers would starve the thread that decodes and
        # letterboxes the next images (measured 1.5x slower end to end on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except self._ort_errors as e:
            raise BoxError(self.path, f"not a loadable ONNX model ({first_line(e)})") from None
        self.providers = self.session.get_providers()
        self.name = self.path.name
        self.sha256 = sha256_file(self.path)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = _parse_metadata(meta, self.path)
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
        size = [size] if isinstance(size, int) else size
        if (
            not isinstance(size, list | tuple)
            or len(size) not in (1, 2)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            where, what = ("imgsz", "") if imgsz is not None else (self.path, "metadata imgsz ")
            raise BoxError(where, f"{what}{size!r} is not a size (a positive number or h, w)")
        self.imgsz = (size[0], size[-1])
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
        if static_batch is not None and static_batch < 1:
            raise BoxError(self.path, f"static batch size {static_batch}; expected >= 1")
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

        Raises:
            BoxError: ONNX Runtime failed, or the output does not have the head's shape.
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
            try:
                out = self.session.run(None, {self.input.name: chunk})[0]
            except self._ort_errors as e:
                raise BoxError(self.path, f"inference failed ({first_line(e)})") from None
            out = np.asarray(out)
            if out.ndim != 3 or out.shape[0] < n or out.shape[1] != 4 + self.num_classes:
                raise BoxError(
                    self.path,
                    f"inference gave an output of shape {out.shape}, expected "
                    f"({len(chunk)}, {4 + self.num_classes}, N)",
                )
            outputs.append(out[:n].astype(np.float32, copy=False))
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
