"""Zero-shot box-prompt evaluation: SAM's single mask for each image's box, against its mask.

The protocol of the SAM papers' box-prompt results: one box per image (the tight box of the
ground-truth foreground, or a detector's box from a box file), `multimask_output=False`, the
mask thresholded at logit 0 at the original resolution, Dice and IoU per image (×100). It is the
baseline a fine-tuned model is compared with.
"""

import json
import os
from collections.abc import Sequence

import numpy as np

from amsam_jax.boxes.box_file import load_box_file
from amsam_jax.data.folder import Sample, list_samples, load_sample
from amsam_jax.evaluation import EvaluateError
from amsam_jax.evaluation.metrics import dice_per_class, iou_per_class
from amsam_jax.modeling.sam import Sam
from amsam_jax.predictor import SamPredictor
from amsam_jax.utils.io import atomic_outputs, check_output_file


def tight_box(mask: np.ndarray) -> np.ndarray | None:
    """(4,) x0, y0, x1, y1 (x1, y1 exclusive) around the foreground, None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def evaluate_box_prompts(sam: Sam, samples: Sequence[Sample], box_file: dict | None = None) -> dict:
    """Dice and IoU (×100) of SAM's box-prompted single mask per image, and their means.

    Args:
        sam: the model.
        samples: images with binary masks (> 0 is foreground).
        box_file: boxes by image stem (`boxes.box_file`); None: each mask's tight box.

    Returns:
        {"dice", "iou", "images", "per_image": [{stem, dice, iou, box}]}. An image without a
        box (empty mask, or a null box) scores 0.

    Raises:
        EvaluateError: no samples, or an image missing from the box file.
    """
    if not samples:
        raise EvaluateError(None, "box-prompt evaluation: no images")
    predictor = SamPredictor(sam)
    rows = []
    for sample in samples:
        image, mask = load_sample(sample)
        if box_file is None:
            box = tight_box(mask)
        else:
            entry = box_file["boxes"].get(sample.stem)
            if entry is None:
                raise EvaluateError(sample.image_path, "no box for this image in the box file")
            box = None if entry["box"] is None else np.asarray(entry["box"], np.float64)
        pred = np.zeros_like(mask)
        if box is not None:
            predictor.set_image(image)
            pred = predictor.predict(box=box, multimask_output=False)[0][0]
        target = mask.astype(np.int64)
        rows.append(
            {
                "stem": sample.stem,
                "dice": 100.0 * float(dice_per_class(pred.astype(np.int64), target, 2)[0]),
                "iou": 100.0 * float(iou_per_class(pred.astype(np.int64), target, 2)[0]),
                "box": None if box is None else [float(v) for v in box],
            }
        )
    return {
        "dice": float(np.mean([r["dice"] for r in rows])),
        "iou": float(np.mean([r["iou"] for r in rows])),
        "images": len(rows),
        "per_image": rows,
    }


def evaluate_box_folder(
    sam: Sam,
    data_dir: str | os.PathLike,
    split: str,
    output: str | os.PathLike,
    boxes: str | os.PathLike | None = None,
) -> dict:
    """`evaluate_box_prompts` on a folder-format split; writes the result JSON to `output`.

    Returns:
        the result without the per-image rows, plus "output", "data_dir", "split", "boxes".

    Raises:
        AmsamError: a bad folder, box file or output (checked before any image is predicted).
    """
    out = check_output_file(output)
    samples = list_samples(data_dir, split)
    box_file = None if boxes is None else load_box_file(boxes)
    result = evaluate_box_prompts(sam, samples, box_file)
    result.update(
        data_dir=str(data_dir),
        split=split,
        boxes=str(boxes) if boxes else "tight boxes of the ground-truth masks",
    )
    with atomic_outputs() as outputs:
        outputs.file(out, json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "per_image"}
    summary["output"] = str(out)
    return summary
