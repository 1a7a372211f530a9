"""Export an Ultralytics YOLOv8 detector to ONNX for the box prompts (needs the `yolo` extra).

    python -m weights_conversion yolo yolov8n.pt detectors/yolov8n.onnx
    python -m weights_conversion yolo yolov8n.pt detectors/yolov8n_dyn.onnx --imgsz 640 --dynamic

The source is a local `.pt` (or a model `.yaml`, which gives untrained weights, as the tests use);
nothing is downloaded: YOLO_OFFLINE=1 and YOLO_AUTOINSTALL=False are set before Ultralytics is
imported (unless already set). The export (ONNX, NMS-free `[B, 4+nc, N]` head, Ultralytics
metadata: names, imgsz, stride) is written in a temporary folder beside OUT and renamed into place,
so a failed export leaves no partial file and never overwrites files next to the source.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from amsam_jax.boxes.detector import BoxError, YoloDetector
from amsam_jax.utils.errors import AmsamError

OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False"}


def export_yolo(
    model: str | os.PathLike, output: str | os.PathLike, imgsz: int = 640, dynamic: bool = False
) -> Path:
    """Exports a YOLOv8 detection model to ONNX and checks that the result loads as a detector.

    Args:
        model: local `.pt` checkpoint or Ultralytics model `.yaml` (e.g. "yolov8n.yaml").
        output: the `.onnx` file to write.
        imgsz: square input size, a multiple of the stride (32).
        dynamic: dynamic batch and spatial axes (batched box precomputation).

    Returns:
        The written path.

    Raises:
        BoxError: a missing or non-detection model, or an export that is not a YOLOv8 head.
    """
    model, output = Path(model), Path(output)
    if model.suffix not in (".pt", ".yaml", ".yml"):
        raise BoxError(model, "expected an Ultralytics .pt checkpoint or model .yaml")
    if model.suffix == ".pt" and not model.is_file():
        raise BoxError(model, "no such file (downloads are disabled)")
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from ultralytics import YOLO

    yolo = YOLO(str(model))
    if yolo.task != "detect":
        raise BoxError(model, f"a {yolo.task!r} model; box prompts need a detection model")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        # The exporter writes beside `pt_path`; point it into the temporary folder.
        yolo.model.pt_path = str(Path(tmp) / f"{model.stem}.pt")
        exported = yolo.export(
            format="onnx", imgsz=imgsz, dynamic=dynamic, simplify=True, device="cpu", verbose=False
        )
        YoloDetector(exported)
        shutil.move(exported, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion yolo",
        description="Export an Ultralytics YOLOv8 detector (.pt) to ONNX for amsam_jax.boxes.",
    )
    parser.add_argument("model", help="YOLOv8 detection checkpoint (.pt) or model .yaml")
    parser.add_argument("output", help="ONNX file to write")
    parser.add_argument("--imgsz", type=int, default=640, help="square input size")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch and image axes")
    args = parser.parse_args(argv)
    if args.imgsz <= 0 or args.imgsz % 32:
        print(f"error: --imgsz: {args.imgsz} is not a positive multiple of 32", file=sys.stderr)
        return 2
    try:
        path = export_yolo(args.model, args.output, args.imgsz, args.dynamic)
    except AmsamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    detector = YoloDetector(path)
    batch = "dynamic" if args.dynamic else 1
    print(
        f"exported {args.model} -> {path} ({len(detector.names)} classes, imgsz "
        f"{detector.imgsz[0]}, batch {batch}, sha256 {detector.sha256[:12]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
