"""Helpers of the automatic mask generator: point grids, crops, stability, boxes, RLE.

Port of segment_anything/utils/amg.py (Apache-2.0), NumPy (and jax.numpy where a function is used
inside jitted code). The compressed COCO RLE string is pycocotools' `rleToString` /
`rleFrString` (BSD-2), in pure Python, so neither pycocotools nor OpenCV is needed.
"""

import math
from itertools import product
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

# 8-connectivity, as the reference's cv2.connectedComponentsWithStats(mask, 8).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) points evenly spaced in [0, 1]², x varying fastest.

    Raises:
        ValueError: `n_per_side` < 1.
    """
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One point grid per crop layer; layer i has int(n_per_side / scale_per_layer**i) per side.

    As the reference, except that a layer has at least 1 point per side where the reference's
    count rounds down to 0 (and fails): 2 points per side, factor 2, layer 2.
    """
    return [
        build_point_grid(max(int(n_per_side / (scale_per_layer**i)), 1))
        for i in range(n_layers + 1)
    ]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (x0, y0, x1, y1) of all layers: the whole image, then (2**i)² boxes in layer i.

    Exactly the reference's boxes: on an image whose side has fewer pixels than a layer has
    crops per side (a 1 x N image from layer 1 on), some are empty (x1 <= x0 or y1 <= y0); the
    generator skips those.

    Returns:
        the boxes and the layer index of each.
    """
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        crop_box_x0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        crop_box_y0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(crop_box_x0, crop_box_y0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def calculate_stability_score(masks, mask_threshold: float, threshold_offset: float):
    """IoU of the masks thresholded at `mask_threshold ± threshold_offset`, per mask.

    Works on numpy and jax arrays: (..., H, W) logits -> (...,) float32. An empty union gives NaN,
    as in the reference (0 / 0).
    """
    xp = np if isinstance(masks, np.ndarray) else jnp
    intersections = (masks > (mask_threshold + threshold_offset)).sum((-1, -2), dtype=xp.int32)
    unions = (masks > (mask_threshold - threshold_offset)).sum((-1, -2), dtype=xp.int32)
    return intersections.astype(xp.float32) / unions.astype(xp.float32)


def batched_mask_to_box(masks):
    """(..., H, W) bool -> (..., 4) int boxes x0, y0, x1, y1 (inclusive); [0, 0, 0, 0] if empty.

    Works on numpy and jax arrays.
    """
    xp = np if isinstance(masks, np.ndarray) else jnp
    h, w = masks.shape[-2:]
    in_height = masks.any(-1)  # (..., H)
    rows = xp.arange(h)
    bottom = xp.max(xp.where(in_height, rows, 0), axis=-1, initial=0)
    top = xp.min(xp.where(in_height, rows, h), axis=-1, initial=h)
    in_width = masks.any(-2)  # (..., W)
    cols = xp.arange(w)
    right = xp.max(xp.where(in_width, cols, 0), axis=-1, initial=0)
    left = xp.min(xp.where(in_width, cols, w), axis=-1, initial=w)
    empty = (right < left) | (bottom < top)
    out = xp.stack([left, top, right, bottom], axis=-1)
    return xp.where(empty[..., None], 0, out)


def is_box_near_crop_edge(
    boxes: np.ndarray, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> np.ndarray:
    """(K, 4) boxes in the crop frame -> (K,) True where a side is within `atol` of a crop edge
    that is not also an image edge."""
    crop = np.asarray(crop_box, np.float32)
    orig = np.asarray(orig_box, np.float32)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).astype(np.float32)
    near_crop_edge = np.abs(boxes - crop[None]) <= atol
    near_image_edge = np.abs(boxes - orig[None]) <= atol
    return np.any(near_crop_edge & ~near_image_edge, axis=1)


def box_xyxy_to_xywh(box_xyxy: np.ndarray) -> np.ndarray:
    """(..., 4) x0, y0, x1, y1 -> x0, y0, w, h."""
    box = np.array(box_xyxy, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def uncrop_boxes_xyxy(boxes: np.ndarray, crop_box: list[int]) -> np.ndarray:
    """Boxes in the crop frame -> the image frame."""
    x0, y0, _, _ = crop_box
    return boxes + np.asarray([x0, y0, x0, y0], dtype=np.int64)


def uncrop_points(points: np.ndarray, crop_box: list[int]) -> np.ndarray:
    """(K, 2) points in the crop frame -> the image frame."""
    x0, y0, _, _ = crop_box
    return points + np.asarray([x0, y0], dtype=np.int64)


def uncrop_masks(masks: np.ndarray, crop_box: list[int], orig_h: int, orig_w: int) -> np.ndarray:
    """(..., h, w) masks of a crop -> (..., orig_h, orig_w), zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad = [(0, 0)] * (masks.ndim - 2) + [(y0, orig_h - y1), (x0, orig_w - x1)]
    return np.pad(masks, pad)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> uncompressed COCO RLE {"size": [H, W], "counts": [...]} (column-major runs,
    starting with a run of zeros, possibly of length 0)."""
    h, w = mask.shape
    return {"size": [h, w], "counts": mask_to_counts(mask)}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed COCO RLE -> (H, W) bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}*{w}")
    return flat.reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixel count of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Removes 8-connected holes ("holes") or islands ("islands") smaller than `area_thresh`.

    scipy.ndimage.label numbers components in raster order of their first pixel, as OpenCV does,
    so "keep the largest island when all are small" picks the same one on ties.

    Returns:
        the mask and whether it changed.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working_mask = correct_holes ^ mask
    regions, n_labels = ndimage.label(working_mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(regions.reshape(-1), minlength=n_labels + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    fill = np.zeros(n_labels + 1, dtype=bool)
    fill[0] = True
    fill[small] = True
    if not correct_holes:
        fill = ~fill
        if not fill.any():  # every region is below the threshold: keep the largest
            fill[int(np.argmax(sizes)) + 1] = True
    return fill[regions], True


# ---------------------------------------------------------------------------------------------
# COCO RLE (pycocotools' format)


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
