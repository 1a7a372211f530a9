"""ViT image encoder of SAM. Port of segment_anything/modeling/image_encoder.py (Apache-2.0)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.modeling.common import LayerNorm2d, MLPBlock, gelu, layer_norm


def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """Zero-pads bottom/right to a multiple of the window and cuts windows.

    Args:
        x: (B, H, W, C).
        window_size: side of a square window.

    Returns:
        windows (B * nH * nW, window, window, C) and the padded size (Hp, Wp).
    """
    _, h, w, _ = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        # The padded tokens are zeros and are NOT masked: they take part in attention as in the
        # reference (their keys/values are the projection biases).
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
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
            (spec §2.3), so a mismatching length is an error here rather than a silent resize.

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


class Attention(nnx.Module):
    """Multi-head attention with decomposed relative position terms."""

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

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        b, h, w, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = rearrange(qkv, "b h w (t n d) -> t b n (h w) d", t=3, n=self.num_heads)
        rel_h = get_rel_pos(h, h, self.rel_pos_h[...]).astype(self.dtype)  # (H, kH, D)
        rel_w = get_rel_pos(w, w, self.rel_pos_w[...]).astype(self.dtype)  # (W, kW, D)
        attn = jnp.einsum("bnqd,bnkd->bnqk", q * jnp.asarray(self.scale, self.dtype), k)
        # The relative terms use the unscaled query, as in the reference.
        r_q = q.reshape(b, self.num_heads, h, w, -1)  # (B, n, H, W, D)
        term_h = jnp.einsum("bnhwd,hkd->bnhwk", r_q, rel_h)  # (B, n, H, W, kH)
        term_w = jnp.einsum("bnhwd,wkd->bnhwk", r_q, rel_w)  # (B, n, H, W, kW)
        attn = attn.reshape(b, self.num_heads, h, w, h, w)
        attn = attn + term_h[..., :, None] + term_w[..., None, :]
        attn = attn.reshape(b, self.num_heads, h * w, h * w).astype(jnp.float32)
        attn = jax.nn.softmax(attn, axis=-1).astype(self.dtype)
        out = jnp.einsum("bnqk,bnkd->bnqd", attn, v)
        out = rearrange(out, "b n (h w) d -> b h w (n d)", h=h, w=w)
        return self.proj(out)


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
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
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
        # Torch's nn.Sequential(conv1x1, LayerNorm2d, conv3x3, LayerNorm2d); indices kept.
        self.neck = nnx.List(
            [
                nnx.Conv(embed_dim, out_chans, (1, 1), use_bias=False, dtype=dtype, rngs=rngs),
                LayerNorm2d(out_chans, rngs=rngs),
                nnx.Conv(
                    out_chans, out_chans, (3, 3), padding=1, use_bias=False, dtype=dtype, rngs=rngs
                ),
                LayerNorm2d(out_chans, rngs=rngs),
            ]
        )
        self.dtype = dtype

    def __call__(self, x: Float[Array, "b s s 3"]) -> Float[Array, "b g g c"]:
        x = self.patch_embed(x.astype(self.dtype))
        x = x + self.pos_embed[...].astype(self.dtype)
        for blk in self.blocks:
            x = blk(x)
        for layer in self.neck:
            x = layer(x)
        return x.astype(jnp.float32)
