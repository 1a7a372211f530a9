"""python -m amsam_jax.train --config train/configs/samed.py --workdir runs/samed --set data.dir=DATA

SAMed baseline: decoder LoRA on all shots, no bi-level prompt learning.
Expected result: with converted SAM ViT-B weights (sam.checkpoint) and real data, the paper's
numbers (docs/fewshot.md §8); with random weights (the fallback here) Dice is only a pipeline check.
Append ':smoke' to the config path for a seconds-long check on a tiny random model.
"""

from amsam_jax.fewshot.recipes import samed


def get_config(arg: str | None = None):
    return samed(arg)
