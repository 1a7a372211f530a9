"""Box-prompt precompute benchmark: amsam_jax.boxes vs Ultralytics' own ONNX Runtime predict.

    python -m bench boxes --detector yolov8n.onnx [--images 20] [--data DIR] [--conf 0.25]

Prints one JSON object: images/s and ms/image of `compute_box_file` (read, hash, decode, letterbox,
ONNX Runtime, NMS, selection, atomic JSON write) and of `YOLO(detector).predict(...)` (Ultralytics'
AutoBackend, LetterBox and NMS) on the same images and detector in the same process, plus how
many top boxes agree. Without `--data`, writes `--images` synthetic PNG and JPEG images of mixed
sizes and aspect ratios. Both sides are warmed up on one image first; model loading is not timed;
the sides alternate for `--rounds` rounds and each reports its fastest.
Needs the `yolo` extra for the reference (`--no-reference` skips it).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from amsam_jax.boxes import YoloDetector, compute_box_file, list_split_images
from amsam_jax.utils.errors import AmsamError

# (H, W): landscape, portrait, square, panorama, small, large; cycled over the images.
SIZES = [(480, 640), (1080, 720), (640, 640), (300, 1200), (120, 160), (1536, 2048), (720, 1280)]


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Writes `count` synthetic images (smooth noise plus rectangles), alternating PNG and JPEG."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR)).copy()
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        image[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        path = folder / f"bench_{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def time_amsam(detector: YoloDetector, paths: list[Path], conf: float, output: Path) -> dict:
    """Times a fresh `compute_box_file` run (nothing to resume) writing `output`."""
    start = time.perf_counter()
    data = compute_box_file(detector, paths, output, conf=conf)
    return {"seconds": time.perf_counter() - start, "boxes": data["boxes"]}


def time_ultralytics(model, paths: list[Path], conf: float, imgsz: int) -> dict:
    """Times `model.predict` over the image files (its loader reads them with OpenCV)."""
    options = {"imgsz": imgsz, "conf": conf, "iou": 0.7, "verbose": False, "device": "cpu"}
    start = time.perf_counter()
    results = list(model.predict([str(p) for p in paths], stream=True, **options))
    seconds = time.perf_counter() - start
    boxes = {Path(r.path).stem: r.boxes.xyxy[0].tolist() if len(r.boxes) else None for r in results}
    return {"seconds": seconds, "boxes": boxes}


def rates(seconds: float, count: int) -> dict:
    return {
        "images_per_s": round(count / seconds, 2),
        "ms_per_image": round(1000 * seconds / count, 2),
        "seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench boxes",
        description="Box precompute throughput: amsam_jax.boxes vs Ultralytics ONNX predict.",
    )
    parser.add_argument("--detector", required=True, help="YOLOv8 ONNX export")
    parser.add_argument("--images", type=int, default=20, help="synthetic images (no --data)")
    parser.add_argument("--data", default=None, help="data folder (DIR/{train,test}/images)")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (best kept)")
    parser.add_argument("--no-reference", action="store_true", help="skip Ultralytics")
    args = parser.parse_args(argv)
    offline = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False", "YOLO_VERBOSE": "False"}
    for key, value in offline.items():
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="bench-boxes-") as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "ultralytics"))
        try:
            detector = YoloDetector(args.detector)
            if args.data is None:
                paths = write_images(workdir, args.images)
            else:
                paths = list_split_images(args.data)
        except AmsamError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        model = None
        if not args.no_reference:
            from ultralytics import YOLO

            model = YOLO(args.detector, task="detect")
            time_ultralytics(model, paths[:1], args.conf, detector.imgsz[0])  # warm-up, setup
        compute_box_file(detector, paths[:1], conf=args.conf)  # warm-up
        # Alternate the two sides and keep each one's fastest round: other load on the machine
        # then hits both alike.
        ours, ref = None, None
        for i in range(args.rounds):
            run = time_amsam(detector, paths, args.conf, workdir / f"boxes_{i}.json")
            ours = run if ours is None or run["seconds"] < ours["seconds"] else ours
            if model is not None:
                run = time_ultralytics(model, paths, args.conf, detector.imgsz[0])
                ref = run if ref is None or run["seconds"] < ref["seconds"] else ref
        report = {
            "benchmark": "boxes",
            "detector": detector.name,
            "sha256": detector.sha256,
            "imgsz": detector.imgsz[0],
            "batch_size": detector.batch_size,
            "conf": args.conf,
            "iou": 0.7,
            "images": len(paths),
            "image_sizes_wh": sorted({Image.open(p).size for p in paths}),
            "providers": detector.providers,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "amsam_jax": rates(ours["seconds"], len(paths)),
            "fallbacks": sum(e["fallback"] for e in ours["boxes"].values()),
        }
        if ref is not None:
            report["ultralytics"] = rates(ref["seconds"], len(paths))
            report["speedup"] = round(ref["seconds"] / ours["seconds"], 3)
            diffs = [
                np.abs(np.subtract(ours["boxes"][stem]["box"], box)).max()
                for stem, box in ref["boxes"].items()
                if box is not None and not ours["boxes"][stem]["fallback"]
            ]
            no_detection = [stem for stem, box in ref["boxes"].items() if box is None]
            report["agreement"] = {
                "both_detected": len(diffs),
                "top1_within_0.5px": int(sum(d <= 0.5 for d in diffs)),
                "top1_max_abs_px": round(float(max(diffs, default=0.0)), 4),
                "both_no_detection": sum(ours["boxes"][s]["fallback"] for s in no_detection),
            }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
