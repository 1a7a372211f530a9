"""Vikram Shenoy's Human Segmentation Dataset (GitHub, 300 images) as a tfds builder."""

from pathlib import Path

from amsam_jax.data.folder import Sample, pair_images_and_masks
from amsam_jax.data.tfds.base import (
    SegmentationBuilder,
    SegmentationConfig,
    find_root,
)


class HumanSeg(SegmentationBuilder):
    """Human segmentation (Vikram Shenoy): 300 images; last 100 sorted = test, first 200 = train.

    Manual download: github.com/VikramShenoy97/Human-Segmentation-Dataset (clone or download
    the ZIP and extract it). Pass the repository folder (or its parent, e.g. the folder holding
    `Human-Segmentation-Dataset-master/`) as `manual_dir`; it must hold::

        Training_Images/<n>.jpg    300 photos, n = 1..300
        Ground_Truth/<n>.png       one mask per photo, same stem (value > 0 = person)

    Splits (docs/fewshot.md §4.2): file names sorted in plain string order ("1, 10, 100, 101,
    ..."); the last 100 are "test", the first 200 the "train" pool.
    """

    name = "human_seg"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download github.com/VikramShenoy97/Human-Segmentation-Dataset and pass the folder "
        "holding Training_Images/ and Ground_Truth/ (or its parent) as manual_dir."
    )
    HOMEPAGE = "https://github.com/VikramShenoy97/Human-Segmentation-Dataset"
    BUILDER_CONFIGS = [
        SegmentationConfig(
            name="paper",
            description="Last 100 sorted images = test, first 200 = train (AM-SAM, BLO-SAM).",
            num_test=100,
            split_sizes=(("train", 200), ("test", 100)),
        )
    ]

    def split_samples(self, manual_dir: Path) -> dict[str, list[Sample]]:
        root = find_root(manual_dir, ("Training_Images", "Ground_Truth"))
        samples = pair_images_and_masks(root / "Training_Images", root / "Ground_Truth")
        return self.cut_sorted_pool(samples, root)
