"""Command-line prediction with SamPredictor.

    python -m amsam_jax.predict --sam converted/vit_b --image photo.jpg --box 40 30 400 380 \
        --point 200 200 1 --output out.npz --overlay out.png
    python -m amsam_jax.predict --demo --output runs/demo/pred.npz --overlay runs/demo/overlay.png

`--demo` uses the bundled sample image and its default prompts, with the SAM in `--sam`
(default `$AMSAM_SAM` or `checkpoints/sam_vit_b` when present, else the pretrained LiteMedSAM,
fetched on first use); only when none can be had a randomly initialised ViT-B, said loudly:
random weights give meaningless masks.

The outputs are checked before the model is loaded (a folder given as `--output`, an overlay
extension Pillow cannot write, a file where a folder should be) and written together: both
appear, or neither (a failed overlay also leaves no `--output`), and no temporary file stays.
"""

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.evaluation.plots import draw_overlay, encode_image, image_format
from amsam_jax.modeling.prompt_encoder import TASKS
from amsam_jax.predictor import SamPredictor
from amsam_jax.pretrained import PRETRAINED, PretrainedError
from amsam_jax.pretrained import load as load_pretrained
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.image import max_image_pixels, read_image
from amsam_jax.utils.io import atomic_outputs, check_output_file

DEFAULT_SAM_DIR = "checkpoints/sam_vit_b"
SAMPLE_IMAGE = "sample.jpg"
# Prompts for the sample image: a box around the disc and a point on it.
SAMPLE_BOX = (90.0, 115.0, 345.0, 370.0)
SAMPLE_POINTS = ((217.0, 242.0, 1),)


class UsageError(AmsamError):
    """Bad command-line input; one line."""


def sample_image_path() -> Path:
    return Path(str(resources.files("amsam_jax") / "assets" / SAMPLE_IMAGE))


def resolve_model(sam_dir: str | None, demo: bool, encoder_dtype: str | None):
    """Loads the converted SAM (a directory or a pretrained name).

    `--demo` without `--sam` takes `$AMSAM_SAM` or `checkpoints/sam_vit_b` when present, else
    LiteMedSAM (fetched on first use), and only when that cannot be fetched a random ViT-B,
    said loudly.

    Returns:
        (model, description of the weights).
    """
    if sam_dir is None and demo:
        candidate = os.environ.get("AMSAM_SAM", DEFAULT_SAM_DIR)
        if Path(candidate).is_dir():
            sam_dir = candidate
        else:
            try:
                return load_pretrained("litemedsam", encoder_dtype), "pretrained litemedsam"
            except PretrainedError as e:
                print(f"weights: {e}", file=sys.stderr)
    if sam_dir is not None:
        return load_pretrained(sam_dir, encoder_dtype), f"converted weights from {sam_dir}"
    if not demo:
        raise UsageError(
            "--sam is required (a directory made by `python -m weights_conversion sam`, or a "
            f"pretrained name: {', '.join(PRETRAINED)})"
        )
    cfg = SamConfig.vit_b(encoder_dtype=encoder_dtype or "float32")
    return build_sam(cfg), "RANDOM WEIGHTS (no SAM could be had): masks are meaningless"


def check_prompts(box, points, size: tuple[int, int]) -> None:
    h, w = size
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise UsageError(
                f"--box {x0:g} {y0:g} {x1:g} {y1:g}: must satisfy 0 <= x0 < x1 <= {w}"
                f" and 0 <= y0 < y1 <= {h} (image is {w}x{h})"
            )
    for x, y, label in points:
        if not (0 <= x <= w and 0 <= y <= h):
            raise UsageError(f"--point {x:g} {y:g}: outside the {w}x{h} image")
        if label not in (0, 1):
            raise UsageError(f"--point label {label:g}: must be 1 (foreground) or 0 (background)")


def check_outputs(output: str, overlay: str | None) -> tuple[Path, Path | None]:
    """Checks `--output` and `--overlay` before any work (nothing is written).

    Raises:
        AmsamError: a folder or a path under a file, an overlay extension Pillow cannot write,
            or the same file twice.
    """
    out = check_output_file(output)
    if overlay is None:
        return out, None
    overlay_path = check_output_file(overlay)
    image_format(overlay_path)
    if os.path.realpath(overlay_path) == os.path.realpath(out):
        raise UsageError("--overlay", f"{overlay} is also the --output file")
    return out, overlay_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.predict",
        description="Predict masks with SAM for box/point prompts.",
    )
    parser.add_argument(
        "--sam",
        help="converted SAM directory (python -m weights_conversion sam) or a pretrained name: "
        + ", ".join(PRETRAINED),
    )
    parser.add_argument("--image", help="input image (any format PIL reads)")
    parser.add_argument("--demo", action="store_true", help="bundled sample image and prompts")
    parser.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"))
    parser.add_argument(
        "--point", nargs=3, type=float, action="append", default=[], metavar=("X", "Y", "LABEL")
    )
    parser.add_argument("--multimask", action="store_true", help="return SAM's three masks")
    parser.add_argument("--output", required=True, help="output .npz")
    parser.add_argument("--overlay", help="output .png with masks, box and points drawn")
    parser.add_argument("--encoder-dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="SUM task prompt (default: none, plain SAM; a SUM model's default is unspecified)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.image is None and not args.demo:
        raise UsageError("--image is required (or --demo for the bundled sample)")
    image_path = args.image or sample_image_path()
    box, points = args.box, [tuple(p) for p in args.point]
    if args.demo and box is None and not points:
        box, points = list(SAMPLE_BOX), list(SAMPLE_POINTS)
    if box is None and not points:
        raise UsageError("give a prompt: --box X0 Y0 X1 Y1 and/or --point X Y LABEL")
    out, overlay = check_outputs(args.output, args.overlay)
    max_image_pixels()  # an invalid AMSAM_MAX_IMAGE_PIXELS is named before any file is read
    image = read_image(image_path)
    check_prompts(box, points, image.shape[:2])
    model, weights = resolve_model(args.sam, args.demo, args.encoder_dtype)
    print(f"weights: {weights}", file=sys.stderr)

    predictor = SamPredictor(model)
    t0 = time.perf_counter()
    predictor.set_image(image)
    masks, iou, low_res = predictor.predict(
        point_coords=np.asarray([p[:2] for p in points]) if points else None,
        point_labels=np.asarray([int(p[2]) for p in points]) if points else None,
        box=np.asarray(box) if box is not None else None,
        multimask_output=args.multimask,
        task=args.task,
    )
    seconds = time.perf_counter() - t0

    overlay_bytes = None
    if overlay is not None:  # encoded before anything is written: a failure leaves nothing
        title = (
            f"{'RANDOM WEIGHTS - ' if 'RANDOM' in weights else ''}SAM masks (iou "
            + ", ".join(f"{v:.2f}" for v in iou)
            + ")"
        )
        overlay_bytes = encode_image(draw_overlay(image, masks, box, points, title), overlay)
    with atomic_outputs() as outputs:
        outputs.file(
            out,
            lambda f: np.savez_compressed(
                f, masks=masks, iou_predictions=iou, low_res_logits=low_res
            ),
        )
        if overlay is not None:
            outputs.file(overlay, overlay_bytes)
    return {
        "image": str(image_path),
        "weights": weights,
        "masks": list(masks.shape),
        "iou_predictions": [round(float(v), 4) for v in iou],
        "mask_pixels": [int(m.sum()) for m in masks],
        "task": args.task or "none",
        "seconds": round(seconds, 2),
        "output": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        summary = run(args)
        for key, value in summary.items():
            print(f"{key}: {value}")
        return 0

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
