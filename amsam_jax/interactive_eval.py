"""Interactive evaluation (spec `sum.md` §8): 1…K simulated clicks per mask on a SAM model,
mIoU and mean boundary IoU per click count, for task id 0 and the benchmark's own task.

The click protocol and the metrics are `amsam_jax.interactive`; this module runs them on a
`SamPredictor` (one image embedding per image, reused for all masks and clicks).
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from amsam_jax.interactive import simulate_clicks, summarize
from amsam_jax.predictor import SamPredictor


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
    from amsam_jax.data import list_samples, load_sample
    from amsam_jax.sum_data import parse_labelled, read_instance_masks

    out: list[EvalImage] = []
    for spec in specs:
        folder, task = parse_labelled(spec)
        if not (folder / split).is_dir():
            continue
        for sample in list_samples(folder, split):
            if max_images is not None and len(out) >= max_images:
                return out
            image, _ = load_sample(sample)
            masks = read_instance_masks(sample.mask_path)
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
