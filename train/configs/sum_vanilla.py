"""python -m amsam_jax.train --config train/configs/sum_vanilla.py --workdir runs/sum_vanilla --set data.labelled=HQSEG:salient --set data.unlabelled=SA1B_DIR --set sam.checkpoint=checkpoints/sam_vit_b

SUM ablation "Vanilla": pseudo-labels used naively, U = 0 (docs/sum.md §3, §8.4).
Expected result: with converted SAM weights, real human-labelled sets and an SA-1B pool, the
direction of the paper's ablation (docs/sum.md §8.4: SUM > w/o task prompt > Vanilla > SAM in
1-point mIoU); with random weights (the fallback here) the numbers are only a pipeline check.
Without data.* it runs on the bundled synthetic set (pseudo-labelled by the automatic mask
generator). Append ':smoke' to the config path for a minutes-long check on a tiny random model.
"""

from amsam_jax.sum.recipes import sum_vanilla


def get_config(arg: str | None = None):
    return sum_vanilla(arg)
