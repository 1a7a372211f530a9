"""tensorflow-datasets builders for the paper's datasets (needs the `data` extra); see `base`.

    python -m amsam_jax.datasets export tiktok --manual-dir ~/Downloads/tiktok --out data/tiktok

Importing this package registers the builders "tiktok", "human_seg" and "isic2018".
"""

from amsam_jax.data.tfds.base import SegmentationConfig, export_to_folder
from amsam_jax.data.tfds.human_seg import HumanSeg
from amsam_jax.data.tfds.isic2018 import Isic2018
from amsam_jax.data.tfds.tiktok import Tiktok

BUILDERS = {b.name: b for b in (Tiktok, HumanSeg, Isic2018)}

__all__ = ["BUILDERS", "HumanSeg", "Isic2018", "SegmentationConfig", "Tiktok", "export_to_folder"]
