"""Segmentation metrics on host arrays: Dice and IoU per class, mask IoU and boundary IoU.

Pure NumPy/SciPy functions of predictions and targets; the few-shot evaluation (docs/fewshot.md
§4.4) and the interactive protocol (docs/sum.md §8.2) both use them.
"""

import numpy as np
from scipy import ndimage


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of foreground classes 1..n-1 over a batch: 2TP/(2TP+FP+FN), 0 if absent.

    docs/fewshot.md §4.4.

    Args:
        pred: integer predictions (...), argmax with ties to the lowest index.
        target: integer labels of the same shape.
        num_classes: n (background included).

    Returns:
        (n - 1,) scores in [0, 1].
    """
    scores = []
    for j in range(1, num_classes):
        p, t = pred == j, target == j
        if not t.any():
            scores.append(0.0)
            continue
        tp = np.sum(p & t)
        scores.append(2.0 * tp / (2.0 * tp + np.sum(p & ~t) + np.sum(~p & t)))
    return np.asarray(scores, np.float64)


def iou_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """TP/(TP+FP+FN) of foreground classes, 0 when the class is absent from the target."""
    scores = []
    for j in range(1, num_classes):
        p, t = pred == j, target == j
        scores.append(float(np.sum(p & t) / np.sum(p | t)) if t.any() else 0.0)
    return np.asarray(scores, np.float64)


def upsample_nearest(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of an integer map (h, w) to `size` (torch 'nearest' indexing)."""
    h, w = pred.shape
    rows = np.minimum((np.arange(size[0]) * (h / size[0])).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(size[1]) * (w / size[1])).astype(np.int64), w - 1)
    return pred[rows][:, cols]


def as_bool_mask(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(
            f"{name} must be a bool mask (threshold logits > 0, GT > 0.5), got {mask.dtype}"
        )
    return mask


def mask_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|G ∩ D| / |G ∪ D| of two (H, W) bool masks; an empty union gives 1.

    Args:
        gt: (H, W) bool ground truth (binarised at > 0.5 by the caller).
        pred: (H, W) bool prediction (logits > 0 at GT resolution).

    Returns:
        IoU in [0, 1].
    """
    gt, pred = as_bool_mask(gt, "gt"), as_bool_mask(pred, "pred")
    union = np.count_nonzero(gt | pred)
    if union == 0:
        return 1.0
    return np.count_nonzero(gt & pred) / union


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """d = max(1, round(dilation_ratio * sqrt(H^2 + W^2))) (Python round, as the reference)."""
    return max(1, int(round(dilation_ratio * np.sqrt(height**2 + width**2))))


def mask_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """∂M = M ∧ ¬E_d(M), with pixels outside the image counted as background.

    E_d(M)(p) = 1 iff every q with ||p - q||_inf <= d is inside the image with M(q) = 1; this is
    a 1-px zero pad followed by d 3x3 erosions. Computed in one pass: the chessboard distance
    from p to the nearest background pixel of the zero-padded mask must exceed d.

    Args:
        mask: (H, W) bool.
        d: erosion radius in pixels.

    Returns:
        (H, W) bool boundary band.
    """
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
    return mask & (dist <= d)


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU |∂G ∩ ∂D| / |∂G ∪ ∂D| (docs/sum.md §8.2); an empty union gives 1.

    Args:
        gt: (H, W) bool ground truth.
        pred: (H, W) bool prediction.
        dilation_ratio: d as a fraction of the image diagonal (0.02).

    Returns:
        Boundary IoU in [0, 1].
    """
    gt, pred = as_bool_mask(gt, "gt"), as_bool_mask(pred, "pred")
    d = boundary_dilation(*gt.shape, dilation_ratio)
    gb, pb = mask_boundary(gt, d), mask_boundary(pred, d)
    union = np.count_nonzero(gb | pb)
    if union == 0:
        return 1.0
    return np.count_nonzero(gb & pb) / union
