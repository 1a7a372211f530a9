"""The segmentation folder format: `DIR/<split>/images/*` with masks `DIR/<split>/masks/<stem>.png`.

Images are paired with their masks by file stem; a mask's non-zero values are foreground (binary
tasks) or one instance/class each. OS junk and hidden files (`.DS_Store`, `Thumbs.db`,
`desktop.ini`, AppleDouble `._*`, any name starting with ".") are never samples. Pairing checks
the folder structure only; file contents are checked when a sample is read (`load_sample`), so
listing a large pool stays cheap.

A mask may be stored at another resolution than its image if the aspect ratio is the same
(`same_aspect`): the Human Segmentation Dataset stores 198 of its 290 masks smaller than their
photos (e.g. 551x454 for a 1280x1055 photo). Such a mask is resized with nearest neighbour, never
interpolated, to the frame its consumer needs: the few-shot preprocessing zooms it straight to
the model frame, as the reference resizes image and label independently (docs/fewshot.md §4.1);
every other reader gets it at its image's resolution (`load_sample`).
"""

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from amsam_jax.modeling.prompt_encoder import task_id
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.image import (
    IMAGE_SUFFIXES,
    ImageReadError,
    is_junk,
    list_images,
    read_image,
    read_mask_values,
)

MASK_SUFFIX = ".png"
# Unpaired files named in an error message (the first one is also its path).
NAMED_IN_ERRORS = 3


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


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is never data: OS junk (`utils.image.is_junk`) or hidden.

    Args:
        name: a file name (not a path).

    Returns:
        True for `.DS_Store`, `Thumbs.db`, `desktop.ini` (any case), AppleDouble `._*` files and
        every other name starting with ".".
    """
    return name.startswith(".") or is_junk(name)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """The images of one folder in plain string order of their names (`utils.image.list_images`).

    String order is what "first/last N" refers to (docs/fewshot.md §4.2):
    "1.jpg" < "10.jpg" < "100.jpg" < "101.jpg" < ... < "2.jpg". Suffixes match in any case
    (".JPG"); OS junk and hidden files (`is_hidden`) are skipped.

    Raises:
        DataError: missing folder, no images, or two images with the same stem.
    """
    try:
        found = list_images(folder)
    except ImageReadError as e:
        raise DataError(e.path, e.problem) from None
    visible = [p for p in found if not is_hidden(p.name)]
    if not visible:
        raise DataError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}; hidden files ignored)")
    return visible


def _listed(paths: list[Path], what: str) -> str:
    """'; N <what>: a, b, c, ...' for more than one path (the first is the error's path)."""
    if len(paths) < 2:
        return ""
    names = ", ".join(p.name for p in paths[:NAMED_IN_ERRORS])
    return f"; {len(paths)} {what}: {names}{', ...' if len(paths) > NAMED_IN_ERRORS else ''}"


def pair_images_and_masks(
    image_dir: str | os.PathLike,
    mask_dir: str | os.PathLike,
    mask_name: Callable[[str], str] = lambda stem: stem + MASK_SUFFIX,
) -> list[Sample]:
    """Pairs every image of `image_dir` with the mask `mask_dir/mask_name(stem)`.

    Every image needs its mask and every PNG in `mask_dir` needs its image: an unpaired file is
    an error, never a silent skip (a stray file would shift the "first N" selection). The mask's
    suffix matches in any case (`1.PNG` is the mask of `1.jpg`); other files of `mask_dir`
    (LICENSE.txt, ...) and OS junk or hidden files of either folder are ignored.

    Args:
        image_dir: the images.
        mask_dir: the masks.
        mask_name: mask file name of an image stem (ISIC-2018: `stem + "_segmentation.png"`).

    Returns:
        Samples in the sorted order of the image file names.

    Raises:
        DataError: as `list_image_files`; a missing mask folder; images without a mask or masks
            without an image (the first one's path, and how many in total with the next names);
            two masks for one image (`a.png` and `a.PNG`).
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images = list_image_files(image_dir)
    if not mask_dir.is_dir():
        raise DataError(mask_dir, "no such folder")
    try:
        files = sorted(
            (p for p in mask_dir.iterdir() if not is_hidden(p.name) and p.is_file()),
            key=lambda p: p.name,
        )
    except OSError as e:
        raise DataError(mask_dir, f"cannot list folder ({e.strerror or e})") from None
    masks: dict[str, Path] = {}  # "<stem>.png" (suffix lower-cased) -> mask file
    for p in files:
        if p.suffix.lower() != MASK_SUFFIX:
            continue
        key = p.stem + MASK_SUFFIX
        if key in masks:
            raise DataError(p, f"two masks for one image (also {masks[key].name})")
        masks[key] = p
    samples, missing = [], []
    for image_path in images:
        name = mask_name(image_path.stem)
        mask = masks.pop(Path(name).stem + Path(name).suffix.lower(), None)
        if mask is None:
            missing.append(image_path)
        else:
            samples.append(Sample(image_path.stem, image_path, mask))
    if missing:
        name = mask_name(missing[0].stem)
        others = [p.name for p in files if p.stem == Path(name).stem]
        hint = f" (found {', '.join(others)}: masks must be PNG)" if others else ""
        more = _listed(missing, "images without a mask")
        raise DataError(missing[0], f"no mask {mask_dir / name}{hint}{more}")
    if masks:
        extra = sorted(masks.values(), key=lambda p: p.name)
        more = _listed(extra, "masks without an image")
        raise DataError(extra[0], f"mask without image in {image_dir}{more}")
    return samples


def list_samples(data_dir: str | os.PathLike, split: str) -> list[Sample]:
    """Lists `DIR/<split>/images/*` paired with `DIR/<split>/masks/<stem>.png`.

    Only the folder structure is checked here; file contents (corrupt files, a mask of another
    aspect ratio than its image) are checked when a sample is read (`load_sample`), so listing a
    large pool stays cheap and every sample that a run uses is checked before training starts.

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
    masks are accepted. The mask keeps its own resolution (`load_sample` pairs it with its image).

    Returns:
        (H, W) bool.

    Raises:
        DataError: missing, corrupt or truncated file.
    """
    return read_mask_file(path) > 0


def read_label(path: str | os.PathLike, num_classes: int = 1) -> np.ndarray:
    """Reads a mask file as the label of a `num_classes`-class task (docs/fewshot.md §4.5).

    `num_classes` 1 is `read_mask` (value > 0 is foreground). With more, the stored values are
    the class ids 0..num_classes (0 = background): a palette PNG's indices or a single-channel
    8/16-bit PNG's values (of a multi-channel file the first channel, as `read_mask_file`);
    colours are never mapped to classes.

    Returns:
        (H, W) bool for one class, else (H, W) integer class ids.

    Raises:
        DataError: as `read_mask_file`; with more than one class, a floating-point mask, or a
            value outside 0..num_classes (one line naming the file, the value and the setting;
            a 0/255 binary mask and VOC's 255 "ignore" border are such values).
    """
    if num_classes == 1:
        return read_mask(path)
    values = read_mask_file(path)
    if values.dtype.kind == "f":
        raise DataError(
            path, f"a floating-point mask cannot hold class ids (data.num_classes={num_classes})"
        )
    low, top = int(values.min()), int(values.max())
    if low < 0 or top > num_classes:
        bad = low if low < 0 else top
        hint = " (a 0/255 binary mask needs data.num_classes=1)" if bad == 255 else ""
        raise DataError(
            path,
            f"label value {bad} outside 0..{num_classes} (data.num_classes={num_classes}; "
            f"values are class ids, 0 background){hint}",
        )
    return values


def read_mask_file(path: str | os.PathLike) -> np.ndarray:
    """A mask file's values (H, W) (first channel if several; palette indices), EXIF-rotated.

    Raises:
        DataError: missing, corrupt or truncated file.
    """
    try:
        return read_mask_values(path)
    except ImageReadError as e:
        raise DataError(e.path, e.problem) from None


def same_aspect(mask_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether a mask of `mask_size` is its image of `image_size` scaled by one factor.

    True when some s > 0 has both |h - s·H| <= 1 and |w - s·W| <= 1: the image scaled and each
    side rounded either way (551x454 for 1280x1055). Integer arithmetic, no rounding of its own.

    Args:
        mask_size: (h, w).
        image_size: (H, W).
    """
    (h, w), (big_h, big_w) = mask_size, image_size
    # The intervals [(h-1)/H, (h+1)/H] and [(w-1)/W, (w+1)/W] of s intersect.
    return (h - 1) * big_w <= (w + 1) * big_h and (w - 1) * big_h <= (h + 1) * big_w


def resize_nearest(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a (h, w) mask or label map to `size` = (H, W) with nearest neighbour.

    Pixel-centre sampling in exact integer arithmetic: output row i reads input row
    floor((i + 0.5)·h / H), columns alike, so values are copied, never mixed (any dtype). PIL's
    NEAREST is the same rule in floating point; it can differ where (i + 0.5)·h / H is a whole
    number.

    Returns:
        (H, W) array of `values.dtype`; `values` itself when the size is already `size`.
    """
    h, w = values.shape[:2]
    big_h, big_w = size
    if (h, w) == (big_h, big_w):
        return values
    rows = np.minimum((2 * np.arange(big_h) + 1) * h // (2 * big_h), h - 1)
    cols = np.minimum((2 * np.arange(big_w) + 1) * w // (2 * big_w), w - 1)
    return values[rows[:, None], cols[None, :]]


def check_mask_size(sample: Sample, mask_size: tuple[int, int], image_size: tuple[int, int]):
    """Accepts a mask of its image's size or of the same aspect ratio (`same_aspect`).

    Raises:
        DataError: another aspect ratio; one line naming the mask, the image and both sizes.
    """
    if not same_aspect(mask_size, image_size):
        raise DataError(
            sample.mask_path,
            f"mask is {mask_size[1]}x{mask_size[0]} (WxH), image {sample.image_path} is "
            f"{image_size[1]}x{image_size[0]}: another aspect ratio (not this image's mask?)",
        )


def load_sample(
    sample: Sample, resize_mask: bool = True, num_classes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a sample's image and mask (`read_label` of `num_classes`).

    A mask of another size than its image but the same aspect ratio (`same_aspect`) is
    accepted: with `resize_mask` it is resized to the image's (H, W) by `resize_nearest`, so
    every pixel of the image has its label (evaluation at original resolution, export, SUM).
    `resize_mask=False` keeps the mask's own resolution for a caller that resizes it itself (the
    few-shot preprocessing zooms it straight to the model frame).

    Returns:
        (H, W, 3) uint8 RGB image and (H, W) bool mask ((h, w) without `resize_mask`); for
        `num_classes` > 1 the mask holds the class ids.

    Raises:
        DataError: a file is missing or corrupt, the mask has another aspect ratio, or (several
            classes) a label value above `num_classes`.
    """
    try:
        image = read_image(sample.image_path)
    except ImageReadError as e:
        raise DataError(e.path, e.problem) from None
    mask = read_label(sample.mask_path, num_classes)
    check_mask_size(sample, mask.shape, image.shape[:2])
    if resize_mask:
        mask = resize_nearest(mask, image.shape[:2])
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


def read_instance_masks(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as one binary mask per distinct non-zero value (sorted), (K, H, W) bool.

    A binary (0/255) mask gives one mask; an instance or class map gives one per id.

    Args:
        path: the mask file.
        size: (H, W) to resize the value map to with `resize_nearest` (its image's size, after
            `load_sample` checked the aspect ratio); None keeps the file's size.

    Raises:
        DataError: missing or unreadable file.
    """
    arr = read_mask_file(path)
    if size is not None:
        arr = resize_nearest(arr, size)
    ids = np.unique(arr)
    ids = ids[ids != 0]
    return arr[None] == ids[:, None, None]
