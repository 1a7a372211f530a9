"""python -m amsam_jax.train --config train/configs/calibration_only.py --workdir runs/calibration_only --set data.dir=DATA

Ablation (paper Table 4, row 'calibration only'): no box prompts.
Expected result: with converted SAM ViT-B weights (sam.checkpoint) and real data, the paper's
numbers (docs/fewshot.md §8); with random weights (the fallback here) Dice is only a pipeline check.
Append ':smoke' to the config path for a seconds-long check on a tiny random model.
"""

from amsam_jax.fewshot.recipes import calibration_only


def get_config(arg: str | None = None):
    return calibration_only(arg)
