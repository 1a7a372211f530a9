"""Greedy box NMS with torchvision's semantics, shared by the mask generator and the box prompts."""

import numpy as np


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
