"""python -m amsam_jax.train --config train/configs/blo_sam.py --workdir runs/blo_sam --set data.dir=DATA

BLO-SAM with the project defaults (exact hypergradient, clean schedules).
Expected result: with converted SAM ViT-B weights (sam.checkpoint) and real data, the paper's
numbers (docs/fewshot.md §8); with random weights (the fallback here) Dice is only a pipeline check.
Append ':smoke' to the config path for a seconds-long check on a tiny random model.
"""

from amsam_jax.fewshot.recipes import blo_sam


def get_config(arg: str | None = None):
    return blo_sam(arg)
