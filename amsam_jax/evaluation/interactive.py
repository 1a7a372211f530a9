"""Interactive evaluation (docs/sum.md §8): 1…K simulated clicks per mask on a SAM model, mIoU
and mean boundary IoU per click count, for task id 0 and the benchmark's own task.

The click protocol (`next_click`, `simulate_clicks`) is host-side NumPy/SciPy at GT resolution and
reaches the model only through a caller-supplied `predict`; `evaluate_interactive` runs it on a
`SamPredictor` (one image embedding per image, reused for all masks and clicks).
"""

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from amsam_jax.data.folder import list_samples, load_sample, parse_labelled, read_instance_masks
from amsam_jax.evaluation import EvaluateError
from amsam_jax.evaluation.metrics import as_bool_mask, boundary_iou, mask_iou
from amsam_jax.evaluation.plots import figure_bytes, figure_format, metric_vs_clicks_figure
from amsam_jax.predictor import SamPredictor
from amsam_jax.pretrained import load as load_pretrained
from amsam_jax.utils.io import atomic_outputs, check_output_file

# predict(coords (k, 2), labels (k,), mask_input (1, L, L) or None, multimask)
#   -> (logits at GT resolution (K, H, W), iou_pred (K,), low-res logits (K, L, L))
PredictFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray | None, bool], tuple[np.ndarray, np.ndarray, np.ndarray]
]


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the nearest pixel outside `mask`, the image border included."""
    return ndimage.distance_transform_edt(np.pad(mask, 1, constant_values=False))[1:-1, 1:-1]


def _argmax_xy(dist: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first max, row-major
    return int(col), int(row)


def next_click(gt: np.ndarray, pred: np.ndarray | None) -> tuple[tuple[int, int], int]:
    """Centre-of-error click (docs/sum.md §8.3), deterministic.

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
    gt = as_bool_mask(gt, "gt")
    if not gt.any():
        raise ValueError("next_click needs a non-empty ground-truth mask")
    if pred is None:
        return _argmax_xy(_inner_distance(gt)), 1
    pred = as_bool_mask(pred, "pred")
    fn_dist = _inner_distance(gt & ~pred)
    fp_dist = _inner_distance(~gt & pred)
    fn_max, fp_max = fn_dist.max(), fp_dist.max()
    if fn_max == 0 and fp_max == 0:
        return _argmax_xy(_inner_distance(gt)), 1
    if fn_max > fp_max:
        return _argmax_xy(fn_dist), 1
    return _argmax_xy(fp_dist), 0


def simulate_clicks(predict: PredictFn, gt: np.ndarray, num_clicks: int = 9) -> dict[str, list]:
    """Run the k = 1..num_clicks point-prompt protocol on one mask (docs/sum.md §8.3).

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
    gt = as_bool_mask(gt, "gt")
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


@dataclasses.dataclass
class EvalImage:
    """One evaluation image with its ground-truth masks and the benchmark's task id."""

    stem: str
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (K, H, W) bool
    task: int


def labelled_eval_masks(specs: Sequence[str], split: str, max_images: int | None = None):
    """EvalImages of folder-format sets given as 'DIR:task' (missing split folders are skipped).

    Raises:
        DataError: unreadable files.
    """
    out: list[EvalImage] = []
    for spec in specs:
        folder, task = parse_labelled(spec)
        if not (folder / split).is_dir():
            continue
        for sample in list_samples(folder, split):
            if max_images is not None and len(out) >= max_images:
                return out
            image, _ = load_sample(sample)
            masks = read_instance_masks(sample.mask_path, image.shape[:2])
            if len(masks):
                out.append(EvalImage(sample.image_path.stem, image, masks, task))
    return out


def evaluate_interactive(
    sam,
    images: Sequence[EvalImage],
    clicks: int = 9,
    tasks: Sequence[str] = ("0", "matched"),
) -> dict:
    """Runs the click protocol on every mask of `images`.

    Args:
        sam: the model (e.g. `load_sam(dir)`, or a SUM run's `sam_finetuned`).
        images: evaluation images.
        clicks: clicks per mask (9).
        tasks: task settings to report: "none" (plain SAM, no task prompt), "0".."3" (a fixed
            id), "matched" (each benchmark's own id).

    Returns:
        {"task_<t>": {"miou": [k=1..K], "mbiou": [...], "num_masks"}, "clicks": K,
        "images": N, "per_mask": [{stem, mask, task, iou: [...], biou: [...]}]} (×100).
    """
    if not images:
        raise ValueError("interactive evaluation: no images with masks")
    predictor = SamPredictor(sam)
    results: dict[str, list] = {t: [] for t in tasks}
    per_mask = []
    for item in images:
        predictor.set_image(item.image)
        for t in tasks:
            tid = None if t == "none" else item.task if t == "matched" else int(t)

            def predict(coords, labels, mask_input, multimask, tid=tid):
                logits, iou, low = predictor.predict(
                    point_coords=coords,
                    point_labels=labels,
                    mask_input=mask_input,
                    multimask_output=multimask,
                    return_logits=True,
                    task=tid,
                )
                return logits, iou, low

            for k, gt in enumerate(item.masks):
                r = simulate_clicks(predict, gt, clicks)
                results[t].append(r)
                per_mask.append(
                    {"stem": item.stem, "mask": k, "task": t, "task_id": tid,
                     "iou": [100 * v for v in r["iou"]], "biou": [100 * v for v in r["biou"]]}
                )  # fmt: skip
    out = {f"task_{t}": summarize(results[t]) for t in tasks}
    out.update({"clicks": clicks, "images": len(images), "per_mask": per_mask})
    return out


INTERACTIVE_TASKS = ("none", "matched", "0", "1", "2", "3")


def evaluate_interactive_folders(
    sam_dir: str | Path,
    data: Sequence[str],
    split: str,
    clicks: int,
    tasks: Sequence[str],
    max_images: int | None,
    output: str | Path,
    plot: str | Path | None = None,
) -> dict:
    """The interactive protocol on folder-format sets; writes the result JSON and a plot.

    Args:
        sam_dir: a converted SAM directory (a SUM run's `sam_finetuned/`, or any SAM), or a
            pretrained name (`amsam_jax.pretrained`).
        data: "DIR[:task]" entries.
        split: the split folder of each entry.
        clicks: clicks per mask.
        tasks: task settings (`INTERACTIVE_TASKS`); the first is plotted.
        max_images: at most this many images in all (None: every image).
        output: the result JSON.
        plot: the metric-vs-clicks PNG (default: next to the JSON).

    Returns:
        the result without the per-mask rows, plus "output" and "plot".

    Raises:
        AmsamError: bad settings, folders or outputs (one line), all checked before the model
            is loaded. The JSON and the plot are written together: both or neither.
    """
    if clicks < 1:
        raise EvaluateError("--clicks", f"must be >= 1, got {clicks}")
    if max_images is not None and max_images < 1:
        raise EvaluateError("--max-images", f"must be >= 1, got {max_images}")
    out = check_output_file(output)
    plot = check_output_file(plot or out.with_suffix(".png"))
    figure_format(plot)
    if plot.absolute() == out.absolute():
        raise EvaluateError("--plot", f"{plot} is also the result file; give another --plot")
    for t in tasks:
        if t not in INTERACTIVE_TASKS:
            raise EvaluateError("--task", f"{t!r}: expected none, 0, 1, 2, 3 or matched")
    for spec in data:
        folder, _ = parse_labelled(spec)
        if not (folder / split).is_dir():
            raise EvaluateError(folder / split, "no such split folder")
    images = labelled_eval_masks(data, split, max_images)
    if not images:
        raise EvaluateError(None, f"no images with masks in {', '.join(data)} ({split})")
    result = evaluate_interactive(load_pretrained(sam_dir), images, clicks, tasks)
    result.update({"sam": str(sam_dir), "data": list(data), "split": split})
    plot_data = figure_bytes(metric_vs_clicks_figure(result[f"task_{tasks[0]}"]), plot)
    with atomic_outputs() as outputs:
        outputs.file(out, json.dumps(result, indent=2) + "\n")
        outputs.file(plot, plot_data)
    summary = {k: v for k, v in result.items() if k != "per_mask"}
    summary.update({"output": str(out), "plot": str(plot)})
    return summary
