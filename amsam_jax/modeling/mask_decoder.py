"""SAM mask decoder. Port of segment_anything/modeling/mask_decoder.py (Apache-2.0)."""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.modeling.common import ConvTranspose2x2, LayerNorm2d, gelu
from amsam_jax.modeling.prompt_encoder import Embedding
from amsam_jax.modeling.transformer import TwoWayTransformer


class MLP(nnx.Module):
    """Linear layers with ReLU in between (no activation after the last)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *, rngs: nnx.Rngs
    ):
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List(
            [nnx.Linear(n, k, rngs=rngs) for n, k in zip(dims_in, dims_out, strict=True)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class MaskDecoder(nnx.Module):
    """Predicts mask logits and IoU scores from image and prompt embeddings."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        *,
        rngs: nnx.Rngs,
    ):
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = Embedding(1, transformer_dim, rngs=rngs)
        self.mask_tokens = Embedding(self.num_mask_tokens, transformer_dim, rngs=rngs)
        # Torch Sequential indices 0 (ConvT), 1 (LayerNorm2d), 3 (ConvT); 2 and 4 are GELUs.
        self.output_upscaling = nnx.List(
            [
                ConvTranspose2x2(transformer_dim, transformer_dim // 4, rngs=rngs),
                LayerNorm2d(transformer_dim // 4, rngs=rngs),
                ConvTranspose2x2(transformer_dim // 4, transformer_dim // 8, rngs=rngs),
            ]
        )
        self.output_hypernetworks_mlps = nnx.List(
            [
                MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3, rngs=rngs)
                for _ in range(self.num_mask_tokens)
            ]
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, rngs=rngs
        )

    def upscale(self, src: Float[Array, "b g g c"]) -> Float[Array, "b l l c8"]:
        """ConvT, LayerNorm2d, GELU, ConvT, GELU (docs/fewshot.md §1.4): (B, 4G, 4G, C/8)."""
        x = gelu(self.output_upscaling[1](self.output_upscaling[0](src)))
        return gelu(self.output_upscaling[2](x))

    def predict_masks(
        self,
        image_embeddings: Float[Array, "bi g g c"],
        image_pe: Float[Array, "g g c"],
        sparse_prompt_embeddings: Float[Array, "b n c"],
        dense_prompt_embeddings: Float[Array, "b g g c"],
        fold_projections: bool = False,
    ) -> tuple[Float[Array, "b k l l"], Float[Array, "b k"], Float[Array, "b k c8"], jax.Array]:
        """Predicts all `num_mask_tokens` masks.

        Image b is paired with prompt row b; a single image embedding (Bi = 1) is shared by every
        prompt row, which is what the reference's `repeat_interleave` does for one image. When
        the dense embeddings are one row too (1, G, G, C) (no mask prompt, one task), the image
        side stays one row into the transformer, which projects it once for all prompts.
        `fold_projections`: see `TwoWayTransformer`.

        Returns:
            masks (B, K, 4G, 4G), iou predictions (B, K), hypernetwork outputs H (B, K, C/8) and
            upscaled embedding U (B, 4G, 4G, C/8) (H and U are the inputs of mask calibration).
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = jnp.concatenate(
            [self.iou_token.weight[...], self.mask_tokens.weight[...]], axis=0
        )
        output_tokens = jnp.broadcast_to(output_tokens[None], (b, *output_tokens.shape))
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings], axis=1)  # (B, T, C)
        src = image_embeddings + dense_prompt_embeddings  # (B or 1, G, G, C)
        if src.shape[0] != 1:
            src = jnp.broadcast_to(src, (b, *src.shape[1:]))
        _, h, w, c = src.shape

        hs, src = self.transformer(src, image_pe[None], tokens, fold_projections)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.upscale(src.reshape(b, h, w, c))  # (B, 4G, 4G, C/8)
        hyper_in = jnp.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            axis=1,
        )  # (B, K, C/8)
        masks = jnp.einsum("bkc,bhwc->bkhw", hyper_in, upscaled)  # (B, K, 4G, 4G)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred, hyper_in, upscaled

    def __call__(
        self,
        image_embeddings: Float[Array, "bi g g c"],
        image_pe: Float[Array, "g g c"],
        sparse_prompt_embeddings: Float[Array, "b n c"],
        dense_prompt_embeddings: Float[Array, "b g g c"],
        multimask_output: bool,
        fold_projections: bool = False,
    ) -> tuple[Float[Array, "b k l l"], Float[Array, "b k"]]:
        """SAM's output selection: masks 1.. when `multimask_output`, else mask 0."""
        masks, iou_pred, _, _ = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            fold_projections,
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]
