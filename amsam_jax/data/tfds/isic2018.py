"""ISIC-2018 Task 1 (skin lesion segmentation), official splits, as a tfds builder."""

from pathlib import Path

from amsam_jax.data.folder import DataError, Sample, pair_images_and_masks
from amsam_jax.data.tfds.base import (
    SegmentationBuilder,
    SegmentationConfig,
    find_folder,
    not_found,
)

# split -> (input folder, ground-truth folder): each official ZIP (same name + ".zip") holds
# one top-level folder of its own name.
FOLDERS = {
    "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}
MASK_SUFFIX = "_segmentation.png"


class Isic2018(SegmentationBuilder):
    """ISIC-2018 Task 1 lesion segmentation with the official train/validation/test splits.

    Manual download: challenge.isic-archive.com/data/#2018, Task 1 (inputs of Task 1-2 and the
    Task 1 ground truth). Extract every ZIP (`ISIC2018_Task1-2_Training_Input.zip`,
    `ISIC2018_Task1_Training_GroundTruth.zip`, ...) into one folder and pass it as
    `manual_dir`; each holds a folder of its own name::

        ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg                          2,594 images
        ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png
        ISIC2018_Task1-2_Validation_Input/ + ISIC2018_Task1_Validation_GroundTruth/  100
        ISIC2018_Task1-2_Test_Input/ + ISIC2018_Task1_Test_GroundTruth/            1,000

    Each folder is found up to three levels below `manual_dir`, also inside a folder of the same
    name (a ZIP extracted into a folder named after it). The archives' LICENSE.txt /
    ATTRIBUTION.txt and OS junk are ignored; extensions match in any case. Splits are the
    official ones unchanged (docs/fewshot.md §4.2; the paper's test set is the 1,000 test
    images); "train" and "test" are required, "validation" is built when its folders are
    present (one without the other is an error). Masks pair with images by stem plus the
    `_segmentation.png` suffix.
    """

    name = "isic2018"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the ISIC-2018 Task 1 training, validation and test inputs and ground truth "
        "from https://challenge.isic-archive.com/data/#2018, extract them into one folder and "
        "pass it as manual_dir."
    )
    HOMEPAGE = "https://challenge.isic-archive.com/data/#2018"
    BUILDER_CONFIGS = [SegmentationConfig(name="official", description="Official splits.")]

    def split_samples(self, manual_dir: Path) -> dict[str, list[Sample]]:
        splits = {}
        for split, (inputs, truth) in FOLDERS.items():
            required = split != "validation"
            image_dir = find_folder(manual_dir, inputs, required)
            mask_dir = find_folder(manual_dir, truth, required)
            if image_dir is None and mask_dir is None:
                continue
            if image_dir is None or mask_dir is None:
                missing, there = (inputs, "ground-truth") if image_dir is None else (truth, "input")
                raise DataError(
                    manual_dir,
                    f"{not_found(f'folder {missing}/')} (its {there} folder is there)",
                )
            splits[split] = pair_images_and_masks(
                image_dir, mask_dir, mask_name=lambda stem: stem + MASK_SUFFIX
            )
        return splits
