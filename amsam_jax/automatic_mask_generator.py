"""Automatic mask generation: SAM prompted by a grid of points, with filtering and NMS.

Port of segment_anything/automatic_mask_generator.py (Apache-2.0) on the Flax model. Same
arguments, same order of operations and the same output records; in addition each record can
carry SAM's soft probability map (docs/sum.md §2.2).

Deviations, all for speed or memory (none changes a result; docs/sum.md §2.2):
- point batches have a fixed size (the last one is padded) and are decoded to low-res logits only;
  the predicted-IoU filter runs on those, and only the candidates that pass it are upsampled (in
  fixed-size chunks, `amsam_jax/utils/upsample.py`, the same floats as `Sam.postprocess_masks`)
  and scored (stability, boxes) in a separate jitted call;
- only the low-res logits of kept masks are stored: the full-size masks and probability maps are
  recomputed by the same programs for the masks that survive NMS;
- the decoder gets the image as one row shared by the batch (its first-block projections are
  computed once), runs its cross-attentions folded (same sums, reassociated) and loops over
  cache-sized chunks of the batch (float32 rounding only);
- the crop size enters the compiled programs through size buckets, so images in one bucket
  compile nothing new.
"""

import math
import time
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
    uncrop_points,
)
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.nms import nms
from amsam_jax.utils.upsample import crop_taps, upsample_logits

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Wall seconds of the last `generate`, by stage (`SamAutomaticMaskGenerator.timings`); a stage's
# first call on a new shape includes its compile.
TIMING_KEYS = (
    "encoder_s",  # set_image, per crop
    "decoder_s",  # prompt encoder + mask decoder, per point batch
    "upsample_score_s",  # IoU-passing candidates to crop size, stability score and boxes
    "host_transfer_s",  # device -> host copies and the per-candidate filters
    "final_masks_s",  # the kept masks (and probabilities) at the original size
    "postprocess_s",  # NMS, small regions, the output records
    "total_s",
)

# ---------------------------------------------------------------------------------------------
# Jitted model calls


@partial(jax.jit, static_argnums=(0, 4))
def _decode_points(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    features: jax.Array,
    coords: jax.Array,
    task: int | None,
) -> tuple[jax.Array, jax.Array]:
    """One positive point per row -> three low-resolution masks per point and their scores.

    Args:
        features: (1, G, G, C) embedding of the crop, shared by every point.
        coords: (B, 2) points in the resized-input frame.
        task: the task-prompt id (docs/sum.md §4), or None for plain SAM; a static argument, so
            one id is one compile.

    Returns:
        low-res logits (B, 3, L, L) and predicted IoU (B, 3).
    """
    model = nnx.merge(graphdef, state)
    pe = model.prompt_encoder.get_dense_pe()
    b = coords.shape[0]
    n = _decode_chunk(features.shape, b)
    chunks = -(-b // n)
    coords = jnp.pad(coords, ((0, chunks * n - b), (0, 0)))

    def decode(chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
        labels = jnp.ones((n, 1), jnp.int32)
        sparse, dense = model.prompt_encoder((chunk[:, None, :], labels), None, None, task)
        # No mask prompt and one task: every row's dense embedding is the same, so one row goes
        # in and the image side of the first block is projected once (XLA hoists it out of the
        # loop); the cross-attentions run folded (docs/sum.md §2.2).
        return model.mask_decoder(features, pe, sparse, dense[:1], True, fold_projections=True)

    low_res, iou = jax.lax.map(decode, coords.reshape(chunks, n, 2))
    return low_res.reshape(-1, *low_res.shape[2:])[:b], iou.reshape(-1, iou.shape[-1])[:b]


# Prompts per decoder pass within a point batch: the batch runs as a loop over chunks whose
# largest activation (the upscaled embedding, 16·G²·C/8 floats per prompt) fits in 16 MiB, so it
# stays in the CPU cache (ViT-B: 2 prompts; about twice as fast as the 64 at once on 2 cores).
_DECODE_CHUNK_FLOATS = 2**22


def _decode_chunk(features_shape: tuple[int, ...], batch: int) -> int:
    """Prompts per decoder pass for (1, G, G, C) features and a point batch of `batch`."""
    _, g, _, c = features_shape
    return max(1, min(batch, _DECODE_CHUNK_FLOATS // (16 * g * g * max(1, c // 8))))


# The upsampling and the reductions over its output are separate programs on purpose (see
# amsam_jax/utils/upsample.py): fused, XLA on CPU makes them ~100x slower.
_upsample = jax.jit(upsample_logits, static_argnums=1)


@jax.jit
def _score(logits: jax.Array, threshold: jax.Array, offset: jax.Array):
    """(N, Hb, Wb) logits -> stability score (N,) and mask boxes (N, 4) int32."""
    stability = calculate_stability_score(logits, threshold, offset)
    return stability, batched_mask_to_box(logits > threshold)


@partial(jax.jit, static_argnums=2)
def _masks_and_probabilities(logits: jax.Array, threshold: jax.Array, probabilities: bool):
    """(N, Hb, Wb) logits -> bool masks and, if asked, uint8 round(255·sigmoid) maps.

    The probability is clamped to >= 128 where logit > threshold and <= 127 elsewhere, so that
    `prob > 127.5` reproduces the binary mask exactly (float32 rounding at logit ≈ 0 could
    otherwise disagree).
    """
    masks = logits > threshold
    if not probabilities:
        return masks, None
    prob = jnp.round(255.0 * jax.nn.sigmoid(logits))
    prob = jnp.where(masks, jnp.maximum(prob, 128), jnp.minimum(prob, 127))
    return masks, prob.astype(jnp.uint8)


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
    """Masks kept from one crop, as aligned arrays (the reference's MaskData).

    Only the low-resolution logits are stored; the full-resolution masks are recomputed from
    them for the masks that survive every filter and NMS.
    """

    def __init__(self, crop_box: list[int], input_size: tuple[int, int], crop_size):
        self.crop_box = crop_box
        self.input_size = input_size
        self.crop_size = crop_size
        self.taps = crop_taps(input_size, crop_size)  # padded to the crop size's bucket
        bucket = (len(self.taps["h"][0]), len(self.taps["w"][0]))
        self.chunk = _chunk_size(bucket)
        self.boxes: list[np.ndarray] = []  # (4,) int64, crop frame
        self.iou: list[np.float32] = []
        self.stability: list[np.float32] = []
        self.points: list[np.ndarray] = []  # (2,) float64, crop frame
        self.low_res: list[np.ndarray] = []  # (L, L) float32


# Upsampled logits per jitted call: at most this many float32 pixels (64 MiB), at most 64 masks.
_CHUNK_PIXELS = 2**24
_MAX_CHUNK = 64


def _chunk_size(bucket: tuple[int, int]) -> int:
    """Masks per upsampling call for a (Hb, Wb) bucket: a power of two in [1, 64]."""
    n = max(1, _CHUNK_PIXELS // (bucket[0] * bucket[1]))
    return min(_MAX_CHUNK, 1 << (n.bit_length() - 1))


def _stack_rows(rows: list[np.ndarray], n: int) -> np.ndarray:
    """(len(rows), L, L) float32 rows zero-padded to (n, L, L)."""
    out = np.zeros((n, *rows[0].shape), np.float32)
    out[: len(rows)] = rows
    return out


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
        self.timings = dict.fromkeys(TIMING_KEYS, 0.0)

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
        self.timings = dict.fromkeys(TIMING_KEYS, 0.0)
        start = time.perf_counter()
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
        masks, probabilities = self._final_masks(crops, refs, (orig_h, orig_w))
        if self.min_mask_region_area > 0 and refs:
            nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
            keep, masks, boxes = self._postprocess_small_regions(masks, nms_thresh)
            refs = [refs[k] for k in keep]
            if probabilities is not None:
                probabilities = [probabilities[k] for k in keep]
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
        total = time.perf_counter() - start
        measured = sum(v for key, v in self.timings.items() if key != "postprocess_s")
        self.timings["total_s"] = total
        self.timings["postprocess_s"] = max(0.0, total - measured)
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
        t = time.perf_counter()
        self.predictor.set_image(cropped_im)
        features = jax.block_until_ready(self.predictor.features)
        self._tick("encoder_s", t)
        input_size = tuple(int(s) for s in self.predictor.input_size)
        graphdef, state = self.predictor._graphdef, self.predictor._state
        out = _CropMasks(crop_box, input_size, crop_size)

        points_scale = np.array(crop_size)[None, ::-1]
        points_for_image = self.point_grids[crop_layer_idx] * points_scale
        transformed = self.predictor.transform_coords(points_for_image)
        orig_box = [0, 0, orig_size[1], orig_size[0]]
        # Candidates that passed the predicted-IoU filter, upsampled `out.chunk` at a time.
        pending: list[tuple[np.ndarray, np.float32, np.ndarray]] = []
        n, b = len(points_for_image), self.points_per_batch
        for start in range(0, n, b):
            stop = min(start + b, n)
            coords = np.zeros((b, 2), np.float32)
            coords[: stop - start] = transformed[start:stop]
            t = time.perf_counter()
            low_res, iou = jax.block_until_ready(
                _decode_points(graphdef, state, features, jnp.asarray(coords), self.task)
            )
            t = self._tick("decoder_s", t)
            k = 3 * (stop - start)  # rows b * 3 + j, as the reference's flatten(0, 1)
            iou = np.asarray(iou).reshape(-1)[:k]
            keep = np.ones(k, dtype=bool)
            if self.pred_iou_thresh > 0.0:
                keep &= iou > np.float32(self.pred_iou_thresh)
            idx = np.flatnonzero(keep)
            if idx.size:
                low_res = np.asarray(low_res).reshape(-1, *low_res.shape[2:])[idx]
                points = np.repeat(points_for_image[start:stop], 3, axis=0)[idx]
                pending += zip(low_res, iou[idx], points, strict=True)
            self._tick("host_transfer_s", t)
            while len(pending) >= out.chunk:
                self._score_candidates(out, pending[: out.chunk], orig_box)
                del pending[: out.chunk]
        if pending:
            self._score_candidates(out, pending, orig_box)
        self.predictor.reset_image()

        # Remove duplicates within this crop.
        if out.iou:
            keep = nms(np.asarray(out.boxes, np.float32), np.asarray(out.iou), self.box_nms_thresh)
            for name in ("boxes", "iou", "stability", "points", "low_res"):
                values = getattr(out, name)
                setattr(out, name, [values[k] for k in keep])
        return out

    def _score_candidates(
        self,
        out: _CropMasks,
        candidates: list[tuple[np.ndarray, np.float32, np.ndarray]],
        orig_box: list[int],
    ) -> None:
        """Stability filter and crop-edge filter of up to `out.chunk` candidates; keeps the rest.

        Args:
            candidates: (low-res logits (L, L), predicted IoU, point (2,)) per mask, in order.
        """
        t = time.perf_counter()
        rows = _stack_rows([c[0] for c in candidates], out.chunk)
        image_size = self.predictor.model.image_size
        logits = _upsample(jnp.asarray(rows), image_size, out.taps)
        stability, boxes = _score(
            logits,
            jnp.float32(self.predictor.model.mask_threshold),
            jnp.float32(self.stability_score_offset),
        )
        stability, boxes = jax.block_until_ready((stability, boxes))
        t = self._tick("upsample_score_s", t)
        m = len(candidates)
        stability = np.asarray(stability)[:m]
        boxes = np.asarray(boxes)[:m].astype(np.int64)
        keep = np.ones(m, dtype=bool)
        if self.stability_score_thresh > 0.0:
            keep &= stability >= np.float32(self.stability_score_thresh)
        keep &= ~is_box_near_crop_edge(boxes, out.crop_box, orig_box)
        for j in np.flatnonzero(keep):
            low_res, iou, point = candidates[j]
            out.boxes.append(boxes[j])
            out.iou.append(iou)
            out.stability.append(stability[j])
            out.points.append(point)
            out.low_res.append(low_res)
        self._tick("host_transfer_s", t)

    def _tick(self, key: str, start: float) -> float:
        """Adds the seconds since `start` to `self.timings[key]`; returns now."""
        now = time.perf_counter()
        self.timings[key] += now - start
        return now

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

    def _final_masks(
        self, crops: list[_CropMasks], refs: list[tuple[int, int]], orig_size: tuple[int, int]
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Masks (bool) and, with `keep_probabilities`, uint8 probability maps of the kept
        masks at the original size, in `refs` order.

        Recomputed from the stored low-res logits by the same jitted programs (same chunk size)
        that scored them, so each mask is bit for bit the one its box was measured on.
        """
        t = time.perf_counter()
        masks: list[np.ndarray | None] = [None] * len(refs)
        probs: list[np.ndarray | None] = [None] * len(refs)
        image_size = self.predictor.model.image_size
        threshold = jnp.float32(self.predictor.model.mask_threshold)
        orig_h, orig_w = orig_size
        for c, crop in enumerate(crops):
            rows = [k for k, (cc, _) in enumerate(refs) if cc == c]
            h, w = crop.crop_size
            x0, y0, x1, y1 = crop.crop_box
            for start in range(0, len(rows), crop.chunk):
                chunk = rows[start : start + crop.chunk]
                low_res = _stack_rows([crop.low_res[refs[k][1]] for k in chunk], crop.chunk)
                logits = _upsample(jnp.asarray(low_res), image_size, crop.taps)
                mask, prob = _masks_and_probabilities(logits, threshold, self.keep_probabilities)
                mask = np.asarray(mask)
                prob = None if prob is None else np.asarray(prob)
                for j, k in enumerate(chunk):
                    full = np.zeros(orig_size, dtype=bool)
                    full[y0:y1, x0:x1] = mask[j, :h, :w]
                    masks[k] = full
                    if prob is not None:
                        full = np.zeros(orig_size, dtype=np.uint8)
                        full[y0:y1, x0:x1] = prob[j, :h, :w]
                        probs[k] = full
        self._tick("final_masks_s", t)
        return masks, (probs if self.keep_probabilities else None)
