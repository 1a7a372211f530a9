"""The SA-1B annotation format: per-image JSON (COCO RLE masks) plus a probability sidecar.

Every pseudo-labelled image carries SAM's automatic-mask-generator output in SA-1B's JSON layout
(docs/sum.md §2.2); our generator also keeps each mask's soft probability as uint8 in
`<stem>.prob.npz` (`prob`, (K, H, W), aligned with the annotations). Real SA-1B has binary masks
only, so without a sidecar p_SAM = 255 · mask.
"""

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amsam_jax.utils.amg import coco_rle_to_mask, mask_to_coco_rle
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.image import has_alpha, image_size, list_images
from amsam_jax.utils.io import atomic_write

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


class PseudoLabelError(AmsamError):
    """A pseudo-label file that cannot be used; one line naming the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Per-image annotation files


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
        atomic_write(prob_path(json_path), lambda f: np.savez_compressed(f, prob=prob))
    data = {"image": image, "annotations": annotations}
    atomic_write(json_path, json.dumps(data))


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
# A folder of images with annotation files


@dataclass
class PseudoLabelItem:
    """One image of a pseudo-labelled folder."""

    image_path: Path
    annotations: Annotations

    @property
    def json_path(self) -> Path:
        return self.annotations.json_path

    def has_alpha(self) -> bool:
        return has_alpha(self.image_path)


def iter_pseudo_labels(
    images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None = None
) -> Iterator[PseudoLabelItem]:
    """Iterates a folder of images with `<stem>.json` (+ optional `<stem>.prob.npz`), by name.

    OS junk (`.DS_Store`, AppleDouble `._*`, ...) and other hidden files are not images.

    Args:
        images_dir: the images.
        labels_dir: where the annotation files are (default: next to the images).

    Raises:
        PseudoLabelError: a missing or invalid annotation file, or one whose size disagrees with
            its image.
    """
    labels_dir = Path(images_dir if labels_dir is None else labels_dir)
    for image_path in list_images(images_dir):
        if image_path.name.startswith("."):  # hidden; `list_images` already skips OS junk
            continue
        json_path = labels_dir / f"{image_path.stem}.json"
        if not json_path.exists():
            raise PseudoLabelError(f"{json_path}: missing annotation file for {image_path.name}")
        ann = read_annotations(json_path)
        h, w = image_size(image_path)  # upright, as `read_image` decodes it
        if (h, w) != ann.size:
            raise PseudoLabelError(
                f"{json_path}: size {list(ann.size)} != image {image_path.name} size [{h}, {w}]"
            )
        yield PseudoLabelItem(image_path, ann)
