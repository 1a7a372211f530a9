"""python -m amsam_jax.train --config train/configs/am_sam.py --workdir runs/am_sam --set data.dir=DATA --set boxes.detector=detectors/yolov8n.onnx

AM-SAM: bi-level LoRA + prompt training with box prompts and mask calibration.
Expected result: with converted SAM ViT-B weights (sam.checkpoint) and real data, the paper's
numbers (docs/fewshot.md §8); with random weights (the fallback here) Dice is only a pipeline check.
Append ':smoke' to the config path for a seconds-long check on a tiny random model.
"""

from amsam_jax.fewshot.recipes import am_sam


def get_config(arg: str | None = None):
    return am_sam(arg)
