"""The SAM model: encoder, prompt encoder, mask decoder. Port of segment_anything/modeling/sam.py
(Apache-2.0)."""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.modeling.common import Buffer, resize_bilinear
from amsam_jax.modeling.image_encoder import ImageEncoderViT
from amsam_jax.modeling.mask_decoder import MaskDecoder
from amsam_jax.modeling.prompt_encoder import PromptEncoder
from amsam_jax.modeling.tiny_vit import TinyViT

# How images enter the model (SamConfig.preprocess): SAM's mean/std, or LiteMedSAM's min-max.
PREPROCESSING = ("sam", "medsam")


class Sam(nnx.Module):
    """Segment Anything: channels-last, images (B, H, W, 3), masks (B, K, H, W)."""

    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: ImageEncoderViT | TinyViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
        preprocess: str = "sam",
    ):
        if preprocess not in PREPROCESSING:
            raise ValueError(f"preprocess must be one of {PREPROCESSING}, got {preprocess!r}")
        self.preprocess_mode = preprocess
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.pixel_mean = Buffer(jnp.asarray(pixel_mean, jnp.float32))
        self.pixel_std = Buffer(jnp.asarray(pixel_std, jnp.float32))

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, x: Float[Array, "b h w 3"]) -> Float[Array, "b s s 3"]:
        """Normalises pixel values and zero-pads bottom/right to the square model input."""
        x = (x - self.pixel_mean[...]) / self.pixel_std[...]
        h, w = x.shape[1:3]
        s = self.image_size
        return jnp.pad(x, ((0, 0), (0, s - h), (0, s - w), (0, 0)))

    def postprocess_masks(
        self,
        masks: Float[Array, "b k l l"],
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Float[Array, "b k h w"]:
        """Upscales low-res logits to the model input, removes padding, resizes to the original.

        Args:
            masks: (B, K, 4G, 4G) low-resolution logits.
            input_size: (h, w) of the resized image before padding.
            original_size: (H, W) of the original image.

        Returns:
            (B, K, H, W) logits.
        """
        s = self.image_size
        masks = resize_bilinear(masks, (s, s), axes=(2, 3))
        masks = masks[..., : input_size[0], : input_size[1]]
        return resize_bilinear(masks, original_size, axes=(2, 3))

    def __call__(
        self,
        images: Float[Array, "b h w 3"],
        points: tuple[jax.Array, jax.Array] | None = None,
        boxes: Float[Array, "b 4"] | None = None,
        mask_inputs: Float[Array, "b l l 1"] | None = None,
        multimask_output: bool = True,
        task: jax.Array | int | None = None,
    ) -> tuple[Float[Array, "b k l l"], Float[Array, "b k"]]:
        """Encodes preprocessed images and decodes one prompt set per image.

        Args:
            images: (B, S, S, 3) already preprocessed (`preprocess`).
            points: optional (coords (B, N, 2), labels (B, N)) in input-frame pixels.
            boxes: optional (B, 4) in input-frame pixels.
            mask_inputs: optional (B, 4G, 4G, 1) logits.
            multimask_output: SAM's output selection.
            task: optional SUM task id (scalar or (B,)); None is plain SAM.

        Returns:
            low-res logits (B, K, 4G, 4G) and IoU predictions (B, K).
        """
        embeddings = self.image_encoder(images)
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs, task)
        return self.mask_decoder(
            embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
        )
