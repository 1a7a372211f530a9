"""Interactive point-prompt evaluation (spec sum.md §8.2, §8.3): metrics and click simulation.

Host-side numpy/scipy, outside jit, at GT resolution. The model is reached only through a
caller-supplied `predict` function, so this module knows nothing about SAM.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

# predict(coords (k, 2), labels (k,), mask_input (1, L, L) or None, multimask)
#   -> (logits at GT resolution (K, H, W), iou_pred (K,), low-res logits (K, L, L))
PredictFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray | None, bool], tuple[np.ndarray, np.ndarray, np.ndarray]
]


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
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
    gt, pred = _as_bool(gt, "gt"), _as_bool(pred, "pred")
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
    """Boundary IoU |∂G ∩ ∂D| / |∂G ∪ ∂D| (spec §8.2); an empty union gives 1.

    Args:
        gt: (H, W) bool ground truth.
        pred: (H, W) bool prediction.
        dilation_ratio: d as a fraction of the image diagonal (0.02).

    Returns:
        Boundary IoU in [0, 1].
    """
    gt, pred = _as_bool(gt, "gt"), _as_bool(pred, "pred")
    d = boundary_dilation(*gt.shape, dilation_ratio)
    gb, pb = mask_boundary(gt, d), mask_boundary(pred, d)
    union = np.count_nonzero(gb | pb)
    if union == 0:
        return 1.0
    return np.count_nonzero(gb & pb) / union


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the nearest pixel outside `mask`, the image border included."""
    return ndimage.distance_transform_edt(np.pad(mask, 1, constant_values=False))[1:-1, 1:-1]


def _argmax_xy(dist: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first max, row-major
    return int(col), int(row)


def next_click(gt: np.ndarray, pred: np.ndarray | None) -> tuple[tuple[int, int], int]:
    """Centre-of-error click (spec §8.3), deterministic.

    Click 1 (`pred is None`): positive, at the GT pixel farthest (Euclidean, the border counts as
    background) from any non-GT pixel. Later clicks: FN = G ∧ ¬D, FP = ¬G ∧ D; click at the
    larger of the two distance-transform maxima, label 1 in FN and 0 in FP. A tie goes to FP
    (as RITM's `fn_max > fp_max` test). Without any error pixel the click-1 point is repeated
    (positive). Ties inside a set: the first pixel in row-major order.

    Args:
        gt: (H, W) bool ground truth (must be non-empty).
        pred: (H, W) bool current prediction, or None for the first click.

    Returns:
        ((x, y) = (column, row) integer pixel, label 1 or 0).
    """
    gt = _as_bool(gt, "gt")
    if not gt.any():
        raise ValueError("next_click needs a non-empty ground-truth mask")
    if pred is None:
        return _argmax_xy(_inner_distance(gt)), 1
    pred = _as_bool(pred, "pred")
    fn_dist = _inner_distance(gt & ~pred)
    fp_dist = _inner_distance(~gt & pred)
    fn_max, fp_max = fn_dist.max(), fp_dist.max()
    if fn_max == 0 and fp_max == 0:
        return _argmax_xy(_inner_distance(gt)), 1
    if fn_max > fp_max:
        return _argmax_xy(fn_dist), 1
    return _argmax_xy(fp_dist), 0


def simulate_clicks(predict: PredictFn, gt: np.ndarray, num_clicks: int = 9) -> dict[str, list]:
    """Run the k = 1..num_clicks point-prompt protocol on one mask (spec §8.3).

    Click 1 uses multimask output and keeps the mask with the highest predicted IoU. Each later
    click is decoded single-mask with all clicks so far and the previous low-res logits of the
    kept mask as the mask prompt.

    Args:
        predict: `predict(coords (k, 2) float32 (x, y), labels (k,) int32, mask_input (1, L, L)
            or None, multimask) -> (logits (K, H, W) at GT resolution, iou_pred (K,),
            low_res (K, L, L))`.
        gt: (H, W) bool ground truth at original resolution.
        num_clicks: number of clicks (9).

    Returns:
        {"iou": [IoU after click k], "biou": [boundary IoU], "clicks": [(x, y, label)]}, each a
        list of length num_clicks.
    """
    gt = _as_bool(gt, "gt")
    coords: list[tuple[int, int]] = []
    labels: list[int] = []
    out: dict[str, list] = {"iou": [], "biou": [], "clicks": []}
    pred = None
    mask_input = None
    for k in range(num_clicks):
        xy, label = next_click(gt, pred)
        coords.append(xy)
        labels.append(label)
        logits, iou_pred, low_res = predict(
            np.asarray(coords, np.float32), np.asarray(labels, np.int32), mask_input, k == 0
        )
        logits, low_res = np.asarray(logits), np.asarray(low_res)
        best = int(np.argmax(np.asarray(iou_pred))) if k == 0 else 0
        pred = logits[best] > 0
        mask_input = low_res[best : best + 1]
        out["iou"].append(mask_iou(gt, pred))
        out["biou"].append(boundary_iou(gt, pred))
        out["clicks"].append((xy[0], xy[1], label))
    return out


def summarize(results: Sequence[dict[str, list]]) -> dict[str, list[float] | int]:
    """Mean IoU and mean boundary IoU per click count over masks, in percent (×100).

    Args:
        results: `simulate_clicks` outputs, one per mask, all with the same num_clicks.

    Returns:
        {"miou": [k = 1..K], "mbiou": [k = 1..K], "num_masks": M}.
    """
    iou = np.asarray([r["iou"] for r in results], np.float64)  # (M, K)
    biou = np.asarray([r["biou"] for r in results], np.float64)
    return {
        "miou": (100.0 * iou.mean(axis=0)).tolist(),
        "mbiou": (100.0 * biou.mean(axis=0)).tolist(),
        "num_masks": len(results),
    }


def plot_metric_vs_clicks(summary: dict, path: Path) -> None:
    """Write a PNG of mIoU and mBIoU (%) against the number of clicks.

    Args:
        summary: `summarize` output.
        path: the PNG file; parent folders are created.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clicks = np.arange(1, len(summary["miou"]) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(clicks, summary["miou"], marker="o", label="mIoU")
    ax.plot(clicks, summary["mbiou"], marker="s", label="mBIoU")
    ax.set_xlabel("clicks")
    ax.set_ylabel("%")
    ax.set_xticks(clicks)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
