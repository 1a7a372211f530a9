"""TikTok dances (Kaggle "Segmentation Full Body TikTok Dancing Dataset") as a tfds builder."""

from pathlib import Path

from amsam_jax.data.folder import Sample, pair_images_and_masks
from amsam_jax.data.tfds.base import SegmentationBuilder, SegmentationConfig, find_root


class Tiktok(SegmentationBuilder):
    """TikTok dances: full-body person masks; last 2,000 sorted = test, the rest = train.

    Manual download: Kaggle dataset "Segmentation Full Body TikTok Dancing Dataset"
    (tapakah68/segmentation-full-body-tiktok-dancing-dataset, 2,615 frames). Unzip it and pass
    the folder as `manual_dir`. The archive holds `df.csv` and the frames one folder deeper than
    its name suggests, `segmentation_full_body_tik_tok_2615_img/segmentation_full_body_tik_tok_
    2615_img/`; the folder holding::

        images/<name>.png    the frames
        masks/<name>.png     one mask per frame, same file name (value > 0 = person)

    is found up to three levels below `manual_dir`. Other files and folders (`df.csv`,
    `collages/`, OS junk) are ignored. Splits (docs/fewshot.md §4.2): file names sorted in plain
    string order; the last 2,000 are "test", the others (615) the "train" pool from which the
    few-shot sets take their first N.
    """

    name = "tiktok"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the Kaggle dataset tapakah68/segmentation-full-body-tiktok-dancing-dataset, "
        "unzip it and pass the folder holding images/ and masks/ (or one above it) as "
        "manual_dir."
    )
    HOMEPAGE = (
        "https://www.kaggle.com/datasets/tapakah68/segmentation-full-body-tiktok-dancing-dataset"
    )
    BUILDER_CONFIGS = [
        SegmentationConfig(
            name="paper",
            description="Last 2,000 sorted images = test, the others = train (AM-SAM, BLO-SAM).",
            num_test=2000,
        )
    ]

    def split_samples(self, manual_dir: Path) -> dict[str, list[Sample]]:
        root = find_root(manual_dir, ("images", "masks"))
        samples = pair_images_and_masks(root / "images", root / "masks")
        return self.cut_sorted_pool(samples, root)
