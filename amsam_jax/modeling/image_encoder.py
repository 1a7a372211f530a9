"""ViT image encoder of SAM. Port of segment_anything/modeling/image_encoder.py (Apache-2.0)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.modeling.common import LayerNorm2d, MLPBlock, gelu, layer_norm

# Logits per attention step, in bytes (float32). Attention runs head-major, on a few (grid, head)
# pairs at a time: all heads of a window (or of several), or at 1024 px one head of a global block
# and 4 of its 64 rows of queries. A step's logits (4096 queries x 4096 keys x 12 heads, 0.8 GB, for
# a whole global block) then stay near the cache; exact, since the softmax is per query row.
# docs/fewshot.md §1.7 has the measurements and the formulations that lost.
LOGITS_BYTES = 4 * 2**20
# A windowed block attends only from its real tokens' queries when the padding holds at least
# this share of its padded grid (docs/fewshot.md §1.7): at 256 px (16x16 padded to 28x28, 67 %)
# the ViT-B encoder ran 24 % faster and compiled 0.5 s longer; at 1024 px (64x64 in 70x70, 16 %)
# it ran 2-4 % faster but compiled 1 s longer, so there all queries are kept.
TRIM_PADDED_QUERIES = 0.25


def window_partition(
    x: jax.Array, window_size: int, pad_value: jax.Array | None = None
) -> tuple[jax.Array, tuple[int, int]]:
    """Pads bottom/right to a multiple of the window and cuts windows.

    Args:
        x: (B, H, W, C).
        window_size: side of a square window.
        pad_value: (C,) value of the padded positions; zeros by default, as in the reference.

    Returns:
        windows (B * nH * nW, window, window, C) and the padded size (Hp, Wp).
    """
    _, h, w, _ = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        if pad_value is not None:
            rows = jnp.arange(h + pad_h)[:, None, None] >= h
            cols = jnp.arange(w + pad_w)[None, :, None] >= w
            x = jnp.where(rows | cols, pad_value.astype(x.dtype), x)
    hp, wp = h + pad_h, w + pad_w
    windows = rearrange(x, "b (nh p) (nw q) c -> (b nh nw) p q c", p=window_size, q=window_size)
    return windows, (hp, wp)


def window_unpartition(
    windows: jax.Array, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> jax.Array:
    """Inverse of `window_partition`: stitches windows and crops the padding.

    Args:
        windows: (B * nH * nW, window, window, C).
        window_size: side of a square window.
        pad_hw: padded size (Hp, Wp).
        hw: original size (H, W).

    Returns:
        (B, H, W, C).
    """
    hp, wp = pad_hw
    h, w = hw
    x = rearrange(
        windows, "(b nh nw) p q c -> b (nh p) (nw q) c", nh=hp // window_size, nw=wp // window_size
    )
    return x[:, :h, :w, :]


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative positional embeddings gathered for every (query, key) pair.

    Args:
        q_size: query side length.
        k_size: key side length.
        rel_pos: table (2 * max(q_size, k_size) - 1, C). Tables are resized at load time
            (docs/fewshot.md §2.3), so a mismatching length is an error here rather than a
            silent resize.

    Returns:
        (q_size, k_size, C).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        raise ValueError(f"rel_pos table has length {rel_pos.shape[0]}, expected {max_rel_dist}")
    q_coords = jnp.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = jnp.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.astype(jnp.int32)]


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is <= `at_most` (at least 1)."""
    return next(d for d in range(max(1, min(n, at_most)), 0, -1) if n % d == 0)


def attention_steps(pairs: int, h: int, w: int, keys: int | None = None) -> tuple[int, int]:
    """How attention over `pairs` (grid, head) pairs of an (h, w) grid of queries is cut into steps.

    Args:
        pairs: (grid, head) pairs.
        h, w: the grid of queries.
        keys: keys per pair (default h * w: every query's own grid).

    Returns:
        (pairs per step, grid rows of queries per step): whole grids of as many pairs as fit in
        `LOGITS_BYTES` of logits, or one pair and as many rows as fit when one grid does not.
    """
    row_bytes = 4 * w * (h * w if keys is None else keys)  # float32 logits of one row of queries
    if h * row_bytes <= LOGITS_BYTES:
        return largest_divisor(pairs, LOGITS_BYTES // (h * row_bytes)), h
    return 1, largest_divisor(h, LOGITS_BYTES // row_bytes)


def window_groups(n: int, window: int) -> list[tuple[int, int, int]]:
    """The windows along a side of `n` tokens, in runs of equally many real tokens.

    Returns:
        (first window, windows, real tokens per window) of the full windows, then of the last
        window if the padding cuts it (at most two runs).
    """
    full, rest = divmod(n, window)
    return ([(0, full, window)] if full else []) + ([(full, 1, rest)] if rest else [])


def attend_step(
    q: jax.Array, term_h: jax.Array, term_w: jax.Array, k_t: jax.Array, v: jax.Array
) -> jax.Array:
    """Attention of some query rows of a few (grid, head) pairs to all their keys.

    Args:
        q: (P, R, W, D) scaled queries of R grid rows.
        term_h: (P, R, W, kH) row terms <q, Rh[i_h, j_h]> of the unscaled queries.
        term_w: (P, R, W, kW) column terms <q, Rw[i_w, j_w]>.
        k_t: (P, D, kH * kW) keys, transposed.
        v: (P, kH * kW, D) values.

    Returns:
        (P, R, W, D).
    """
    p, r, w, _ = q.shape
    kh, kw = term_h.shape[-1], term_w.shape[-1]
    logits = jnp.einsum("prwd,pdk->prwk", q, k_t)
    logits = logits.reshape(p, r, w, kh, kw) + term_h[..., :, None] + term_w[..., None, :]
    logits = logits.reshape(p, r, w, kh * kw).astype(jnp.float32)
    # Softmax with the normalisation moved after the value product: one pass less over the
    # logits (which are far larger than the output); differs from softmax-then-matmul by rounding.
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("prwk,pkd->prwd", weights.astype(v.dtype), v)
    return out / jnp.sum(weights, axis=-1, keepdims=True).astype(v.dtype)


class Attention(nnx.Module):
    """Multi-head attention with decomposed relative position terms.

    With `window_size > 0` the attention runs inside zero-padded windows (the block's windowed
    attention). The projections run on the unpadded grid: a padded token is zero after norm1, so
    its qkv is exactly the qkv bias, and its output is cropped anyway. Padding qkv with the bias
    therefore gives the reference's values while projecting 16x16 instead of 28x28 tokens at 256 px
    (64x64 instead of 70x70 at 1024 px). For the same reason a padded token's query is never
    attended from: its key and value still take part, as in the reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_size: tuple[int, int],
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nnx.Linear(dim, dim * 3, use_bias=True, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, head_dim), jnp.float32))
        self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, head_dim), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: Float[Array, "b h w c"], window_size: int = 0) -> Float[Array, "b h w c"]:
        h, w = x.shape[1], x.shape[2]
        qkv = self.qkv(x)  # (B, H, W, 3C)
        if window_size == 0:
            return self.proj(self.attend(qkv))
        windows, (hp, wp) = window_partition(qkv, window_size, pad_value=self.qkv.bias[...])
        if 1 - (h * w) / (hp * wp) < TRIM_PADDED_QUERIES:
            out = self.attend(windows)  # (B * nWindows, window, window, C)
            return self.proj(window_unpartition(out, window_size, (hp, wp), (h, w)))
        grid = rearrange(
            windows, "(b nh nw) p q c -> b nh nw p q c", nh=hp // window_size, nw=wp // window_size
        )
        # Every key of a window takes part, padded or not, but only the real tokens' queries are
        # kept: windows are attended in runs of equally many real query rows and columns (the
        # full windows, those the padding cuts at the bottom or right, the corner), and their
        # outputs are stitched into the unpadded grid. At 256 px this attends 256 of the 784
        # padded queries of a windowed block.
        rows = []
        for r0, nr, real_rows in window_groups(h, window_size):
            cols = []
            for c0, nc, real_cols in window_groups(w, window_size):
                part = grid[:, r0 : r0 + nr, c0 : c0 + nc]
                part = rearrange(part, "b i j p q c -> (b i j) p q c")
                out = self.attend(part, queries=(real_rows, real_cols))
                cols.append(rearrange(out, "(b i j) p q c -> b (i p) (j q) c", i=nr, j=nc))
            rows.append(jnp.concatenate(cols, axis=2) if len(cols) > 1 else cols[0])
        return self.proj(jnp.concatenate(rows, axis=1) if len(rows) > 1 else rows[0])

    def attend(
        self, qkv: Float[Array, "b h w c3"], queries: tuple[int, int] | None = None
    ) -> Float[Array, "b qh qw c"]:
        """Multi-head attention over the whole (H, W) grid of each `qkv`.

        Runs head-major, in the steps of `attention_steps` (docs/fewshot.md §1.7).

        Args:
            qkv: (B, H, W, 3C) queries, keys and values of B grids.
            queries: (qH, qW): attend from the queries of the first qH rows and qW columns of
                each grid only (default: all); every key takes part.

        Returns:
            (B, qH, qW, C).
        """
        b, h, w, _ = qkv.shape
        qh, qw = (h, w) if queries is None else queries
        n = self.num_heads
        q, k, v = rearrange(qkv, "b h w (t n d) -> t (b n) h w d", t=3, n=n)
        q = q[:, :qh, :qw]
        rel_h = get_rel_pos(h, h, self.rel_pos_h[...])[:qh].astype(self.dtype)  # (qH, kH, D)
        rel_w = get_rel_pos(w, w, self.rel_pos_w[...])[:qw].astype(self.dtype)  # (qW, kW, D)
        # The relative terms use the unscaled query, as in the reference; they are small
        # ((B n, qH, qW, kH) against the (B n, qH, qW, kH kW) logits), so they are computed once.
        term_h = jnp.einsum("ghwd,hkd->ghwk", q, rel_h)
        term_w = jnp.einsum("ghwd,wkd->ghwk", q, rel_w)
        q = q * jnp.asarray(self.scale, q.dtype)
        k_t = rearrange(k, "g h w d -> g d (h w)")
        v = rearrange(v, "g h w d -> g (h w) d")
        pairs, rows = attention_steps(b * n, qh, qw, keys=h * w)

        def attend_pairs(q, term_h, term_w, k_t, v):  # `pairs` pairs, all rows
            if rows == qh:
                return attend_step(q, term_h, term_w, k_t, v)
            chunks = [rearrange(x, "p (c r) w k -> c p r w k", r=rows) for x in (q, term_h, term_w)]
            out = jax.lax.map(lambda c: attend_step(*c, k_t, v), chunks)
            return rearrange(out, "c p r w d -> p (c r) w d")

        if pairs == b * n:
            out = attend_pairs(q, term_h, term_w, k_t, v)
        else:
            groups = [x.reshape(-1, pairs, *x.shape[1:]) for x in (q, term_h, term_w, k_t, v)]
            out = jax.lax.map(lambda g: attend_pairs(*g), groups).reshape(b * n, qh, qw, -1)
        return rearrange(out, "(b n) h w d -> b h w (n d)", n=n)


class Block(nnx.Module):
    """Transformer block with windowed (window_size > 0) or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm1 = layer_norm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        attn_size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, attn_size, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), gelu, dtype=dtype, rngs=rngs)
        self.window_size = window_size

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        # Windowed blocks zero-pad the normalised tokens and attend within windows (inside
        # `Attention`); padded tokens are not masked, as in the reference.
        x = x + self.attn(self.norm1(x), window_size=self.window_size)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """Non-overlapping patch embedding (a strided convolution)."""

    def __init__(
        self, patch_size: int, in_chans: int, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b gh gw e"]:
        return self.proj(x)


def sam_neck(in_chans: int, out_chans: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.List:
    """SAM's encoder neck: torch's nn.Sequential(conv1x1, LayerNorm2d, conv3x3, LayerNorm2d).

    The list keeps the Sequential's indices, so checkpoint keys `neck.<i>.*` map one to one.
    """
    return nnx.List(
        [
            nnx.Conv(in_chans, out_chans, (1, 1), use_bias=False, dtype=dtype, rngs=rngs),
            LayerNorm2d(out_chans, rngs=rngs),
            nnx.Conv(
                out_chans, out_chans, (3, 3), padding=1, use_bias=False, dtype=dtype, rngs=rngs
            ),
            LayerNorm2d(out_chans, rngs=rngs),
        ]
    )


class ImageEncoderViT(nnx.Module):
    """SAM's ViT image encoder (channels-last): (B, S, S, 3) -> (B, S/16, S/16, out_chans)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (),
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, embed_dim), jnp.float32))
        self.blocks = nnx.List(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    0 if i in global_attn_indexes else window_size,
                    (grid, grid),
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )
        self.neck = sam_neck(embed_dim, out_chans, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: Float[Array, "b s s 3"]) -> Float[Array, "b g g c"]:
        x = self.patch_embed(x.astype(self.dtype))
        x = x + self.pos_embed[...].astype(self.dtype)
        for blk in self.blocks:
            x = blk(x)
        for layer in self.neck:
            x = layer(x)
        return x.astype(jnp.float32)
