"""Few-shot data: the N-shot selection, D1/D2, and the reference preprocessing (docs/fewshot.md §4).

Host side (NumPy/SciPy), identical for training and test: images are resized to S × S with a cubic
spline ignoring the aspect ratio, labels with nearest neighbour, the low-resolution labels from
those. `Split` holds one split's arrays in the model frame, with its cached embeddings and boxes.
"""

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from amsam_jax.boxes.box_file import entry_boxes, image_box
from amsam_jax.build_sam import PIXEL_MEAN, PIXEL_STD
from amsam_jax.data.folder import DataError, Sample, load_sample, resize_nearest
from amsam_jax.evaluation.fewshot import EvalData


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Parameters of `preprocess` (docs/fewshot.md §4.1, §2.4); `key()` names them in caches."""

    size: int = 256
    low_res: int = 64
    sam_pixel_norm: bool = False
    num_classes: int = 1  # `data.num_classes`: how labels are read (docs/fewshot.md §4.5)

    def key(self) -> str:
        """A stable string that changes whenever the preprocessed images would change (it keys
        their cached embeddings; the labels are not cached)."""
        norm = "sam" if self.sam_pixel_norm else "unit"
        return f"zoom3-{self.size}-low{self.low_res}-{norm}"


def select_few_shot(samples: Sequence[Sample], shots: int, seed: int | None = None) -> list[Sample]:
    """Chooses the few-shot training set from the sorted training pool (docs/fewshot.md §4.2).

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
# Preprocessing (docs/fewshot.md §4.1)


def preprocess(
    image: np.ndarray,
    mask: np.ndarray,
    size: int = 256,
    low_res: int = 64,
    sam_pixel_norm: bool = False,
    num_classes: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference preprocessing (docs/fewshot.md §4.1), identical for training and test.

    The image is resized to size x size ignoring the aspect ratio with `scipy.ndimage.zoom`
    (cubic spline, default boundary mode, no clipping: the spline overshoot on sharp edges is
    kept, as in the reference), the label with order 0; the low-res label is an order-0 zoom of
    the resized label (SciPy's corner-aligned nearest neighbour). Image and label are zoomed
    independently, each by its own factors, as in the reference: a mask stored at a lower
    resolution than its image (same aspect ratio, `data.folder.load_sample` with
    `resize_mask=False`) goes straight to the model frame, never through the image's size.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (h, w) bool (or any array; > 0 is foreground), (h, w) = (H, W) or the same
            aspect ratio at another resolution; with `num_classes` > 1 its values are the class
            ids (`data.folder.read_label`).
        size: model input side.
        low_res: side of the decoder's logits.
        sam_pixel_norm: False [default, faithful]: image in [0, 1]; True: SAM's standardised
            0-255 input ((x * 255 - mean) / std, docs/fewshot.md §2.4).
        num_classes: K: 1 binarises the mask, more keep its values (docs/fewshot.md §4.5).

    Returns:
        (size, size, 3) float32 image, (size, size) int32 label and (low_res, low_res) int32 label.
    """
    h, w = image.shape[:2]
    img = image.astype(np.float64) / 255.0
    if num_classes == 1:
        label = (np.asarray(mask) > 0).astype(np.int32)
    else:
        label = np.asarray(mask).astype(np.int32)
    # Per channel: the reference's single 3-D call with factors (size/H, size/W, 1) is the same
    # spline (a unit factor interpolates the channel axis at its knots; |diff| ~1e-15 in float64)
    # but 8x slower, as it filters and interpolates along the channel axis too.
    img = np.stack(
        [ndimage.zoom(img[..., c], (size / h, size / w), order=3) for c in range(3)], axis=-1
    )
    mask_h, mask_w = label.shape
    label = ndimage.zoom(label, (size / mask_h, size / mask_w), order=0)
    label_low = ndimage.zoom(label, (low_res / size, low_res / size), order=0)
    if sam_pixel_norm:
        img = (img * 255.0 - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)
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
        original_masks: also keep the masks at their image's resolution (for evaluation at
            original resolution; `load_sample(sample)[1]` reloads one instead).

    Returns:
        {"image": (N, S, S, 3) float32, "label": (N, S, S) int32, "label_low": (N, L, L) int32,
        "stem": list of N str, "original_size": (N, 2) int64 (H, W) of the images}, plus
        "mask": list of N (H, W) bool when `original_masks` (a mask stored at another
        resolution is resized to its image's with `resize_nearest`; the labels are zoomed from
        the stored mask, as in the reference); with `num_classes` > 1 the labels and masks hold
        the class ids.

    Raises:
        DataError: no samples, or as `load_sample`.
    """
    if not samples:
        raise DataError(None, "no samples to load")
    images, labels, lows, sizes, masks = [], [], [], [], []
    for sample in samples:
        image, mask = load_sample(sample, resize_mask=False, num_classes=preprocessing.num_classes)
        img, label, low = preprocess(image, mask, **dataclasses.asdict(preprocessing))
        images.append(img)
        labels.append(label)
        lows.append(low)
        sizes.append(image.shape[:2])
        if original_masks:
            masks.append(resize_nearest(mask, image.shape[:2]))
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
# Splits in the model frame


@dataclasses.dataclass
class Split:
    """One split's arrays in the model frame plus what evaluation needs."""

    stems: tuple[str, ...]
    image: np.ndarray  # (N, S, S, 3) preprocessed
    label_low: np.ndarray  # (N, L, L)
    original_size: np.ndarray  # (N, 2)
    masks: tuple[np.ndarray, ...]
    embedding: np.ndarray | None = None  # (N, G, G, C)
    boxes: np.ndarray | None = None  # (N, 4) model frame; (N, M, 4) with box_valid
    box_valid: np.ndarray | None = None  # (N, M) bool: boxes.max_per_image = M > 1 (§6.4)
    num_classes: int = 1  # K foreground classes of the labels (overlay colours)

    def eval_data(self) -> EvalData:
        return EvalData(
            self.embedding, self.label_low, self.stems, self.boxes, self.masks,
            box_valid=self.box_valid,
        )  # fmt: skip

    def batch(self, idx: np.ndarray) -> dict:
        b = {
            "embedding": jnp.asarray(self.embedding[idx]),
            "label": jnp.asarray(self.label_low[idx]),
        }
        if self.boxes is not None:
            b["box"] = jnp.asarray(self.boxes[idx])
        if self.box_valid is not None:
            b["box_valid"] = jnp.asarray(self.box_valid[idx])
        return b


def load_split(samples: Sequence[Sample], prep: Preprocessing) -> Split:
    """Reads and preprocesses `samples` into a `Split` (original masks kept for evaluation)."""
    arrays = load_split_arrays(samples, prep, original_masks=True)
    return Split(
        stems=tuple(arrays["stem"]),
        image=arrays["image"],
        label_low=arrays["label_low"],
        original_size=arrays["original_size"],
        masks=tuple(arrays["mask"]),
        num_classes=prep.num_classes,
    )


def _model_frame(box: list[float] | None, h: int, w: int, size: int) -> np.ndarray:
    """A box in original pixels (None: the full image) as x·S/W, y·S/H, clipped to [0, S]."""
    x0, y0, x1, y1 = box if box is not None else [0.0, 0.0, float(w), float(h)]
    scaled = np.asarray([x0 * size / w, y0 * size / h, x1 * size / w, y1 * size / h])
    return np.clip(scaled, 0, size)


def _entry(box_file: dict, path: str, stem: str) -> dict:
    entry = box_file["boxes"].get(stem)
    if entry is None:
        raise DataError(path, f"no box for image {stem!r}")
    return entry


def boxes_for(split: Split, box_file: dict, path: str, size: int) -> np.ndarray:
    """Each image's box (original pixels) mapped to the model frame: x·S/W, y·S/H, clipped."""
    out = []
    for stem, (h, w) in zip(split.stems, split.original_size, strict=True):
        box = image_box(_entry(box_file, path, stem), path, stem)
        out.append(_model_frame(box, h, w, size))
    return np.asarray(out, np.float32)


def multi_boxes_for(
    split: Split, box_file: dict, path: str, size: int, max_per_image: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Up to M = `max_per_image` boxes per image in the model frame, padded (docs/fewshot.md §6.4).

    An image's boxes are its entry's list (`box_file.entry_boxes`: highest score first), cut to
    the first M; an entry without a list has its `box` only, and an image with no box (an empty
    list, or a null `box`) the full frame, as with one box. Padded slots repeat the first box
    and are marked invalid.

    Returns:
        boxes (N, M, 4) float32, valid (N, M) bool (slot 0 is always valid), and the stems of
        the images that had more than M boxes.

    Raises:
        DataError: an image missing from the box file.
        BoxError: a malformed entry (one line naming the file and the image).
    """
    n = len(split.stems)
    boxes = np.zeros((n, max_per_image, 4), np.float32)
    valid = np.zeros((n, max_per_image), bool)
    truncated = []
    for i, (stem, (h, w)) in enumerate(zip(split.stems, split.original_size, strict=True)):
        entry = _entry(box_file, path, stem)
        listed = entry_boxes(entry, path, stem)
        if listed is None:
            listed = [image_box(entry, path, stem)]
        elif not listed:  # nothing detected: the entry's fallback box (or the full frame)
            listed = [image_box(entry, path, stem) if "box" in entry else None]
        if len(listed) > max_per_image:
            truncated.append(stem)
            listed = listed[:max_per_image]
        boxes[i, : len(listed)] = [_model_frame(b, h, w, size) for b in listed]
        boxes[i, len(listed) :] = boxes[i, 0]
        valid[i, : len(listed)] = True
    return boxes, valid, truncated


def assign_boxes(
    split: Split, box_file: dict, path: str, size: int, max_per_image: int = 1
) -> list[str]:
    """Sets `split.boxes` (and `split.box_valid` when `max_per_image` > 1) from a box file.

    With `max_per_image` = 1 the boxes are `boxes_for`'s (N, 4) and `box_valid` stays None: the
    one-box path, unchanged. Above 1 they are `multi_boxes_for`'s.

    Returns:
        The stems of the images whose list of boxes was cut to `max_per_image`.
    """
    if max_per_image == 1:
        split.boxes, split.box_valid = boxes_for(split, box_file, path, size), None
        return []
    split.boxes, split.box_valid, truncated = multi_boxes_for(
        split, box_file, path, size, max_per_image
    )
    return truncated
