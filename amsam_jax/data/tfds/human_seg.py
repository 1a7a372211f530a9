"""Vikram Shenoy's Human Segmentation Dataset (GitHub) as a tfds builder."""

from pathlib import Path

from amsam_jax.data.folder import Sample, pair_images_and_masks
from amsam_jax.data.tfds.base import SegmentationBuilder, SegmentationConfig, find_root


class HumanSeg(SegmentationBuilder):
    """Human segmentation (Vikram Shenoy): the last 100 sorted images = test, the rest = train.

    Manual download: github.com/VikramShenoy97/Human-Segmentation-Dataset (clone or download
    the ZIP and extract it). Pass the repository folder, or a folder up to three levels above
    it (e.g. the one holding `Human-Segmentation-Dataset-master/`), as `manual_dir`; it holds::

        Training_Images/<n>.jpg    290 photos: n = 1..289 and 300 (290..299 are absent)
        Ground_Truth/<n>.png       one mask per photo, same stem (value > 0 = person)

    The README says 300 images; the repository has the 290 above, plus a `.DS_Store` in each
    folder (ignored). 198 of the masks are stored at a lower resolution than their photo with the
    same aspect ratio (a 1280x1055 photo, a 551x454 mask); they are resized to the photo with
    nearest neighbour. Splits (docs/fewshot.md §4.2): file names sorted in plain string order
    ("1, 10, 100, 101, ..."); the last 100 are "test", the others (190) the "train" pool.
    """

    name = "human_seg"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download github.com/VikramShenoy97/Human-Segmentation-Dataset and pass the folder "
        "holding Training_Images/ and Ground_Truth/ (or one above it) as manual_dir."
    )
    HOMEPAGE = "https://github.com/VikramShenoy97/Human-Segmentation-Dataset"
    BUILDER_CONFIGS = [
        SegmentationConfig(
            name="paper",
            description="Last 100 sorted images = test, the others = train (AM-SAM, BLO-SAM).",
            num_test=100,
        )
    ]

    def split_samples(self, manual_dir: Path) -> dict[str, list[Sample]]:
        root = find_root(manual_dir, ("Training_Images", "Ground_Truth"))
        samples = pair_images_and_masks(root / "Training_Images", root / "Ground_Truth")
        return self.cut_sorted_pool(samples, root)
