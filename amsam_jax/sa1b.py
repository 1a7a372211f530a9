"""SA-1B pseudo-label format: COCO RLE, per-image JSON + probability sidecar, SUM's mask filter.

SUM spec §2.2: every unlabelled image carries SAM's automatic-mask-generator output in SA-1B's
JSON layout; our generator also keeps each mask's soft probability as uint8 in `<stem>.prob.npz`
(`prob`, (K, H, W), aligned with the annotations). Real SA-1B has binary masks only, so without a
sidecar p_SAM = 255 · mask.

The compressed RLE string is pycocotools' `rleToString` / `rleFrString` (BSD-2), in pure Python.
"""

import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from amsam_jax.transforms import ResizeLongestSide

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PROB_SUFFIX = ".prob.npz"
ANNOTATION_KEYS = (
    "id",
    "segmentation",
    "area",
    "bbox",
    "predicted_iou",
    "point_coords",
    "stability_score",
    "crop_box",
)


class PseudoLabelError(Exception):
    """A pseudo-label file that cannot be used; one line naming the file and the problem."""


# ---------------------------------------------------------------------------------------------
# COCO RLE


def rle_counts_to_string(counts: list[int]) -> str:
    """Uncompressed RLE counts -> pycocotools' compressed string.

    Counts from index 3 on are stored as the difference to the count two places earlier; each
    value is written as 5-bit groups, least significant first, as chr(48 + group), with 0x20 set
    on every group but the last (the last group's 0x10 bit carries the sign).
    """
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as C's on a signed long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def rle_string_to_counts(s: str) -> list[int]:
    """pycocotools' compressed string -> uncompressed RLE counts (inverse of the above).

    Raises:
        ValueError: a character outside the code or a truncated value.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid RLE character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0, *counts] if flat.size and flat[0] else counts


def counts_to_mask(counts: list[int], size: tuple[int, int]) -> np.ndarray:
    """Column-major run lengths -> (H, W) bool.

    Raises:
        ValueError: negative counts, or counts that do not sum to H·W.
    """
    h, w = size
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise ValueError("negative RLE count")
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h}x{w}={h * w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(w, h).T


def mask_to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> {"size": [H, W], "counts": compressed string} (SA-1B's segmentation)."""
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": rle_counts_to_string(mask_to_counts(mask))}


def coco_rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """{"size": [H, W], "counts": str or list} -> (H, W) bool."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_string_to_counts(counts)
    return counts_to_mask(counts, (int(h), int(w)))


# ---------------------------------------------------------------------------------------------
# Per-image annotation files


def _atomic_write(path: Path, write) -> None:
    """Calls write(file_object) on a temporary file in `path`'s folder, then renames it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prob_path(json_path: str | os.PathLike) -> Path:
    """The probability sidecar of an annotation file: `<stem>.prob.npz`."""
    json_path = Path(json_path)
    return json_path.with_name(json_path.stem + PROB_SUFFIX)


def image_id_of(file_name: str) -> int:
    """A stable integer image id from the file name (CRC-32), so resumed runs agree."""
    return zlib.crc32(file_name.encode("utf-8"))


def records_to_annotations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Automatic-mask-generator records (binary_mask mode) -> SA-1B annotation dicts."""
    anns = []
    for k, r in enumerate(records):
        seg = r["segmentation"]
        if isinstance(seg, np.ndarray):
            seg = mask_to_coco_rle(seg)
        anns.append(
            {
                "id": k,
                "segmentation": seg,
                "area": int(r["area"]),
                "bbox": [float(v) for v in r["bbox"]],
                "predicted_iou": float(r["predicted_iou"]),
                "point_coords": [[float(v) for v in p] for p in r["point_coords"]],
                "stability_score": float(r["stability_score"]),
                "crop_box": [float(v) for v in r["crop_box"]],
            }
        )
    return anns


def write_annotations(
    json_path: str | os.PathLike,
    image: dict[str, Any],
    annotations: list[dict[str, Any]],
    prob: np.ndarray | None = None,
) -> None:
    """Writes one image's SA-1B JSON (and the probability sidecar), each atomically.

    The sidecar is written first, so an existing JSON means the image is complete.

    Args:
        json_path: `<out>/<stem>.json`.
        image: {"image_id", "file_name", "height", "width"}.
        annotations: SA-1B annotation dicts.
        prob: optional uint8 (K, H, W) soft probabilities aligned with `annotations`.
    """
    json_path = Path(json_path)
    h, w = int(image["height"]), int(image["width"])
    if prob is not None:
        prob = np.asarray(prob)
        if prob.dtype != np.uint8 or prob.shape != (len(annotations), h, w):
            raise ValueError(
                f"{json_path}: prob must be uint8 ({len(annotations)}, {h}, {w}), "
                f"got {prob.dtype} {prob.shape}"
            )
        _atomic_write(prob_path(json_path), lambda f: np.savez_compressed(f, prob=prob))
    data = {"image": image, "annotations": annotations}
    _atomic_write(json_path, lambda f: f.write(json.dumps(data).encode("utf-8")))


@dataclass
class Annotations:
    """One image's annotation file."""

    json_path: Path
    image: dict[str, Any]  # image_id, file_name, height, width
    annotations: list[dict[str, Any]]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image["height"]), int(self.image["width"])

    def masks(self) -> np.ndarray:
        """bool (K, H, W) decoded segmentations."""
        h, w = self.size
        out = np.zeros((len(self.annotations), h, w), dtype=bool)
        for k, ann in enumerate(self.annotations):
            out[k] = coco_rle_to_mask(ann["segmentation"])
        return out

    def load_prob(self, indices: np.ndarray | None = None) -> np.ndarray:
        """p_SAM as uint8 (K, H, W): the sidecar if present, else 255 · mask (real SA-1B).

        Args:
            indices: optional subset of annotation indices (in this order).

        Raises:
            PseudoLabelError: an unreadable sidecar or one whose shape does not match.
        """
        indices = np.arange(len(self.annotations)) if indices is None else np.asarray(indices)
        path = prob_path(self.json_path)
        h, w = self.size
        if not path.exists():
            out = np.zeros((len(indices), h, w), dtype=np.uint8)
            for j, k in enumerate(indices):
                out[j] = coco_rle_to_mask(self.annotations[int(k)]["segmentation"]) * np.uint8(255)
            return out
        try:
            with np.load(path) as f:
                prob = f["prob"]
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise PseudoLabelError(f"{path}: cannot read probability sidecar ({e})") from None
        if prob.dtype != np.uint8 or prob.shape != (len(self.annotations), h, w):
            raise PseudoLabelError(
                f"{path}: expected uint8 ({len(self.annotations)}, {h}, {w}), "
                f"got {prob.dtype} {prob.shape}"
            )
        return prob[indices]


def _check_annotation(path: Path, k: int, ann: Any, h: int, w: int) -> None:
    if not isinstance(ann, dict):
        raise PseudoLabelError(f"{path}: annotation {k} is not an object")
    missing = [key for key in ANNOTATION_KEYS if key not in ann]
    if missing:
        raise PseudoLabelError(f"{path}: annotation {k} lacks {', '.join(missing)}")
    seg = ann["segmentation"]
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise PseudoLabelError(f"{path}: annotation {k} segmentation is not an RLE dict")
    if list(seg["size"]) != [h, w]:
        raise PseudoLabelError(
            f"{path}: annotation {k} segmentation size {seg['size']} != image size [{h}, {w}]"
        )
    for key in ("bbox", "crop_box"):
        if not isinstance(ann[key], list) or len(ann[key]) != 4:
            raise PseudoLabelError(f"{path}: annotation {k} {key} must be [x, y, w, h]")


def read_annotations(json_path: str | os.PathLike) -> Annotations:
    """Reads and validates one SA-1B annotation file (RLE strings are decoded lazily).

    Raises:
        PseudoLabelError: missing or corrupt JSON, missing keys, or sizes that disagree.
    """
    path = Path(json_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PseudoLabelError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PseudoLabelError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise PseudoLabelError(f"{path}: expected an object with 'image' and 'annotations'")
    image, anns = data["image"], data["annotations"]
    if not isinstance(image, dict) or not all(k in image for k in ("height", "width")):
        raise PseudoLabelError(f"{path}: 'image' must have height and width")
    if not isinstance(anns, list):
        raise PseudoLabelError(f"{path}: 'annotations' must be a list")
    h, w = image["height"], image["width"]
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise PseudoLabelError(f"{path}: image height/width must be positive integers")
    for k, ann in enumerate(anns):
        _check_annotation(path, k, ann, h, w)
    return Annotations(path, image, anns)


# ---------------------------------------------------------------------------------------------
# SUM's mask filter and training label (spec §2.2)


@dataclass(frozen=True)
class FilterResult:
    """Kept annotation indices (ascending), or None with the reason the image is skipped."""

    indices: np.ndarray | None
    reason: str | None = None


def filter_masks(
    areas: np.ndarray,
    crop_boxes: np.ndarray,
    rng: np.random.Generator,
    *,
    image_hw: tuple[int, int] | None = None,
    has_alpha: bool = False,
    max_ratio: float = 0.95,
    min_ratio: float = 100.0,
    max_num_mask: int = 40,
    max_side: int = 5000,
    ref_size: int = 1024,
) -> FilterResult:
    """SUM's pseudo-label mask filter and cap (spec §2.2).

    Keeps mask k iff area/(crop_w·crop_h) <= max_ratio and
    area·(ref_size/max(crop_w, crop_h))² >= 100·min_ratio; if more than `max_num_mask` survive,
    draws that many uniformly without replacement and returns them in index order.

    Args:
        areas: (K,) mask areas in pixels.
        crop_boxes: (K, 4) crop boxes XYWH.
        rng: draws the cap subset.
        image_hw: original (H, W); skipped when a side exceeds `max_side`.
        has_alpha: the image has an alpha channel (skipped).
        max_ratio, min_ratio, max_num_mask, max_side, ref_size: the spec's constants.

    Returns:
        the kept indices, or None and a reason.
    """
    if has_alpha:
        return FilterResult(None, "image has an alpha channel")
    if image_hw is not None and max(image_hw) > max_side:
        return FilterResult(None, f"image side {max(image_hw)} exceeds {max_side}")
    areas = np.asarray(areas, np.float64).reshape(-1)
    crop_boxes = np.asarray(crop_boxes, np.float64).reshape(-1, 4)
    crop_w, crop_h = crop_boxes[:, 2], crop_boxes[:, 3]
    ratio = areas / (crop_w * crop_h)
    scaled_area = areas * (ref_size / np.maximum(crop_w, crop_h)) ** 2
    keep = np.flatnonzero((ratio <= max_ratio) & (scaled_area >= 100 * min_ratio))
    if keep.size == 0:
        return FilterResult(None, "no mask survives the size filter")
    if keep.size > max_num_mask:
        keep = np.sort(rng.choice(keep, size=max_num_mask, replace=False))
    return FilterResult(keep.astype(np.int64))


def filter_annotations(
    ann: Annotations, rng: np.random.Generator, *, has_alpha: bool = False, **kw
) -> FilterResult:
    """`filter_masks` on an annotation file's rows."""
    areas = np.asarray([a["area"] for a in ann.annotations], np.float64)
    crops = np.asarray([a["crop_box"] for a in ann.annotations], np.float64).reshape(-1, 4)
    return filter_masks(areas, crops, rng, image_hw=ann.size, has_alpha=has_alpha, **kw)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's 'nearest' resize: floor(dst · in/out) with a float32 scale."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def prepare_label(p_sam: np.ndarray, size: int = 1024) -> tuple[np.ndarray, tuple[int, int]]:
    """Resizes p_SAM to the SAM input frame (nearest) and zero-pads it to size × size.

    Args:
        p_sam: uint8 (K, H, W) probabilities at the original resolution (value/255).
        size: the model input's long side S.

    Returns:
        uint8 (K, S, S) and the valid (h, w).
    """
    p_sam = np.asarray(p_sam)
    if p_sam.ndim != 3 or p_sam.dtype != np.uint8:
        raise ValueError(f"p_sam must be uint8 (K, H, W), got {p_sam.dtype} {p_sam.shape}")
    k, in_h, in_w = p_sam.shape
    h, w = ResizeLongestSide.get_preprocess_shape(in_h, in_w, size)
    out = np.zeros((k, size, size), dtype=np.uint8)
    rows, cols = nearest_indices(in_h, h), nearest_indices(in_w, w)
    out[:, :h, :w] = p_sam[:, rows[:, None], cols[None, :]]
    return out, (h, w)


def label_target(p: np.ndarray) -> np.ndarray:
    """Binary target y = 1[p/255 > 0.5] of uint8 probabilities (i.e. p > 127.5)."""
    return np.asarray(p) > 127


# ---------------------------------------------------------------------------------------------
# A folder of images with annotation files


def image_has_alpha(path: str | os.PathLike) -> bool:
    """Whether the image file has an alpha channel or a transparency key (header only)."""
    try:
        with Image.open(path) as img:
            return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise PseudoLabelError(f"{path}: cannot read image ({e})") from None


@dataclass
class PseudoLabelItem:
    """One image of a pseudo-labelled folder."""

    image_path: Path
    annotations: Annotations

    @property
    def json_path(self) -> Path:
        return self.annotations.json_path

    def has_alpha(self) -> bool:
        return image_has_alpha(self.image_path)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder (by suffix, case-insensitive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PseudoLabelError(f"{folder}: not a directory")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def iter_pseudo_labels(
    images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None
) -> Iterator[PseudoLabelItem]:
    """Iterates a folder of images with `<stem>.json` (+ optional `<stem>.prob.npz`), by name.

    Args:
        images_dir: the images.
        labels_dir: where the annotation files are (default: next to the images).

    Raises:
        PseudoLabelError: a missing or invalid annotation file, or one whose size disagrees with
            its image.
    """
    labels_dir = Path(images_dir if labels_dir is None else labels_dir)
    for image_path in list_images(images_dir):
        json_path = labels_dir / f"{image_path.stem}.json"
        if not json_path.exists():
            raise PseudoLabelError(f"{json_path}: missing annotation file for {image_path.name}")
        ann = read_annotations(json_path)
        try:
            with Image.open(image_path) as img:
                w, h = img.size
                if img.getexif().get(0x0112) in (5, 6, 7, 8):  # read_image_rgb transposes these
                    w, h = h, w
        except (UnidentifiedImageError, OSError) as e:
            raise PseudoLabelError(f"{image_path}: cannot read image ({e})") from None
        if (h, w) != ann.size:
            raise PseudoLabelError(
                f"{json_path}: size {list(ann.size)} != image {image_path.name} size [{h}, {w}]"
            )
        yield PseudoLabelItem(image_path, ann)
