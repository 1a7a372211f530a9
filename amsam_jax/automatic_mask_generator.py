"""Automatic mask generation: SAM prompted by a grid of points, with filtering and NMS.

Port of segment_anything/automatic_mask_generator.py (Apache-2.0) on the Flax model. Same
arguments, same order of operations and the same output records; in addition each record can
carry SAM's soft probability map (docs/sum.md §2.2).

Deviations, all for speed or memory (none changes a result):
- point batches have a fixed size (the last one is padded), so there is one decode compile per
  crop size; thresholding, the stability score and mask boxes are computed inside that jitted call;
- kept masks are stored cropped to their box instead of as RLE, and the probability maps are
  recomputed from the low-resolution logits only for the masks that survive NMS.
"""

import math
from functools import partial
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.modeling.sam import Sam
from amsam_jax.predictor import SamPredictor
from amsam_jax.utils.amg import (
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_coco_rle,
    mask_to_rle,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.nms import nms

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

# ---------------------------------------------------------------------------------------------
# Jitted model calls


@partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _predict_points(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    features: jax.Array,
    coords: jax.Array,
    stability_score_offset: jax.Array,
    input_size: tuple[int, int],
    crop_size: tuple[int, int],
    task: int | None,
):
    """One positive point per row -> three masks per point, scored and boxed at crop size.

    Args:
        features: (1, G, G, C) embedding of the crop, shared by every point.
        coords: (B, 2) points in the resized-input frame.
        stability_score_offset: scalar.
        input_size: (h, w) of the resized crop.
        crop_size: (H, W) of the crop.
        task: the task-prompt id (docs/sum.md §4), or None for plain SAM; a static argument, so
            one id is one compile.

    Returns:
        low-res logits (B, 3, L, L), predicted IoU (B, 3), stability score (B, 3), masks
        (B, 3, H, W) bool and boxes (B, 3, 4) int32.
    """
    model = nnx.merge(graphdef, state)
    b = coords.shape[0]
    labels = jnp.ones((b, 1), jnp.int32)
    sparse, dense = model.prompt_encoder((coords[:, None, :], labels), None, None, task)
    low_res, iou = model.mask_decoder(
        features, model.prompt_encoder.get_dense_pe(), sparse, dense, True
    )
    logits = model.postprocess_masks(low_res, input_size, crop_size)  # (B, 3, H, W)
    thr = model.mask_threshold
    stability = calculate_stability_score(logits, thr, stability_score_offset)
    masks = logits > thr
    return low_res, iou, stability, masks, batched_mask_to_box(masks)


@partial(jax.jit, static_argnums=(0, 3, 4))
def _probabilities(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    low_res: jax.Array,
    input_size: tuple[int, int],
    crop_size: tuple[int, int],
) -> jax.Array:
    """(P, L, L) low-res logits -> (P, H, W) uint8 round(255·sigmoid) at crop size.

    The value is clamped to >= 128 where logit > threshold and <= 127 elsewhere, so that
    `prob > 127.5` reproduces the binary mask exactly (float32 rounding at logit ≈ 0 could
    otherwise disagree).
    """
    model = nnx.merge(graphdef, state)
    logits = model.postprocess_masks(low_res[:, None], input_size, crop_size)[:, 0]
    prob = jnp.round(255.0 * jax.nn.sigmoid(logits))
    prob = jnp.where(logits > model.mask_threshold, jnp.maximum(prob, 128), jnp.minimum(prob, 127))
    return prob.astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------
# Settings


class AmgSettingError(AmsamError, ValueError):
    """A generator setting out of range (also a `ValueError`); `str()` is `<setting>: <problem>`.

    Attributes:
        setting: the constructor argument at fault (`path`, as every `AmsamError`'s "where").
        problem: what is wrong.
    """

    @property
    def setting(self) -> str:
        return self.path


def _number(name: str, value, low: float, high: float | None = None, open_high: bool = False):
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise AmgSettingError(name, f"must be a finite number, got {value!r}")
    if high is None:
        if value < low:
            raise AmgSettingError(name, f"must be >= {low:g}, got {value:g}")
    elif value < low or value > high or (open_high and value == high):
        interval = f"[{low:g}, {high:g}{')' if open_high else ']'}"
        raise AmgSettingError(name, f"must be in {interval}, got {value:g}")


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise AmgSettingError(name, f"must be a whole number, got {value!r}")
    if value < low:
        raise AmgSettingError(name, f"must be >= {low}, got {value}")


def check_generator_settings(
    points_per_side: int | None = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    crop_n_layers: int = 0,
    crop_nms_thresh: float = 0.7,
    crop_overlap_ratio: float = 512 / 1500,
    crop_n_points_downscale_factor: int = 1,
    point_grids: list[np.ndarray] | None = None,
    min_mask_region_area: int = 0,
    output_mode: str = "binary_mask",
) -> None:
    """Checks the settings of `SamAutomaticMaskGenerator` (same names and defaults).

    The reference accepts any value and fails later (ZeroDivisionError for 0 points per side,
    an endless or empty loop for a batch of 0, ...) or silently keeps nothing; here a value
    outside its range is refused up front, before a model is needed.

    Raises:
        AmgSettingError: one line naming the setting: exactly one of `points_per_side` and
            `point_grids`; whole numbers >= 1 (points per side and per batch, the downscale
            factor) or >= 0 (crop layers); thresholds in [0, 1]; the stability offset and the
            minimum region area >= 0; the crop overlap in [0, 1); grids of (N >= 1, 2) points in
            [0, 1]², one per crop layer; a known output mode.
    """
    if (points_per_side is None) == (point_grids is None):
        raise AmgSettingError(
            "points_per_side", "exactly one of points_per_side or point_grids must be given"
        )
    if points_per_side is not None:
        _integer("points_per_side", points_per_side, 1)
    _integer("points_per_batch", points_per_batch, 1)
    for name, value in (
        ("pred_iou_thresh", pred_iou_thresh),
        ("stability_score_thresh", stability_score_thresh),
        ("box_nms_thresh", box_nms_thresh),
        ("crop_nms_thresh", crop_nms_thresh),
    ):
        _number(name, value, 0.0, 1.0)
    _number("stability_score_offset", stability_score_offset, 0.0)
    _integer("crop_n_layers", crop_n_layers, 0)
    _number("crop_overlap_ratio", crop_overlap_ratio, 0.0, 1.0, open_high=True)
    _integer("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
    _number("min_mask_region_area", min_mask_region_area, 0.0)
    if point_grids is not None:
        if len(point_grids) < crop_n_layers + 1:
            raise AmgSettingError(
                "point_grids", f"needs {crop_n_layers + 1} grids (one per crop layer)"
            )
        for i, grid in enumerate(point_grids):
            grid = np.asarray(grid)
            if grid.ndim != 2 or grid.shape[0] < 1 or grid.shape[1] != 2:
                raise AmgSettingError("point_grids", f"grid {i} is {grid.shape}, expected (N, 2)")
            if not (np.isfinite(grid).all() and (grid >= 0).all() and (grid <= 1).all()):
                raise AmgSettingError("point_grids", f"grid {i} has points outside [0, 1]²")
    if output_mode not in OUTPUT_MODES:
        raise AmgSettingError(
            "output_mode", f"unknown mode {output_mode!r}; expected one of {OUTPUT_MODES}"
        )


# ---------------------------------------------------------------------------------------------
# The generator


class _CropMasks:
    """Masks kept from one crop, as aligned arrays (the reference's MaskData)."""

    def __init__(self, crop_box: list[int], input_size: tuple[int, int], crop_size):
        self.crop_box = crop_box
        self.input_size = input_size
        self.crop_size = crop_size
        self.boxes: list[np.ndarray] = []  # (4,) int64, crop frame
        self.iou: list[np.float32] = []
        self.stability: list[np.float32] = []
        self.points: list[np.ndarray] = []  # (2,) float64, crop frame
        self.mask_crops: list[np.ndarray] = []  # bool, the mask inside its box
        self.low_res: list[np.ndarray] = []  # (L, L) float32


class SamAutomaticMaskGenerator:
    """Generates masks for a whole image from a grid of point prompts (the official class)."""

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        task: int | None = None,
        keep_probabilities: bool = True,
    ) -> None:
        """
        Args:
            model: the SAM.
            points_per_side: grid points per side of the image (points_per_side² in total);
                exclusive with `point_grids`.
            points_per_batch: points decoded per call (the last batch is padded to this size).
            pred_iou_thresh: keep masks whose predicted IoU is > this (0 disables).
            stability_score_thresh: keep masks whose stability score is >= this (0 disables).
            stability_score_offset: logit offset of the stability score.
            box_nms_thresh: box IoU threshold of the NMS within a crop.
            crop_n_layers: extra crop layers; layer i has (2**i)² crops.
            crop_nms_thresh: box IoU threshold of the NMS between crops.
            crop_overlap_ratio: overlap of first-layer crops as a fraction of the short side.
            crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points.
            point_grids: explicit (N, 2) grids in [0, 1]², one per layer.
            min_mask_region_area: if > 0, remove holes and islands smaller than this.
            output_mode: "binary_mask", "uncompressed_rle" or "coco_rle".
            task: task-prompt id passed to the decoder (None: the model's default).
            keep_probabilities: add "probability", uint8 (H, W) round(255·sigmoid(logit)).

        Raises:
            AmgSettingError: (a `ValueError`) a setting out of range, see
                `check_generator_settings`.
        """
        check_generator_settings(
            points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
            stability_score_offset, box_nms_thresh, crop_n_layers, crop_nms_thresh,
            crop_overlap_ratio, crop_n_points_downscale_factor, point_grids,
            min_mask_region_area, output_mode,
        )  # fmt: skip
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [np.asarray(g, np.float64) for g in point_grids]
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.task = task
        self.keep_probabilities = keep_probabilities

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Generates masks for an image.

        Args:
            image: uint8 (H, W, 3) RGB.

        Returns:
            one record per mask, in the reference's order: "segmentation" ((H, W) bool or an
            RLE dict, per `output_mode`), "area" (int), "bbox" (XYWH ints), "predicted_iou",
            "point_coords" ([[x, y]]), "stability_score", "crop_box" (XYWH ints) and, with
            `keep_probabilities`, "probability" (uint8 (H, W)).
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        orig_h, orig_w = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            (orig_h, orig_w), self.crop_n_layers, self.crop_overlap_ratio
        )
        # A side shorter than a layer's crop count gives the reference empty crops (it fails on
        # them); they hold no pixel, so skipping them loses nothing.
        crops_kept = [i for i, (x0, y0, x1, y1) in enumerate(crop_boxes) if x1 > x0 and y1 > y0]
        crop_boxes = [crop_boxes[i] for i in crops_kept]
        layer_idxs = [layer_idxs[i] for i in crops_kept]
        crops = [
            self._process_crop(image, crop_box, layer_idx, (orig_h, orig_w))
            for crop_box, layer_idx in zip(crop_boxes, layer_idxs, strict=True)
        ]
        # Flat (crop index, index within crop) of every kept mask, in the reference's cat order.
        refs = [(c, i) for c, crop in enumerate(crops) for i in range(len(crop.iou))]
        boxes = np.asarray(
            [uncrop_boxes_xyxy(crops[c].boxes[i], crops[c].crop_box) for c, i in refs],
            dtype=np.int64,
        ).reshape(-1, 4)
        if len(crop_boxes) > 1:
            # Prefer masks from smaller crops: score 1 / crop area, as float32 like torch.
            areas = np.asarray(
                [(b[2] - b[0]) * (b[3] - b[1]) for b in (crops[c].crop_box for c, _ in refs)],
                dtype=np.float32,
            )
            keep = nms(boxes.astype(np.float32), np.float32(1) / areas, self.crop_nms_thresh)
            refs = [refs[k] for k in keep]
            boxes = boxes[keep]
        masks = [self._full_mask(crops[c], i, (orig_h, orig_w)) for c, i in refs]
        if self.min_mask_region_area > 0 and refs:
            nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
            keep, masks, boxes = self._postprocess_small_regions(masks, nms_thresh)
            refs = [refs[k] for k in keep]
        probabilities = self._probabilities(crops, refs, (orig_h, orig_w))
        records = []
        for k, (c, i) in enumerate(refs):
            crop = crops[c]
            mask = masks[k]
            if self.output_mode == "binary_mask":
                segmentation = mask
            elif self.output_mode == "uncompressed_rle":
                segmentation = mask_to_rle(mask)
            else:
                segmentation = mask_to_coco_rle(mask)
            record = {
                "segmentation": segmentation,
                "area": int(mask.sum()),
                "bbox": box_xyxy_to_xywh(boxes[k]).tolist(),
                "predicted_iou": float(crop.iou[i]),
                "point_coords": [uncrop_points(crop.points[i], crop.crop_box).tolist()],
                "stability_score": float(crop.stability[i]),
                "crop_box": box_xyxy_to_xywh(np.asarray(crop.crop_box)).tolist(),
            }
            if probabilities is not None:
                prob = probabilities[k]
                if self.min_mask_region_area > 0:
                    # Filled holes / removed islands: keep the soft value but put it on the
                    # mask's side of 0.5, so that prob > 127.5 is the segmentation everywhere.
                    prob = np.where(mask, np.maximum(prob, 128), np.minimum(prob, 127))
                record["probability"] = prob.astype(np.uint8)
            records.append(record)
        return records

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        crop_layer_idx: int,
        orig_size: tuple[int, int],
    ) -> _CropMasks:
        x0, y0, x1, y1 = crop_box
        cropped_im = image[y0:y1, x0:x1, :]
        crop_size = tuple(int(s) for s in cropped_im.shape[:2])
        self.predictor.set_image(cropped_im)
        input_size = tuple(int(s) for s in self.predictor.input_size)
        features = self.predictor.features
        graphdef, state = self.predictor._graphdef, self.predictor._state
        out = _CropMasks(crop_box, input_size, crop_size)

        points_scale = np.array(crop_size)[None, ::-1]
        points_for_image = self.point_grids[crop_layer_idx] * points_scale
        transformed = self.predictor.transform_coords(points_for_image)
        offset = jnp.float32(self.stability_score_offset)
        orig_box = [0, 0, orig_size[1], orig_size[0]]
        n, b = len(points_for_image), self.points_per_batch
        for start in range(0, n, b):
            stop = min(start + b, n)
            coords = np.zeros((b, 2), np.float32)
            coords[: stop - start] = transformed[start:stop]
            low_res, iou, stability, masks, boxes = _predict_points(
                graphdef, state, features, jnp.asarray(coords), offset, input_size, crop_size,
                self.task,
            )  # fmt: skip
            k = 3 * (stop - start)  # rows b * 3 + j, as the reference's flatten(0, 1)
            iou = np.asarray(iou).reshape(-1)[:k]
            stability = np.asarray(stability).reshape(-1)[:k]
            boxes = np.asarray(boxes).reshape(-1, 4)[:k].astype(np.int64)
            keep = np.ones(k, dtype=bool)
            if self.pred_iou_thresh > 0.0:
                keep &= iou > np.float32(self.pred_iou_thresh)
            if self.stability_score_thresh > 0.0:
                keep &= stability >= np.float32(self.stability_score_thresh)
            keep &= ~is_box_near_crop_edge(boxes, crop_box, orig_box)
            idx = np.flatnonzero(keep)
            if idx.size == 0:
                continue
            masks = np.asarray(masks).reshape(-1, *crop_size)
            low_res = np.asarray(low_res).reshape(-1, *low_res.shape[2:])
            points = np.repeat(points_for_image[start:stop], 3, axis=0)
            for j in idx:
                bx0, by0, bx1, by1 = boxes[j]
                out.boxes.append(boxes[j])
                out.iou.append(iou[j])
                out.stability.append(stability[j])
                out.points.append(points[j])
                out.mask_crops.append(masks[j, by0 : by1 + 1, bx0 : bx1 + 1].copy())
                out.low_res.append(low_res[j].copy())
        self.predictor.reset_image()

        # Remove duplicates within this crop.
        if out.iou:
            keep = nms(np.asarray(out.boxes, np.float32), np.asarray(out.iou), self.box_nms_thresh)
            for name in ("boxes", "iou", "stability", "points", "mask_crops", "low_res"):
                values = getattr(out, name)
                setattr(out, name, [values[k] for k in keep])
        return out

    @staticmethod
    def _full_mask(crop: _CropMasks, i: int, orig_size: tuple[int, int]) -> np.ndarray:
        """Mask i of a crop at the original image size."""
        mask = np.zeros(orig_size, dtype=bool)
        bx0, by0, _, _ = crop.boxes[i]
        piece = crop.mask_crops[i]
        y0, x0 = crop.crop_box[1] + by0, crop.crop_box[0] + bx0
        mask[y0 : y0 + piece.shape[0], x0 : x0 + piece.shape[1]] = piece
        return mask

    def _postprocess_small_regions(
        self, masks: list[np.ndarray], nms_thresh: float
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Removes small holes and islands, then reruns box NMS preferring unchanged masks.

        Returns:
            kept indices (by NMS order), their masks and their (recomputed) boxes.
        """
        new_masks, scores = [], []
        for mask in masks:
            mask, changed = remove_small_regions(mask, self.min_mask_region_area, mode="holes")
            unchanged = not changed
            mask, changed = remove_small_regions(mask, self.min_mask_region_area, mode="islands")
            new_masks.append(mask)
            scores.append(float(unchanged and not changed))
        boxes = np.stack([batched_mask_to_box(m) for m in new_masks]).astype(np.int64)
        keep = nms(boxes.astype(np.float32), np.asarray(scores, np.float32), nms_thresh)
        return keep, [new_masks[k] for k in keep], boxes[keep]

    def _probabilities(
        self, crops: list[_CropMasks], refs: list[tuple[int, int]], orig_size: tuple[int, int]
    ) -> list[np.ndarray] | None:
        """uint8 probability maps of the kept masks at the original size, in `refs` order."""
        if not self.keep_probabilities:
            return None
        graphdef, state = self.predictor._graphdef, self.predictor._state
        out: list[np.ndarray | None] = [None] * len(refs)
        b = self.points_per_batch
        for c, crop in enumerate(crops):
            rows = [k for k, (cc, _) in enumerate(refs) if cc == c]
            for start in range(0, len(rows), b):
                chunk = rows[start : start + b]
                low_res = np.zeros((b, *crop.low_res[0].shape), np.float32)
                low_res[: len(chunk)] = [crop.low_res[refs[k][1]] for k in chunk]
                prob = np.asarray(
                    _probabilities(
                        graphdef, state, jnp.asarray(low_res), crop.input_size, crop.crop_size
                    )
                )
                prob = uncrop_masks(prob[: len(chunk)], crop.crop_box, *orig_size)
                for k, p in zip(chunk, prob, strict=True):
                    out[k] = p
        return out
