"""python -m amsam_jax.train --config train/configs/boxes_only.py --workdir runs/boxes_only --set data.dir=DATA --set boxes.detector=detectors/yolov8n.onnx

Ablation (paper Table 4, row 'YOLO prompts only'): no calibration.
Expected result: with converted SAM ViT-B weights (sam.checkpoint) and real data, the paper's
numbers (docs/fewshot.md §8); with random weights (the fallback here) Dice is only a pipeline check.
Append ':smoke' to the config path for a seconds-long check on a tiny random model.
"""

from amsam_jax.fewshot.recipes import boxes_only


def get_config(arg: str | None = None):
    return boxes_only(arg)
