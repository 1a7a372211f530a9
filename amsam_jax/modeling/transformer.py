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
        """Multi-head attention; an input of batch 1 is shared by every row (projected once)."""
        q = rearrange(self.q_proj(q), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(k), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.v_proj(v), "b n (h d) -> b h n d", h=self.num_heads)
        attn = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        attn = jax.nn.softmax(attn, axis=-1)
        out = rearrange(jnp.einsum("bhqk,bhkd->bhqd", attn, v), "b h n d -> b n (h d)")
        return self.out_proj(out)

    # Folded forms (docs/sum.md §2.2). The image side has HW rows (4096) and the token side a
    # few (n ~ 7): projecting the image side costs C·(C/r) per image row, moving the projection
    # onto the tokens h·n·C. Both are the sums of `__call__`, reassociated (float32 rounding only).

    def _foldable(self, n_tokens: int, *projections: nnx.Module) -> bool:
        """Folding saves work (h·n < C/r) and the projections are plain `nnx.Linear` (the weight
        of a LoRA wrapper is not its kernel)."""
        plain = all(type(p) is nnx.Linear and p.bias is not None for p in projections)
        return plain and self.num_heads * n_tokens < self.internal_dim

    def _heads(self, projection: nnx.Module, x: jax.Array) -> Float[Array, "b n h d"]:
        y = projection(x)
        return y.reshape(*y.shape[:-1], self.num_heads, -1)

    def _split(self, projection: nnx.Linear) -> tuple[Float[Array, "c h d"], Float[Array, "h d"]]:
        """Kernel (C, h, d) and bias (h, d) of a projection into the heads."""
        kernel = projection.kernel[...]
        bias = projection.bias[...]
        return kernel.reshape(kernel.shape[0], self.num_heads, -1), bias.reshape(self.num_heads, -1)

    def token_to_image(
        self, q: Float[Array, "b n c"], k: Float[Array, "bk m c"], v: Float[Array, "bk m c"]
    ) -> Float[Array, "b n c"]:
        """`__call__` for few token queries and many image keys, without projecting the keys.

        A shared image side (batch 1) is projected once (`__call__`). Otherwise k_proj moves onto
        the queries, q·(x Wk + bk) = (q Wkᵀ)·x + q·bk, and v_proj after the attention, whose rows
        sum to 1: a·(x Wv + bv) = (a·x) Wv + bv.
        """
        shared = k.shape[0] == 1 and v.shape[0] == 1
        if shared or not self._foldable(q.shape[1], self.k_proj, self.v_proj):
            return self(q, k, v)
        qh = self._heads(self.q_proj, q)  # (B, n, h, d)
        wk, bk = self._split(self.k_proj)
        wv, bv = self._split(self.v_proj)
        qk = jnp.einsum("bnhd,chd->bhnc", qh, wk)
        logits = jnp.einsum("bhnc,bmc->bhnm", qk, k)
        logits = logits + jnp.einsum("bnhd,hd->bhn", qh, bk)[..., None]
        attn = jax.nn.softmax(logits / math.sqrt(qh.shape[-1]), axis=-1)
        out = jnp.einsum("bhnc,chd->bnhd", jnp.einsum("bhnm,bmc->bhnc", attn, v), wv) + bv
        return self.out_proj(out.reshape(*out.shape[:2], -1))

    def image_to_token(
        self, q: Float[Array, "bq m c"], k: Float[Array, "b n c"], v: Float[Array, "b n c"]
    ) -> Float[Array, "b m c"]:
        """`__call__` for many image queries and few token keys, without projecting the image
        queries (a shared image side, batch 1, is projected once) or the image-side output.

        q_proj moves onto the keys, (x Wq + bq)·k = x·(Wq kᵀ) + bq·k, and out_proj onto the
        values: Σ_h a_h (v_h Wo_h) + bo.
        """
        shared = q.shape[0] == 1
        projections = (self.out_proj,) if shared else (self.q_proj, self.out_proj)
        if not self._foldable(k.shape[1], *projections):
            return self(q, k, v)
        kh = self._heads(self.k_proj, k)  # (B, n, h, d)
        vh = self._heads(self.v_proj, v)
        if shared:
            logits = jnp.einsum("bmhd,bnhd->bmhn", self._heads(self.q_proj, q), kh)
        else:
            wq, bq = self._split(self.q_proj)
            logits = jnp.einsum("bmc,bchn->bmhn", q, jnp.einsum("chd,bnhd->bchn", wq, kh))
            logits = logits + jnp.einsum("hd,bnhd->bhn", bq, kh)[:, None]
        attn = jax.nn.softmax(logits / math.sqrt(kh.shape[-1]), axis=-1)  # (B, m, h, n)
        wo = self.out_proj.kernel[...].reshape(self.num_heads, kh.shape[-1], -1)  # (h, d, C)
        vo = jnp.einsum("bnhd,hdc->bhnc", vh, wo)
        return jnp.einsum("bmhn,bhnc->bmc", attn, vo) + self.out_proj.bias[...]


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
        fold_projections: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Keys (and key_pe) of batch 1 are one image shared by every prompt row.

        `fold_projections`: the cross-attentions in their folded forms
        (`Attention.token_to_image`, `Attention.image_to_token`; same sums, fewer flops).
        """
        to_image, from_image = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if fold_projections:
            to_image, from_image = to_image.token_to_image, from_image.image_to_token
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # no residual, as the reference
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + from_image(k, q, queries))
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
        fold_projections: bool = False,
    ) -> tuple[Float[Array, "b n c"], Float[Array, "b hw c"]]:
        """Runs the two-way transformer.

        Args:
            image_embedding: (B, H, W, C) image embedding plus dense prompt, or (1, H, W, C)
                shared by every prompt row (its projections in the first block are then
                computed once).
            image_pe: (B or 1, H, W, C) positional encoding of the image grid.
            point_embedding: (B, N, C) output and prompt tokens.
            fold_projections: the cross-attentions in their folded forms (same sums, fewer
                flops when the tokens are few; docs/sum.md §2.2).

        Returns:
            processed tokens (B, N, C) and image tokens (B, H * W, C).
        """
        b, h, w, c = image_embedding.shape
        keys = image_embedding.reshape(b, h * w, c)  # (B, HW, C)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)  # (B, HW, C)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, fold_projections)
        q = queries + point_embedding
        k = keys + key_pe
        final = self.final_attn_token_to_image
        attn = final.token_to_image(q, k, keys) if fold_projections else final(q, k, keys)
        queries = self.norm_final_attn(queries + attn)
        keys = jnp.broadcast_to(keys, (queries.shape[0], *keys.shape[1:]))
        return queries, keys
