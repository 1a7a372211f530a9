"""Test helpers for box prompts: an offline untrained YOLOv8n ONNX export and synthetic images.

Test-only: exporting imports torch and ultralytics (the `test` extra).
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image


def ultralytics_offline(config_dir: str | os.PathLike) -> None:
    """Sets Ultralytics' offline environment; call before the first `import ultralytics`."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)


def coco_names() -> dict[int, str]:
    """The 80 COCO class names shipped with Ultralytics (no download)."""
    import ultralytics
    from ultralytics.utils import YAML

    return YAML.load(Path(ultralytics.__file__).parent / "cfg/datasets/coco.yaml")["names"]


def export_untrained_yolov8n(out_dir: Path, dynamic: bool = False) -> Path:
    """Builds YOLOv8n from its yaml (random weights, COCO names), saves a `.pt`, exports ONNX.

    The export goes through the `python -m weights_conversion yolo` CLI, as a user's `.pt` would.

    Returns:
        The `.onnx` path (static batch 1, or dynamic axes).
    """
    from ultralytics import YOLO

    from weights_conversion.convert_yolo import main

    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / "yolov8n_untrained.pt"
    if not pt.exists():
        model = YOLO("yolov8n.yaml")
        model.model.names = coco_names()
        model.save(pt)
    out = out_dir / f"yolov8n_untrained{'_dynamic' if dynamic else ''}.onnx"
    code = main([str(pt), str(out), "--imgsz", "640", *(["--dynamic"] if dynamic else [])])
    assert code == 0 and out.is_file()
    return out


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random background with a few bright rectangles, (H, W, 3) uint8 RGB."""
    small = rng.integers(0, 256, (max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)).copy()
    for _ in range(3):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        y1 = min(height, y0 + rng.integers(height // 8 + 1, height // 2 + 2))
        x1 = min(width, x0 + rng.integers(width // 8 + 1, width // 2 + 2))
        image[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image


def write_dataset(root: Path, sizes: dict[str, list[tuple[int, int]]], seed: int = 0) -> Path:
    """Writes `root/{split}/images/img_XX.png` synthetic images of the given (H, W) sizes."""
    rng = np.random.default_rng(seed)
    for split, shapes in sizes.items():
        folder = root / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(synthetic_image(rng, h, w)).save(folder / f"{split}_{i:02d}.png")
    return root
