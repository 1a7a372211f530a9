"""The segmentation folder format: `DIR/<split>/images/*` with masks `DIR/<split>/masks/<stem>.png`.

Images are paired with their masks by file stem; a mask's non-zero values are foreground (binary
tasks) or one instance/class each. Pairing checks the folder structure only; file contents are
checked when a sample is read (`load_sample`), so listing a large pool stays cheap.
"""

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from amsam_jax.modeling.prompt_encoder import task_id
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.image import ImageReadError, list_images, read_image, read_mask_values

MASK_SUFFIX = ".png"


class DataError(AmsamError):
    """A data folder, file or selection that cannot be used; `str()` is `<file>: <problem>`."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image and its mask, paired by file stem."""

    stem: str
    image_path: Path
    mask_path: Path


# ----------------------------------------------------------------------------------------------
# Folders


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """The images of one folder in plain string order of their names (`utils.image.list_images`).

    String order is what "first/last N" refers to (docs/fewshot.md §4.2):
    "1.jpg" < "10.jpg" < "100.jpg" < "101.jpg" < ... < "2.jpg".

    Raises:
        DataError: missing folder, no images, or two images with the same stem.
    """
    try:
        return list_images(folder)
    except ImageReadError as e:
        raise DataError(e.path, e.problem) from None


def pair_images_and_masks(
    image_dir: str | os.PathLike,
    mask_dir: str | os.PathLike,
    mask_name: Callable[[str], str] = lambda stem: stem + MASK_SUFFIX,
) -> list[Sample]:
    """Pairs every image of `image_dir` with the mask `mask_dir/mask_name(stem)`.

    Every image needs its mask and every PNG in `mask_dir` needs its image: an unpaired file is
    an error, never a silent skip (a stray file would shift the "first N" selection).

    Args:
        image_dir: the images.
        mask_dir: the masks.
        mask_name: mask file name of an image stem (ISIC-2018: `stem + "_segmentation.png"`).

    Returns:
        Samples in the sorted order of the image file names.

    Raises:
        DataError: as `list_image_files`, a missing mask folder, an image without its mask or a
            mask without its image.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images = list_image_files(image_dir)
    if not mask_dir.is_dir():
        raise DataError(mask_dir, "no such folder")
    masks = {p.name for p in mask_dir.iterdir() if p.suffix.lower() == MASK_SUFFIX}
    samples = []
    for image_path in images:
        name = mask_name(image_path.stem)
        if name not in masks:
            others = sorted(p.name for p in mask_dir.glob(f"{image_path.stem}.*"))
            hint = f" (found {', '.join(others)}: masks must be PNG)" if others else ""
            raise DataError(image_path, f"no mask {mask_dir / name}{hint}")
        masks.remove(name)
        samples.append(Sample(image_path.stem, image_path, mask_dir / name))
    if masks:
        first = sorted(masks)[0]
        more = f" (and {len(masks) - 1} more)" if len(masks) > 1 else ""
        raise DataError(mask_dir / first, f"mask without image in {image_dir}{more}")
    return samples


def list_samples(data_dir: str | os.PathLike, split: str) -> list[Sample]:
    """Lists `DIR/<split>/images/*` paired with `DIR/<split>/masks/<stem>.png`.

    Only the folder structure is checked here; file contents (corrupt files, a mask of another
    size than its image) are checked when a sample is read (`load_sample`), so listing a large
    pool stays cheap and every sample that a run uses is checked before training starts.

    Args:
        data_dir: the data folder.
        split: "train", "test" (or any other split folder, e.g. "validation").

    Returns:
        Samples sorted by plain string order of the image file names.

    Raises:
        DataError: as `pair_images_and_masks`, or a missing split folder.
    """
    split_dir = Path(data_dir) / split
    if not split_dir.is_dir():
        raise DataError(split_dir, f"no such split folder (expected {split}/images, masks)")
    return pair_images_and_masks(split_dir / "images", split_dir / "masks")


# ----------------------------------------------------------------------------------------------
# Reading


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a mask file as a binary label: value > 0 is foreground (first channel if several).

    EXIF orientation is applied as for images. 8-bit, 16-bit, palette (index > 0) and 1-bit
    masks are accepted.

    Returns:
        (H, W) bool.

    Raises:
        DataError: missing, corrupt or truncated file.
    """
    return read_mask_file(path) > 0


def read_mask_file(path: str | os.PathLike) -> np.ndarray:
    """A mask file's values (H, W) (first channel if several; palette indices), EXIF-rotated.

    Raises:
        DataError: missing, corrupt or truncated file.
    """
    try:
        return read_mask_values(path)
    except ImageReadError as e:
        raise DataError(e.path, e.problem) from None


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Reads a sample's image and mask at original resolution.

    Returns:
        (H, W, 3) uint8 RGB image and (H, W) bool mask.

    Raises:
        DataError: a file is missing or corrupt, or the mask size differs from the image size.
    """
    try:
        image = read_image(sample.image_path)
    except ImageReadError as e:
        raise DataError(e.path, e.problem) from None
    mask = read_mask(sample.mask_path)
    if mask.shape != image.shape[:2]:
        raise DataError(
            sample.mask_path,
            f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH), "
            f"image {sample.image_path.name} is {image.shape[1]}x{image.shape[0]}",
        )
    return image, mask


# ----------------------------------------------------------------------------------------------
# Task-tagged folders and instance masks (SUM, interactive evaluation)


def parse_labelled(spec: str) -> tuple[Path, int]:
    """'DIR:task' (task name or id) -> (DIR, task id); 'DIR' alone is 'unspecified'."""
    path, sep, task = spec.rpartition(":")
    if not sep or not path or os.sep in task:
        path, task = spec, "unspecified"
    try:
        tid = task_id(int(task) if task.isdigit() else task)
    except ValueError as e:
        raise DataError(path, f"data.labelled entry {spec!r}: {e}") from None
    return Path(path), tid


def read_instance_masks(path: str | os.PathLike) -> np.ndarray:
    """A mask file as one binary mask per distinct non-zero value (sorted), (K, H, W) bool.

    A binary (0/255) mask gives one mask; an instance or class map gives one per id.

    Raises:
        DataError: missing or unreadable file.
    """
    arr = read_mask_file(path)
    ids = np.unique(arr)
    ids = ids[ids != 0]
    return arr[None] == ids[:, None, None]
