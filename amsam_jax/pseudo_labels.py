"""Writes SAM pseudo-labels (SA-1B JSON + uint8 probability sidecar) for a folder of images.

    python -m amsam_jax.pseudo_labels --images DIR --out DIR (--sam CONVERTED_DIR | --random-tiny)
        [--points-per-side 32] [--points-per-batch 64] [--pred-iou-thresh 0.88] [...]

One `<stem>.json` and `<stem>.prob.npz` per image (SUM spec §2.2), each written atomically, the
JSON last: an image whose JSON exists is skipped, so an interrupted run resumes. An unreadable
image prints one line naming it, writes nothing for it, and makes the exit status 1 (the other
images are still labelled).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from amsam_jax.amg import SamAutomaticMaskGenerator
from amsam_jax.sa1b import (
    PseudoLabelError,
    image_id_of,
    list_images,
    records_to_annotations,
    write_annotations,
)
from amsam_jax.transforms import ImageReadError, read_image_rgb


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.pseudo_labels",
        description="SAM automatic-mask-generator pseudo-labels in SA-1B format (+ probabilities).",
    )
    parser.add_argument("--images", required=True, help="folder of unlabelled images")
    parser.add_argument("--out", required=True, help="output folder for <stem>.json/.prob.npz")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--sam", help="converted SAM directory (python -m weights_conversion sam)")
    model.add_argument(
        "--random-tiny", action="store_true", help="random tiny SAM, for smoke tests only"
    )
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--stability-score-offset", type=float, default=1.0)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--crop-nms-thresh", type=float, default=0.7)
    parser.add_argument("--crop-n-points-downscale-factor", type=int, default=1)
    parser.add_argument("--min-mask-region-area", type=int, default=0)
    parser.add_argument("--no-probabilities", action="store_true", help="skip the .prob.npz")
    return parser.parse_args(argv)


def label_image(
    generator: SamAutomaticMaskGenerator, image_path: Path, out_dir: Path, keep_prob: bool
) -> int:
    """Labels one image; returns the number of masks written."""
    image = read_image_rgb(image_path)
    records = generator.generate(image)
    h, w = image.shape[:2]
    info = {
        "image_id": image_id_of(image_path.name),
        "file_name": image_path.name,
        "height": h,
        "width": w,
    }
    prob = None
    if keep_prob:
        prob = np.zeros((len(records), h, w), np.uint8)
        for k, r in enumerate(records):
            prob[k] = r["probability"]
    write_annotations(
        out_dir / f"{image_path.stem}.json", info, records_to_annotations(records), prob
    )
    return len(records)


def label_folder(
    model, images_dir, out_dir, points_per_side: int = 32, keep_prob: bool = True, say=print, **amg
) -> list[str]:
    """Pseudo-labels every image of `images_dir` without a `<stem>.json` in `out_dir`.

    Args:
        model: the SAM.
        images_dir: folder of images.
        out_dir: output folder (created).
        points_per_side: the generator's grid.
        keep_prob: write the `.prob.npz` sidecars.
        say: progress printer.
        **amg: other `SamAutomaticMaskGenerator` arguments.

    Returns:
        one-line errors of the images that could not be read (nothing is written for them).
    """
    out_dir = Path(out_dir)
    generator = SamAutomaticMaskGenerator(
        model, points_per_side=points_per_side, keep_probabilities=keep_prob, **amg
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for image_path in list_images(images_dir):
        if (out_dir / f"{image_path.stem}.json").exists():
            say(f"skip {image_path.name} (done)")
            continue
        try:
            n = label_image(generator, image_path, out_dir, keep_prob)
        except ImageReadError as e:
            errors.append(str(e))
            continue
        say(f"{image_path.name}: {n} masks")
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    try:
        list_images(args.images)  # a missing folder: one line, exit 2
    except PseudoLabelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.random_tiny:
        from amsam_jax.build_sam import SamConfig, build_sam

        print(
            "WARNING: --random-tiny uses a RANDOMLY INITIALISED tiny SAM; the pseudo-labels are "
            "meaningless (smoke test only).",
            file=sys.stderr,
        )
        model = build_sam(SamConfig.tiny())
    else:
        from amsam_jax.checkpoint import load_sam

        model = load_sam(args.sam)
    keep_prob = not args.no_probabilities
    errors = label_folder(
        model,
        args.images,
        out_dir,
        args.points_per_side,
        keep_prob,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=args.stability_score_offset,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        crop_nms_thresh=args.crop_nms_thresh,
        crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
        min_mask_region_area=args.min_mask_region_area,
    )
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
