"""CLI: SAM pseudo-labels (SA-1B JSON + uint8 probabilities) for a folder of images.

    python -m amsam_jax.pseudo_labels --images DIR --out DIR (--sam CONVERTED_DIR | --random-tiny)
        [--points-per-side 32] [--points-per-batch 64] [--pred-iou-thresh 0.88] [...]

Resumable: an image whose `<stem>.json` exists is skipped. An unreadable image prints one line
naming it, writes nothing for it, and makes the exit status 1 (the other images are labelled).
"""

import argparse
import sys

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.pretrained import PRETRAINED
from amsam_jax.pretrained import load as load_pretrained
from amsam_jax.sum.pseudo_labels import label_folder
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.image import list_images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.pseudo_labels",
        description="SAM automatic-mask-generator pseudo-labels in SA-1B format (+ probabilities).",
    )
    parser.add_argument("--images", required=True, help="folder of unlabelled images")
    parser.add_argument("--out", required=True, help="output folder for <stem>.json/.prob.npz")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--sam", help="converted SAM directory or a pretrained name: " + ", ".join(PRETRAINED)
    )
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        list_images(args.images)  # a missing or empty folder: one line, exit 2
        if args.random_tiny:
            print(
                "WARNING: --random-tiny uses a RANDOMLY INITIALISED tiny SAM; the pseudo-labels "
                "are meaningless (smoke test only).",
                file=sys.stderr,
            )
            model = build_sam(SamConfig.tiny())
        else:
            model = load_pretrained(args.sam)
        errors = label_folder(
            model,
            args.images,
            args.out,
            args.points_per_side,
            not args.no_probabilities,
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
    except AmsamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
