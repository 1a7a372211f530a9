"""SamPredictor: the official interactive-prediction API on the Flax model.

Port of segment_anything/predictor.py (Apache-2.0). Same arguments, shapes and semantics, except
that `get_image_embedding` returns channels-last (1, G, G, C) like the rest of amsam_jax.

A model converted from LiteMedSAM (`SamConfig.preprocess == "medsam"`) is fed as upstream
LiteMedSAM feeds it (docs/fewshot.md §1.6): the longest side resized with OpenCV's area
interpolation, the resized image min-max scaled to [0, 1], zero padding; a box is scaled by
S / max(H, W) and truncated to integers, points by S / max(H, W).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.modeling.prompt_encoder import task_id
from amsam_jax.modeling.sam import Sam
from amsam_jax.utils.resize import resize_area_uint8
from amsam_jax.utils.transforms import ResizeLongestSide


@partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, image: jax.Array, input_hw: jax.Array):
    """Normalises, zero-pads outside the valid (h, w) region and encodes one (1, S, S, 3) image.

    The valid size is a traced value, so every image size shares one compiled function.
    """
    model = nnx.merge(graphdef, state)
    s = image.shape[1]
    x = (image - model.pixel_mean[...]) / model.pixel_std[...]
    valid = (jnp.arange(s)[:, None] < input_hw[0]) & (jnp.arange(s)[None, :] < input_hw[1])
    x = jnp.where(valid[None, :, :, None], x, 0.0)  # the reference pads after normalising
    return model.image_encoder(x)


@partial(jax.jit, static_argnums=0)
def _encode_prepared(graphdef: nnx.GraphDef, state: nnx.State, image: jax.Array):
    """Encodes one (1, S, S, 3) model input that is already normalised and padded."""
    return nnx.merge(graphdef, state).image_encoder(image)


def model_input(
    image: np.ndarray, size: int, preprocess: str, pixel_mean, pixel_std
) -> tuple[np.ndarray, tuple[int, int]]:
    """A uint8 image as the model's (S, S, 3) float32 input, and the valid (h, w).

    "sam": the longest side resized with PIL bilinear, (x - mean) / std, zero padding (as
    segment_anything's predictor); "medsam": `medsam_input`.
    """
    if preprocess == "medsam":
        return medsam_input(image, size)
    resized = ResizeLongestSide(size).apply_image(image)
    h, w = resized.shape[:2]
    out = np.zeros((size, size, 3), np.float32)
    mean, std = np.asarray(pixel_mean, np.float32), np.asarray(pixel_std, np.float32)
    out[:h, :w] = (resized.astype(np.float32) - mean) / std
    return out, (h, w)


def medsam_input(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """LiteMedSAM's upstream input: area-resized longest side, min-max to [0, 1], zero padding.

    Args:
        image: uint8 (H, W, 3).
        size: the model input side S.

    Returns:
        float32 (S, S, 3) and the valid (h, w).
    """
    h, w = ResizeLongestSide.get_preprocess_shape(image.shape[0], image.shape[1], size)
    resized = resize_area_uint8(image, (h, w))
    lo, hi = resized.min(), resized.max()
    # Upstream: (img - img.min()) / np.clip(img.max() - img.min(), 1e-8, None), in float64.
    scaled = (resized - lo) / np.clip(float(hi) - float(lo), 1e-8, None)
    out = np.zeros((size, size, 3), np.float32)
    out[:h, :w] = scaled
    return out, (h, w)


@partial(jax.jit, static_argnums=(0, 7))
def _decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    features: jax.Array,
    coords: jax.Array | None,
    labels: jax.Array | None,
    boxes: jax.Array | None,
    mask_input: jax.Array | None,
    multimask_output: bool,
    task: jax.Array | None = None,
):
    model = nnx.merge(graphdef, state)
    points = (coords, labels) if coords is not None else None
    sparse, dense = model.prompt_encoder(points, boxes, mask_input, task)
    return model.mask_decoder(
        features, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
    )


class SamPredictor:
    """Computes an image embedding once, then predicts masks for any number of prompts."""

    def __init__(self, sam_model: Sam):
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_size)
        self._graphdef, self._state = nnx.split(sam_model)
        self.reset_image()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embeds an image.

        Args:
            image: uint8 (H, W, 3) in `image_format` ("RGB" or "BGR").
            image_format: channel order of `image`.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        if image_format == "BGR":
            image = image[..., ::-1]
        image = np.ascontiguousarray(image)
        self.reset_image()
        s = self.model.image_size
        self.original_size = image.shape[:2]
        if self.model.preprocess_mode == "medsam":
            model_input, self.input_size = medsam_input(image, s)
            self.features = _encode_prepared(
                self._graphdef, self._state, jnp.asarray(model_input[None])
            )
        else:
            input_image = self.transform.apply_image(image)
            self.input_size = input_image.shape[:2]
            padded = np.zeros((1, s, s, 3), np.float32)
            padded[0, : self.input_size[0], : self.input_size[1]] = input_image
            self.features = _encode(
                self._graphdef, self._state, jnp.asarray(padded), jnp.asarray(self.input_size)
            )
        self.is_image_set = True

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        task: int | str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicts masks for prompts on the current image.

        Args:
            point_coords: (N, 2) (x, y) in original-image pixels.
            point_labels: (N,) 1 foreground, 0 background.
            box: (4,) x0, y0, x1, y1 in original-image pixels.
            mask_input: (1, 4G, 4G) low-resolution logits from a previous prediction.
            multimask_output: three masks (True) or one.
            return_logits: return logits instead of thresholded masks.
            task: SUM task prompt, a name (`unspecified|salient|entity|part`) or id 0-3. None
                (the default) is plain SAM; with an untrained task table every task gives the
                same output.

        Returns:
            masks (K, H, W) bool (float32 logits with `return_logits`), iou_predictions (K,) and
            low_res_logits (K, 4G, 4G).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords = labels = boxes = mask = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied.")
            point_coords = np.asarray(point_coords)
            point_labels = np.asarray(point_labels)
            if point_coords.ndim != 2 or point_coords.shape[1] != 2:
                raise ValueError(f"point_coords must be (N, 2), got {point_coords.shape}")
            if point_labels.shape != point_coords.shape[:1]:
                raise ValueError(f"point_labels must be ({len(point_coords)},)")
            coords = self.transform_coords(point_coords)
            coords = jnp.asarray(coords[None], jnp.float32)  # (1, N, 2)
            labels = jnp.asarray(point_labels[None], jnp.int32)  # (1, N)
        if box is not None:
            box = np.asarray(box, dtype=np.float64).reshape(-1)
            if box.shape != (4,):
                raise ValueError(f"box must have 4 values, got {box.size}")
            boxes = jnp.asarray(self._box(box), jnp.float32)
        if mask_input is not None:
            g4 = self.model.prompt_encoder.mask_input_size
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.shape != (1, *g4):
                raise ValueError(
                    f"mask_input must be (1, {g4[0]}, {g4[1]}), got {mask_input.shape}"
                )
            mask = jnp.asarray(mask_input[..., None])  # (1, 4G, 4G, 1)
        tid = task_id(task)
        low_res, iou = _decode(
            self._graphdef,
            self._state,
            self.features,
            coords,
            labels,
            boxes,
            mask,
            multimask_output,
            None if tid is None else jnp.asarray(tid, jnp.int32),
        )
        low_res = np.asarray(low_res)
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks[0], np.asarray(iou)[0], low_res[0]

    def transform_coords(self, coords: np.ndarray) -> np.ndarray:
        """(..., 2) points of the current image in the model input frame."""
        if self.model.preprocess_mode == "medsam":
            return np.asarray(coords, np.float64) * (
                self.model.image_size / max(self.original_size)
            )
        return self.transform.apply_coords(coords, self.original_size)

    def _box(self, box: np.ndarray) -> np.ndarray:
        """(4,) original-image box -> (1, 4) in the model input frame."""
        if self.model.preprocess_mode == "medsam":  # upstream: int(box * 256 / max(H, W))
            scaled = np.asarray(box, np.float64) * (self.model.image_size / max(self.original_size))
            return np.trunc(scaled).reshape(1, 4)
        return self.transform.apply_boxes(box, self.original_size)

    def get_image_embedding(self) -> jax.Array:
        """The current image's embedding, channels-last (1, G, G, C)."""
        if not self.is_image_set:
            raise RuntimeError(
                "An image must be set with .set_image(...) to generate an embedding."
            )
        return self.features

    def reset_image(self) -> None:
        """Forgets the current image."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
