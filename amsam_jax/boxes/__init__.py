"""Automated box prompts (docs/fewshot.md §6.1): a YOLOv8 ONNX detector, letterbox, box file.

`boxes.detector` is the only module that imports ONNX Runtime (when a `YoloDetector` is made);
reading a box file needs none of it.
"""

from amsam_jax.boxes.box_file import compute_box_file, list_split_images, load_box_file
from amsam_jax.boxes.detector import BoxError, Detections, YoloDetector, detect_boxes
from amsam_jax.boxes.geometry import Letterbox, letterbox, to_model_frame

__all__ = [
    "BoxError",
    "Detections",
    "Letterbox",
    "YoloDetector",
    "compute_box_file",
    "detect_boxes",
    "letterbox",
    "list_split_images",
    "load_box_file",
    "to_model_frame",
]
