"""Two-way transformer of the SAM mask decoder.

Port of segment_anything/modeling/transformer.py (Apache-2.0).
"""

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.modeling.common import MLPBlock, layer_norm


class Attention(nnx.Module):
    """Attention with an optional downscaled internal width (q/k/v projections 256 -> 256 / r)."""

    def __init__(
        self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, *, rngs: nnx.Rngs
    ):
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate.")
        self.q_proj = nnx.Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.k_proj = nnx.Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.v_proj = nnx.Linear(embedding_dim, self.internal_dim, rngs=rngs)
        self.out_proj = nnx.Linear(self.internal_dim, embedding_dim, rngs=rngs)

    def __call__(
        self, q: Float[Array, "b nq c"], k: Float[Array, "b nk c"], v: Float[Array, "b nk c"]
    ) -> Float[Array, "b nq c"]:
        q = rearrange(self.q_proj(q), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(k), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.v_proj(v), "b n (h d) -> b h n d", h=self.num_heads)
        attn = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        attn = jax.nn.softmax(attn, axis=-1)
        out = rearrange(jnp.einsum("bhqk,bhkd->bhqd", attn, v), "b h n d -> b n (h d)")
        return self.out_proj(out)


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token->image, MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        # LayerNorm eps 1e-5: the reference uses torch's nn.LayerNorm default here.
        self.self_attn = Attention(embedding_dim, num_heads, rngs=rngs)
        self.norm1 = layer_norm(embedding_dim, epsilon=1e-5, rngs=rngs)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate, rngs=rngs
        )
        self.norm2 = layer_norm(embedding_dim, epsilon=1e-5, rngs=rngs)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, jax.nn.relu, rngs=rngs)
        self.norm3 = layer_norm(embedding_dim, epsilon=1e-5, rngs=rngs)
        self.norm4 = layer_norm(embedding_dim, epsilon=1e-5, rngs=rngs)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate, rngs=rngs
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self,
        queries: jax.Array,
        keys: jax.Array,
        query_pe: jax.Array,
        key_pe: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # no residual, as the reference
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """Decoder transformer attending between prompt tokens and image tokens."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        *,
        rngs: nnx.Rngs,
    ):
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(
                    embedding_dim,
                    num_heads,
                    mlp_dim,
                    attention_downsample_rate,
                    skip_first_layer_pe=(i == 0),
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate, rngs=rngs
        )
        self.norm_final_attn = layer_norm(embedding_dim, epsilon=1e-5, rngs=rngs)

    def __call__(
        self,
        image_embedding: Float[Array, "b h w c"],
        image_pe: Float[Array, "b h w c"],
        point_embedding: Float[Array, "b n c"],
    ) -> tuple[Float[Array, "b n c"], Float[Array, "b hw c"]]:
        """Runs the two-way transformer.

        Args:
            image_embedding: (B, H, W, C) image embedding plus dense prompt.
            image_pe: (B, H, W, C) positional encoding of the image grid.
            point_embedding: (B, N, C) output and prompt tokens.

        Returns:
            processed tokens (B, N, C) and image tokens (B, H * W, C).
        """
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)  # (B, HW, C)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)  # (B, HW, C)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
