"""CLI: precompute YOLOv8 box prompts for a data folder (DIR/{train,test}/images).

python -m amsam_jax.boxes --detector yolov8n.onnx --data data/tiktok --output boxes.json

An existing `--output` is resumed (entries of unchanged images are kept). Flags, data folder,
output and detector are checked before the first image; a run stopped by an error or Ctrl-C
keeps the images it finished in `--output`, and one that finished none writes nothing.
With `--policy all` every entry also lists all its boxes, which training reads with
`--set boxes.max_per_image=M` (docs/fewshot.md §6.4).
Several processes (docs/scale.md) share the images through part files that process 0 merges;
the detector runs on ONNX Runtime, so there is no device mesh here, only the process split.
"""

import argparse
import sys

from amsam_jax.boxes.box_file import FALLBACKS, SPLITS, compute_box_file, list_split_images
from amsam_jax.boxes.detector import POLICIES, BoxError, YoloDetector
from amsam_jax.training import mesh
from amsam_jax.training.supervisor import supervised
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.image import max_image_pixels
from amsam_jax.utils.io import check_output_file

# The end of the one line a survivor prints when another process of the run dies.
PEER_HINT = "images already done are kept in the box file; run it again to resume"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.boxes",
        description="Precompute YOLOv8 box prompts for a data folder (DIR/{train,test}/images).",
    )
    parser.add_argument("--detector", required=True, help="YOLOv8 ONNX export")
    parser.add_argument("--data", required=True, help="data folder")
    parser.add_argument("--split", default="all", choices=[*SPLITS, "all"])
    parser.add_argument("--output", required=True, help="box file (JSON); resumed if it exists")
    parser.add_argument("--classes", nargs="+", default=None, help="class names or ids to keep")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--policy", default="top1", choices=POLICIES)
    parser.add_argument("--fallback", default="full_image", choices=FALLBACKS)
    parser.add_argument("--imgsz", type=int, default=None, help="default: the export's")
    parser.add_argument("--batch-size", type=int, default=None, help="dynamic-batch exports")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def check_settings(args: argparse.Namespace) -> None:
    """The numeric flags, the output and the pixel-limit setting, before the detector loads.

    Raises:
        AmsamError: one line naming the flag or file.
    """
    for flag, value in (("--conf", args.conf), ("--iou", args.iou)):
        if not 0 <= value <= 1:
            raise BoxError(flag, f"{value} is not in [0, 1]")
    for flag, value in (("--imgsz", args.imgsz), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise BoxError(flag, f"must be >= 1, got {value}")
    check_output_file(args.output)
    max_image_pixels()  # an invalid AMSAM_MAX_IMAGE_PIXELS is named before any image is read


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        mesh.initialize()
        check_settings(args)
        paths = list_split_images(args.data, args.split)
        detector = YoloDetector(args.detector, imgsz=args.imgsz, batch_size=args.batch_size)
        data = compute_box_file(
            detector,
            paths,
            args.output,
            conf=args.conf,
            iou=args.iou,
            classes=args.classes,
            policy=args.policy,
            fallback=args.fallback,
            progress=not args.no_progress,
            shard=(mesh.process_index(), mesh.process_count()),
            sync=mesh.sync,
        )
        if not mesh.is_main_process():
            return 0
        entries = [data["boxes"][p.stem] for p in paths]
        fallbacks = sum(e["fallback"] for e in entries)
        print(
            f"{args.output}: {len(entries)} images, {fallbacks} without detection -> "
            f"fallback {args.fallback} ({100 * fallbacks / len(entries):.1f}%); "
            f"detector {detector.name} on {detector.providers[0]}"
        )
        if args.policy == "all":  # the lists a run reads with boxes.max_per_image > 1
            most = max(len(e.get("boxes_all", [])) for e in entries)
            print(f"{args.output}: up to {most} boxes per image; train on them with "
                  "--set boxes.max_per_image=M (docs/fewshot.md §6.4)")  # fmt: skip
        return 0

    return guarded(mesh.stop_on_peer_failure(body, PEER_HINT), PEER_HINT)


if __name__ == "__main__":
    sys.exit(supervised(main, PEER_HINT))
