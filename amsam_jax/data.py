"""Segmentation data folders, few-shot selection and the reference preprocessing (spec §4)."""

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from amsam_jax.synthetic import make_scene
from amsam_jax.transforms import ImageReadError, read_image_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = ".png"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# The bundled copy under amsam_jax/assets/ is `make_synthetic_dataset(dir, **BUNDLED_SYNTHETIC)`.
BUNDLED_SYNTHETIC = {"n_train": 8, "n_test": 4, "seed": 0, "size": (160, 200)}


class DataError(Exception):
    """A data folder, file or selection that cannot be used; `str()` is `<file>: <problem>`."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem.splitlines()[0] if problem else "unknown error"
        super().__init__(self.problem if path is None else f"{self.path}: {self.problem}")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image and its mask, paired by file stem."""

    stem: str
    image_path: Path
    mask_path: Path


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Parameters of `preprocess` (spec §4.1, §2.4); `key()` names them in cache paths."""

    size: int = 256
    low_res: int = 64
    sam_pixel_norm: bool = False

    def key(self) -> str:
        """A stable string that changes whenever the preprocessed arrays would change."""
        norm = "sam" if self.sam_pixel_norm else "unit"
        return f"zoom3-{self.size}-low{self.low_res}-{norm}"


# ----------------------------------------------------------------------------------------------
# Folders


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Lists the images of one folder, sorted by plain string order of the file names.

    Files with other suffixes (README, .DS_Store, ...) are not images and are left out; the
    suffix test is case-insensitive. String order is what "first/last N" refers to (spec §4.2):
    "1.jpg" < "10.jpg" < "100.jpg" < "101.jpg" < ... < "2.jpg".

    Args:
        folder: the folder.

    Returns:
        Paths of the images.

    Raises:
        DataError: missing folder, no images, or two images with the same stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "no such folder")
    found = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )
    if not found:
        raise DataError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for p in found:
        if p.stem in seen:
            raise DataError(p, f"duplicate image stem {p.stem!r} (also {seen[p.stem].name})")
        seen[p.stem] = p
    return found


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
    return read_mask_values(path) > 0


def read_mask_values(path: str | os.PathLike) -> np.ndarray:
    """A mask file's values (H, W) (first channel if several; palette indices), EXIF-rotated.

    Raises:
        DataError: missing, corrupt or truncated file.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot read mask ({e})") from None
    arr = np.asarray(img)
    return arr[..., 0] if arr.ndim == 3 else arr


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Reads a sample's image and mask at original resolution.

    Returns:
        (H, W, 3) uint8 RGB image and (H, W) bool mask.

    Raises:
        DataError: a file is missing or corrupt, or the mask size differs from the image size.
    """
    try:
        image = read_image_rgb(sample.image_path)
    except ImageReadError as e:
        raise DataError(sample.image_path, str(e).removeprefix(f"{sample.image_path}: ")) from None
    mask = read_mask(sample.mask_path)
    if mask.shape != image.shape[:2]:
        raise DataError(
            sample.mask_path,
            f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH), "
            f"image {sample.image_path.name} is {image.shape[1]}x{image.shape[0]}",
        )
    return image, mask


# ----------------------------------------------------------------------------------------------
# Few-shot selection


def select_few_shot(samples: Sequence[Sample], shots: int, seed: int | None = None) -> list[Sample]:
    """Chooses the few-shot training set from the sorted training pool (spec §4.2).

    Args:
        samples: the training pool, sorted (as `list_samples` returns it).
        shots: N.
        seed: None [default] for the first N; an int for a seeded random subset, returned in
            pool order so D1/D2 (`split_d1_d2`) depend only on which samples were drawn.

    Returns:
        N samples.

    Raises:
        DataError: N < 1 or N larger than the pool.
    """
    if shots < 1:
        raise DataError(None, f"few-shot N = {shots}: must be at least 1")
    if shots > len(samples):
        raise DataError(
            None, f"few-shot N = {shots}: the training pool has only {len(samples)} samples"
        )
    if seed is None:
        return list(samples[:shots])
    picked = np.random.default_rng(seed).choice(len(samples), shots, replace=False)
    return [samples[i] for i in sorted(picked)]


def split_d1_d2(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """D1 = the first floor(N/2) samples, D2 = the rest (N = 4 -> 2/2, N = 5 -> 2/3).

    Raises:
        DataError: N < 2 (D1 would be empty).
    """
    if len(samples) < 2:
        raise DataError(None, f"few-shot set of {len(samples)} sample(s): D1/D2 need at least 2")
    half = len(samples) // 2
    return list(samples[:half]), list(samples[half:])


# ----------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(
    image: np.ndarray,
    mask: np.ndarray,
    size: int = 256,
    low_res: int = 64,
    sam_pixel_norm: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference preprocessing (spec §4.1), identical for training and test.

    The image is resized to size x size ignoring the aspect ratio with `scipy.ndimage.zoom`
    (cubic spline, default boundary mode, no clipping: the spline overshoot on sharp edges is
    kept, as in the reference), the label with order 0; the low-res label is an order-0 zoom of
    the resized label (SciPy's corner-aligned nearest neighbour).

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool (or any array; > 0 is foreground).
        size: model input side.
        low_res: side of the decoder's logits.
        sam_pixel_norm: False [default, faithful]: image in [0, 1]; True: SAM's standardised
            0-255 input ((x * 255 - mean) / std, spec §2.4).

    Returns:
        (size, size, 3) float32 image, (size, size) int32 label and (low_res, low_res) int32 label.
    """
    h, w = image.shape[:2]
    img = image.astype(np.float64) / 255.0
    label = (np.asarray(mask) > 0).astype(np.int32)
    # Per channel: the reference's single 3-D call with factors (size/H, size/W, 1) is the same
    # spline (a unit factor interpolates the channel axis at its knots; |diff| ~1e-15 in float64)
    # but 8x slower, as it filters and interpolates along the channel axis too.
    img = np.stack(
        [ndimage.zoom(img[..., c], (size / h, size / w), order=3) for c in range(3)], axis=-1
    )
    label = ndimage.zoom(label, (size / h, size / w), order=0)
    label_low = ndimage.zoom(label, (low_res / size, low_res / size), order=0)
    if sam_pixel_norm:
        img = (img * 255.0 - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)
    return img.astype(np.float32), label, label_low


def load_split_arrays(
    samples: Sequence[Sample],
    preprocessing: Preprocessing = Preprocessing(),
    original_masks: bool = False,
) -> dict:
    """Reads and preprocesses samples into stacked arrays.

    Args:
        samples: the samples (any order; it is kept).
        preprocessing: `preprocess` parameters.
        original_masks: also keep the original-resolution masks (for evaluation at original
            resolution; `read_mask(sample.mask_path)` reloads one instead).

    Returns:
        {"image": (N, S, S, 3) float32, "label": (N, S, S) int32, "label_low": (N, L, L) int32,
        "stem": list of N str, "original_size": (N, 2) int64 (H, W)}, plus "mask": list of N
        (H, W) bool when `original_masks`.

    Raises:
        DataError: no samples, or as `load_sample`.
    """
    if not samples:
        raise DataError(None, "no samples to load")
    images, labels, lows, sizes, masks = [], [], [], [], []
    for sample in samples:
        image, mask = load_sample(sample)
        img, label, low = preprocess(image, mask, **dataclasses.asdict(preprocessing))
        images.append(img)
        labels.append(label)
        lows.append(low)
        sizes.append(mask.shape)
        if original_masks:
            masks.append(mask)
    out = {
        "image": np.stack(images),
        "label": np.stack(labels),
        "label_low": np.stack(lows),
        "stem": [s.stem for s in samples],
        "original_size": np.array(sizes, dtype=np.int64),
    }
    if original_masks:
        out["mask"] = masks
    return out


# ----------------------------------------------------------------------------------------------
# Synthetic data


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (160, 200),
) -> Path:
    """Writes a deterministic dataset in the folder format (objects on textured backgrounds).

    Scene i (train first, then test) is `make_scene(seed * 10_000 + i, size, shape)` with the
    shape alternating disc/blob; files are `scene_<i:03d>.png` with masks 0/255 8-bit PNG.

    Args:
        out_dir: created if needed; existing files of the same names are overwritten.
        n_train: training images.
        n_test: test images.
        seed: dataset seed.
        size: (H, W) of every image.

    Returns:
        `out_dir`.
    """
    out_dir = Path(out_dir)
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        image, mask = make_scene(seed * 10_000 + i, size, ("disc", "blob")[i % 2])
        for sub, arr in (("images", image), ("masks", mask.astype(np.uint8) * 255)):
            (out_dir / split / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(out_dir / split / sub / f"scene_{i:03d}.png")
    return out_dir


def bundled_synthetic_dir() -> Path:
    """The synthetic dataset shipped in the package (`BUNDLED_SYNTHETIC` parameters)."""
    return Path(__file__).parent / "assets" / "synthetic_fewshot"
