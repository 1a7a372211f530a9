"""ISIC-2018 Task 1 (skin lesion segmentation), official splits, as a tfds builder."""

from pathlib import Path

from amsam_jax.data.folder import DataError, Sample, pair_images_and_masks
from amsam_jax.data.tfds.base import SegmentationBuilder, SegmentationConfig

# split -> (input folder, ground-truth folder) of the official ISIC-2018 Task 1 archives.
FOLDERS = {
    "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}


class Isic2018(SegmentationBuilder):
    """ISIC-2018 Task 1 lesion segmentation with the official train/validation/test splits.

    Manual download: challenge.isic-archive.com/data/#2018, Task 1 (inputs of Task 1-2 and the
    Task 1 ground truth). Extract every ZIP into one folder and pass it as `manual_dir`::

        ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg                          2,594 images
        ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png
        ISIC2018_Task1-2_Validation_Input/ + ISIC2018_Task1_Validation_GroundTruth/  100
        ISIC2018_Task1-2_Test_Input/ + ISIC2018_Task1_Test_GroundTruth/            1,000

    The archives' LICENSE.txt / ATTRIBUTION.txt are ignored. Splits are the official ones
    unchanged (docs/fewshot.md §4.2; the paper's test set is the 1,000 test images); "train" and
    "test" are required, "validation" is built when both of its folders are present. Masks pair with
    images by stem plus the `_segmentation.png` suffix.
    """

    name = "isic2018"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the ISIC-2018 Task 1 training, validation and test inputs and ground truth "
        "from https://challenge.isic-archive.com/data/#2018, extract them into one folder and "
        "pass it as manual_dir."
    )
    HOMEPAGE = "https://challenge.isic-archive.com/data/#2018"
    BUILDER_CONFIGS = [
        SegmentationConfig(
            name="official",
            description="Official ISIC-2018 Task 1 splits.",
            split_sizes=(("train", 2594), ("validation", 100), ("test", 1000)),
        )
    ]

    def split_samples(self, manual_dir: Path) -> dict[str, list[Sample]]:
        splits = {}
        for split, (inputs, truth) in FOLDERS.items():
            image_dir, mask_dir = manual_dir / inputs, manual_dir / truth
            if split == "validation" and not (image_dir.is_dir() and mask_dir.is_dir()):
                continue
            if not image_dir.is_dir():
                raise DataError(image_dir, f"no such folder (the official {split} input archive)")
            splits[split] = pair_images_and_masks(
                image_dir, mask_dir, mask_name=lambda stem: f"{stem}_segmentation.png"
            )
        return splits
