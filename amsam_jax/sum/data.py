"""SUM data (docs/sum.md §2): labelled folders with task ids, pseudo-labelled images, and the
fixed-shape batches of the interactive step.

Every image enters the model frame as SAM's predictor does: longest side resized to S with PIL
bilinear, normalised with the SAM pixel mean/std, zero-padded bottom/right to S×S. Masks are
resized to the valid (h, w) region with nearest neighbour (torch's index rule) and zero-padded.
Soft maps stay 8-bit (value/255) until the step, which computes U itself (docs/sum.md §3.1).
"""

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from amsam_jax.build_sam import PIXEL_MEAN, PIXEL_STD
from amsam_jax.data.folder import (
    DataError,
    list_samples,
    load_sample,
    parse_labelled,
    read_instance_masks,
)
from amsam_jax.data.sa1b import (
    Annotations,
    PseudoLabelError,
    iter_pseudo_labels,
)
from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.predictor import model_input
from amsam_jax.sum.config import SumConfig
from amsam_jax.training.embedder import Embedder
from amsam_jax.utils.image import ImageReadError, image_size, read_image
from amsam_jax.utils.io import atomic_write
from amsam_jax.utils.transforms import ResizeLongestSide

REFINED_SUFFIX = ".refined.npz"  # (K, L, L) uint8 refiner probabilities + (K,) bool "valid"


def frame_key(size: int, preprocess: str = "sam") -> str:
    """The embedding cache's name of `model_frame_image` at side `size`."""
    if preprocess == "medsam":
        return f"medsam-longest-side-{size}-area-minmax-pad"
    return f"sam-longest-side-{size}-pil-bilinear-meanstd-pad"


def embed_entries(
    embedder: Embedder, entries: Sequence["Entry"], size: int, preprocess: str = "sam"
) -> np.ndarray:
    """(I, G, G, C) embeddings of the entries' images in the model frame (cached by path)."""
    key = frame_key(size, preprocess)

    def frame(entry: Entry):
        return lambda: model_frame_image(entry.image, size, preprocess)[0]

    return np.stack([embedder.embed_one(e.key, frame(e), key) for e in entries])


def labelled_specs(cfg: SumConfig) -> tuple[str, ...]:
    """`data.labelled`, or the bundled synthetic few-shot set as a salient-object source."""
    return cfg.data.labelled or (f"{bundled_synthetic_dir()}:salient",)


def _order(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def pick(seed: int, stream: int, position: int, n: int) -> int:
    """The item at global `position` of a stream that reshuffles every pass over n items.

    Every data order derives from (seed, stream, position) only, so a resumed run draws exactly
    what an uninterrupted one would.
    """
    return int(_order(seed, stream, position // n, n)[position % n])


def model_frame_image(
    image: np.ndarray, size: int, preprocess: str = "sam"
) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 (H, W, 3) -> the model's normalised, zero-padded float32 (S, S, 3), valid (h, w).

    `preprocess` is the model's (`SamConfig.preprocess`): SAM's mean/std or LiteMedSAM's min-max.
    """
    return model_input(image, size, preprocess, PIXEL_MEAN, PIXEL_STD)


def resize_nearest(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(K, H, W) -> (K, h, w) nearest with torch's rule src = floor(dst · in / out)."""
    k, h_in, w_in = maps.shape
    rows = np.minimum((np.arange(hw[0]) * (h_in / hw[0])).astype(np.int64), h_in - 1)
    cols = np.minimum((np.arange(hw[1]) * (w_in / hw[1])).astype(np.int64), w_in - 1)
    return maps[:, rows][:, :, cols]


def to_frame(maps: np.ndarray, hw: tuple[int, int], size: int) -> np.ndarray:
    """(K, H, W) maps -> (K, S, S): nearest-resized to (h, w), zero-padded; dtype kept."""
    out = np.zeros((maps.shape[0], size, size), maps.dtype)
    out[:, : hw[0], : hw[1]] = resize_nearest(maps, hw)
    return out


# ----------------------------------------------------------------------------------------------
# The pseudo-label mask filter and training label (docs/sum.md §2.2)


@dataclasses.dataclass(frozen=True)
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
    """SUM's pseudo-label mask filter and cap (docs/sum.md §2.2).

    Keeps mask k iff area/(crop_w·crop_h) <= max_ratio and
    area·(ref_size/max(crop_w, crop_h))² >= 100·min_ratio; if more than `max_num_mask` survive,
    draws that many uniformly without replacement and returns them in index order.

    Args:
        areas: (K,) mask areas in pixels.
        crop_boxes: (K, 4) crop boxes XYWH.
        rng: draws the cap subset.
        image_hw: original (H, W); skipped when a side exceeds `max_side`.
        has_alpha: the image has an alpha channel (skipped).
        max_ratio, min_ratio, max_num_mask, max_side, ref_size: the constants of docs/sum.md §2.2.

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


@dataclasses.dataclass
class Entry:
    """One image of a step, with all its candidate masks (before the per-step cap).

    `prob` holds the 8-bit target probability at original resolution (255·mask for human
    labels, p_SAM for pseudo-labels); `refined` the refiner's (K, L, L) maps over the padded
    frame (None: U ≡ 0); `seed` the SA-1B seed points (K, 2) in original pixels (NaN: none).
    """

    key: str
    image: np.ndarray
    prob: np.ndarray
    task: int
    refined: np.ndarray | None = None
    has_refined: np.ndarray | None = None
    seed: np.ndarray | None = None


class LabelledSet:
    """Human-labelled images from folders in the few-shot format, each with its task id."""

    def __init__(self, specs: Sequence[str], split: str):
        self.items: list[tuple] = []
        for spec in specs:
            folder, tid = parse_labelled(spec)
            for sample in list_samples(folder, split):
                for path in (sample.image_path, sample.mask_path):
                    _check_header(path)
                self.items.append((sample, tid))
        if not self.items:
            raise DataError(None, f"no labelled images in {', '.join(specs)} ({split} split)")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Entry:
        sample, tid = self.items[i]
        image, _ = load_sample(sample)  # checks the files and the mask's aspect ratio
        masks = read_instance_masks(sample.mask_path, image.shape[:2])
        if len(masks) == 0:
            raise DataError(sample.mask_path, "mask has no foreground")
        prob = masks.astype(np.uint8) * np.uint8(255)
        return Entry(f"{sample.image_path}", image, prob, tid)


def _check_header(path: Path) -> None:
    """Fails early, with one line naming the file, on a file whose header cannot be read (the
    pixels are read, and checked again, when the image is used)."""
    try:
        image_size(path)
    except ImageReadError as e:
        raise DataError(e.path, e.problem) from None


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static shapes of one step kind: images per step, masks per image, frame and grid."""

    images: int
    masks_per_image: int
    size: int
    low_res: int


def select_masks(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of n masks, drawn uniformly without replacement, kept in index order."""
    if n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, cap, replace=False))


def make_batch(
    entries: Sequence[Entry],
    embeddings: np.ndarray,
    shapes: Shapes,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The arrays of one step (static shapes; missing masks are padding with weight 0).

    Args:
        entries: `shapes.images` images.
        embeddings: (I, G, G, C) their cached embeddings.
        shapes: the step kind.
        rng: draws which masks to keep when an image has more than `masks_per_image`.

    Returns:
        embedding (I, G, G, C) f32, image_index (M,) i32, prob (M, S, S) u8, refined
        (M, L, L) u8, has_refined (M,) bool, valid_hw (M, 2) i32, task (M,) i32,
        weight (M,) f32, seed (M, 2) f32 (x, y in the frame; NaN: none). M = I · masks_per_image.
    """
    n_img, per, s, low = shapes.images, shapes.masks_per_image, shapes.size, shapes.low_res
    m = n_img * per
    out = {
        "embedding": np.asarray(embeddings, np.float32),
        "image_index": np.repeat(np.arange(n_img, dtype=np.int32), per),
        "prob": np.zeros((m, s, s), np.uint8),
        "refined": np.zeros((m, low, low), np.uint8),
        "has_refined": np.zeros((m,), bool),
        "valid_hw": np.zeros((m, 2), np.int32),
        "task": np.zeros((m,), np.int32),
        "weight": np.zeros((m,), np.float32),
        "seed": np.full((m, 2), np.nan, np.float32),
    }
    for i, entry in enumerate(entries):
        h0, w0 = entry.image.shape[:2]
        hw = ResizeLongestSide.get_preprocess_shape(h0, w0, s)
        keep = select_masks(len(entry.prob), per, rng)
        sl = slice(i * per, i * per + len(keep))
        prob = to_frame(entry.prob[keep], hw, s)
        out["prob"][sl] = prob
        out["valid_hw"][i * per : (i + 1) * per] = hw  # padding masks too (their weight is 0)
        out["task"][sl] = entry.task
        # A mask that vanishes at the model resolution has no target pixel: padding.
        out["weight"][sl] = (prob > 127).any(axis=(1, 2)).astype(np.float32)
        if entry.refined is not None:
            out["refined"][sl] = entry.refined[keep]
            out["has_refined"][sl] = entry.has_refined[keep]
        if entry.seed is not None:
            seed = entry.seed[keep].astype(np.float64)
            out["seed"][sl] = np.floor(seed * np.asarray([hw[1] / w0, hw[0] / h0]))
    return out


class PseudoSet:
    """Pseudo-labelled images in SA-1B format (docs/sum.md §2.2), with refined maps if U needs them.

    Args:
        images_dir: the images.
        labels_dir: their `<stem>.json` (+ `<stem>.prob.npz`) files (default: next to them).
        refined_dir: `<stem>.refined.npz` files (default: `labels_dir`); only read when
            `use_refined`.
        use_refined: U from refined maps (else U ≡ 0, the Vanilla ablation).
        filters: min_ratio, max_ratio, max_num_mask, min_refine_ratio of docs/sum.md §2.2 and §3.1.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        labels_dir: str | os.PathLike | None = None,
        refined_dir: str | os.PathLike | None = None,
        use_refined: bool = True,
        *,
        min_ratio: float = 100.0,
        max_ratio: float = 0.95,
        max_num_mask: int = 40,
        min_refine_ratio: float = 100.0,
        size: int = 1024,
    ):
        try:
            self.items = list(iter_pseudo_labels(images_dir, labels_dir))
        except PseudoLabelError as e:
            raise DataError(None, str(e)) from None
        if not self.items:
            raise DataError(images_dir, "no pseudo-labelled images (empty folder)")
        self.refined_dir = Path(refined_dir or labels_dir or images_dir)
        self.use_refined = use_refined
        self.filters = dict(min_ratio=min_ratio, max_ratio=max_ratio, max_num_mask=max_num_mask)
        self.min_refine_ratio = min_refine_ratio
        self.size = size
        self.skipped: dict[str, str] = {}
        self.masks_without_map = 0

    def __len__(self) -> int:
        return len(self.items)

    def refined_path(self, i: int) -> Path:
        return self.refined_dir / f"{self.items[i].image_path.stem}{REFINED_SUFFIX}"

    def load(self, i: int, rng: np.random.Generator) -> Entry | None:
        """Image i's entry, or None if the image is skipped (the reason is kept in `skipped`)."""
        item = self.items[i]
        ann = item.annotations
        try:
            kept = filter_annotations(ann, rng, has_alpha=item.has_alpha(), **self.filters)
        except PseudoLabelError as e:
            raise DataError(None, str(e)) from None
        if kept.indices is None:
            self.skipped[str(item.image_path)] = kept.reason
            return None
        refined = has_refined = None
        if self.use_refined:
            path = self.refined_path(i)
            if (
                not path.is_file()
            ):  # docs/sum.md §3.1: no refinement file at all -> draw another image
                self.skipped[str(item.image_path)] = f"no refined maps ({path.name})"
                return None
            refined, valid = read_refined(path, len(ann.annotations))
            areas = np.asarray([a["area"] for a in ann.annotations], np.float64)
            crops = np.asarray([a["crop_box"] for a in ann.annotations], np.float64)
            big = filter_masks(
                areas, crops, rng, max_ratio=np.inf, min_ratio=self.min_refine_ratio,
                max_num_mask=len(areas),
            ).indices  # fmt: skip
            ok = np.zeros(len(areas), bool)
            if big is not None:
                ok[big] = True
            refined, has_refined = refined[kept.indices], (valid & ok)[kept.indices]
            self.masks_without_map += int((~has_refined).sum())
        try:
            image = read_image(item.image_path)
            prob = ann.load_prob(kept.indices)
        except (ImageReadError, PseudoLabelError) as e:
            raise DataError(None, str(e)) from None
        seed = np.full((len(kept.indices), 2), np.nan)
        for j, k in enumerate(kept.indices):
            pts = ann.annotations[int(k)].get("point_coords") or []
            if pts:
                seed[j] = pts[0][:2]
        return Entry(str(item.image_path), image, prob, 0, refined, has_refined, seed)


def read_refined(path: Path, num_masks: int) -> tuple[np.ndarray, np.ndarray]:
    """A `<stem>.refined.npz`: uint8 (K, L, L) probabilities and (K,) bool validity."""
    try:
        with np.load(path) as f:
            prob, valid = f["prob"], f["valid"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(path, f"cannot read refined maps ({e})") from None
    if prob.dtype != np.uint8 or prob.ndim != 3 or len(prob) != num_masks:
        raise DataError(
            path, f"expected uint8 ({num_masks}, L, L) refined maps, got {prob.dtype} {prob.shape}"
        )
    if valid.shape != (num_masks,):
        raise DataError(path, f"expected ({num_masks},) validity flags, got {valid.shape}")
    return prob, valid.astype(bool)


def write_refined(path: Path, prob: np.ndarray, valid: np.ndarray) -> None:
    """Writes refined maps atomically (tmp + rename)."""
    prob, valid = np.asarray(prob, np.uint8), np.asarray(valid, bool)
    atomic_write(path, lambda f: np.savez_compressed(f, prob=prob, valid=valid))
