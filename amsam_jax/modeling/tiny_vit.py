"""TinyViT image encoder of MobileSAM and LiteMedSAM, in Flax NNX, channels-last.

Port of MobileSAM's mobile_sam/modeling/tiny_vit_sam.py (Apache-2.0; TinyViT, Copyright (c) 2022
Microsoft) and of LiteMedSAM's variant of it. The two differ only in the patch embedding: MobileSAM
embeds 4x4 patches with two 3x3 stride-2 convolutions (1024 px -> 256), LiteMedSAM keeps every
pixel with two 1x1 convolutions (256 px -> 256). Everything else is shared: an MBConv stage, three
window-attention stages, patch merging between stages (stride 1 before the last stage), and SAM's
neck. docs/fewshot.md §1.6 describes the block and the numerics matched here.

The encoder is frozen in every method of this project, so batch norm runs in inference form:
(x - running_mean) / sqrt(running_var + eps) * weight + bias, with the checkpoint's statistics.
"""

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.modeling.common import Buffer, gelu, layer_norm
from amsam_jax.modeling.image_encoder import sam_neck

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used inside the TinyViT blocks


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d in eval mode on an NHWC map (statistics from the checkpoint)."""

    def __init__(self, num_features: int, *, rngs: nnx.Rngs):
        del rngs
        self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = Buffer(jnp.zeros((num_features,), jnp.float32))
        self.running_var = Buffer(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        # torch: (x - mean) * invstd * weight + bias, invstd = 1 / sqrt(var + eps).
        invstd = jax.lax.rsqrt(self.running_var[...] + BN_EPS)
        return (x - self.running_mean[...].astype(x.dtype)) * (invstd * self.weight[...]).astype(
            x.dtype
        ) + self.bias[...].astype(x.dtype)


class Conv2dBN(nnx.Module):
    """Conv2d without bias followed by batch norm (TinyViT's `Conv2d_BN`: children `c`, `bn`)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.c = nnx.Conv(
            in_chans,
            out_chans,
            (kernel_size, kernel_size),
            strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            feature_group_count=groups,
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )
        self.bn = BatchNorm2d(out_chans, rngs=rngs)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
        c = self.c
        if c.feature_group_count > 1 and c.feature_group_count == c.in_features == c.out_features:
            return self.bn(depthwise_conv(x, c.kernel[...], c.strides[0], c.padding[0][0]))
        return self.bn(c(x))


def depthwise_conv(
    x: Float[Array, "b h w c"], kernel: Float[Array, "k k 1 c"], stride: int, pad: int
) -> Float[Array, "b h2 w2 c"]:
    """A depthwise convolution as k*k shifted multiply-adds.

    XLA's CPU backend runs a grouped convolution with one channel per group several times slower
    than this (measured: 0.49 s against 0.05 s for a 3x3 at 256 x 256 x 256); the sum is the
    same, in another order.
    """
    k = kernel.shape[0]
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h = (x.shape[1] - k) // stride + 1
    w = (x.shape[2] - k) // stride + 1
    weights = kernel[:, :, 0, :].astype(x.dtype)  # (k, k, C)
    out = None
    for dy in range(k):
        for dx in range(k):
            tap = jax.lax.slice(
                x,
                (0, dy, dx, 0),
                (x.shape[0], dy + (h - 1) * stride + 1, dx + (w - 1) * stride + 1, x.shape[3]),
                (1, stride, stride, 1),
            )
            term = tap * weights[dy, dx]
            out = term if out is None else out + term
    return out


class PatchEmbed(nnx.Module):
    """Two Conv2dBN with a GELU between: 3x3 stride 2 each (MobileSAM) or 1x1 stride 1 (LiteMedSAM).

    Torch's `seq` is Sequential(conv, GELU, conv): its indices 0 and 2 are entries 0 and 1 here.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, stride: int, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        if stride not in (1, 4):
            raise ValueError(f"TinyViT patch stride must be 4 (MobileSAM) or 1, got {stride}")
        k, s, p = (3, 2, 1) if stride == 4 else (1, 1, 0)
        n = embed_dim
        self.seq = nnx.List(
            [
                Conv2dBN(in_chans, n // 2, k, s, p, dtype=dtype, rngs=rngs),
                Conv2dBN(n // 2, n, k, s, p, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: Float[Array, "b h w 3"]) -> Float[Array, "b g g c"]:
        return self.seq[1](gelu(self.seq[0](x)))


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU after each."""

    def __init__(self, dim: int, expand_ratio: float, *, dtype=jnp.float32, rngs: nnx.Rngs):
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden, dtype=dtype, rngs=rngs)
        self.conv3 = Conv2dBN(hidden, dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        y = gelu(self.conv2(gelu(self.conv1(x))))
        return gelu(self.conv3(y) + x)


class PatchMerging(nnx.Module):
    """1x1 conv to the next width, 3x3 depthwise conv (stride 2, or 1), 1x1 conv; GELUs between."""

    def __init__(self, dim: int, out_dim: int, stride: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv1 = Conv2dBN(dim, out_dim, 1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2dBN(
            out_dim, out_dim, 3, stride, 1, groups=out_dim, dtype=dtype, rngs=rngs
        )
        self.conv3 = Conv2dBN(out_dim, out_dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
        return self.conv3(gelu(self.conv2(gelu(self.conv1(x)))))


@functools.cache
def attention_bias_index(window: int) -> tuple[int, np.ndarray]:
    """TinyViT's bias table layout for a window x window grid.

    Every distinct offset (|dy|, |dx|) between two positions gets one column of
    `attention_biases`, numbered in order of first appearance over the pairs (p1, p2) in row-major
    order; the (N, N) index (`attention_bias_idxs`, a non-persistent torch buffer) is rebuilt
    here rather than loaded.

    Returns:
        (number of offsets, (N, N) int32 index into the table's columns).
    """
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if offset not in offsets:
                offsets[offset] = len(offsets)
            idxs.append(offsets[offset])
    n = len(points)
    return len(offsets), np.asarray(idxs, np.int32).reshape(n, n)


class Attention(nnx.Module):
    """LayerNorm, fused qkv (laid out heads first), attention with a learned offset bias, proj."""

    def __init__(self, dim: int, num_heads: int, window: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim**-0.5
        self.window = window
        self.norm = layer_norm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        num_offsets, _ = attention_bias_index(window)
        self.attention_biases = nnx.Param(jnp.zeros((num_heads, num_offsets), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: Float[Array, "b n c"]) -> Float[Array, "b n c"]:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x))
        # Torch: view(B, N, heads, -1).split([kd, kd, d]): each head's q, k, v are contiguous.
        qkv = qkv.reshape(b, n, self.num_heads, 3 * self.key_dim)  # (B, N, h, 3kd)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # (B, N, h, kd) each
        _, index = attention_bias_index(self.window)
        bias = self.attention_biases[...][:, index].astype(self.dtype)  # (h, N, N)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale + bias  # (B, h, N, N)
        attn = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)  # (B, N, h, kd)
        return self.proj(out.reshape(b, n, -1))


class Mlp(nnx.Module):
    """LayerNorm, Linear, GELU, Linear (TinyViT's Mlp normalises its own input)."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = layer_norm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "... c"]) -> Float[Array, "... c"]:
        return self.fc2(gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nnx.Module):
    """Window attention, then a depthwise local conv, then the MLP; residuals around attn and MLP.

    The map is zero-padded bottom/right to a multiple of the window before the attention's own
    LayerNorm (so padded tokens enter as the norm's bias, as in the reference), unless it is
    exactly one window.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv_size: int,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.window = window
        self.attn = Attention(dim, num_heads, window, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        pad = local_conv_size // 2
        self.local_conv = Conv2dBN(
            dim, dim, local_conv_size, 1, pad, groups=dim, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        b, h, w, c = x.shape
        ws = self.window
        if h == ws and w == ws:
            attended = self.attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        else:
            pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
            padded = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
            windows = rearrange(padded, "b (nh p) (nw q) c -> (b nh nw) (p q) c", p=ws, q=ws)
            out = self.attn(windows)
            out = rearrange(
                out, "(b nh nw) (p q) c -> b (nh p) (nw q) c", b=b, nh=(h + pad_h) // ws, p=ws
            )
            attended = out[:, :h, :w]
        x = x + attended
        x = self.local_conv(x)
        return x + self.mlp(x)


class ConvLayer(nnx.Module):
    """Stage 0: MBConv blocks, then patch merging to the next width."""

    def __init__(
        self,
        dim: int,
        depth: int,
        expand_ratio: float,
        out_dim: int,
        stride: int,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.blocks = nnx.List(
            [MBConv(dim, expand_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)]
        )
        self.downsample = PatchMerging(dim, out_dim, stride, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nnx.Module):
    """Stages 1..3: TinyViT blocks, then patch merging (all but the last stage)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv_size: int,
        out_dim: int | None,
        stride: int,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.blocks = nnx.List(
            [
                TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv_size, dtype=dtype,
                             rngs=rngs)
                for _ in range(depth)
            ]
        )  # fmt: skip
        self.downsample = (
            None if out_dim is None else PatchMerging(dim, out_dim, stride, dtype=dtype, rngs=rngs)
        )

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nnx.Module):
    """TinyViT + SAM neck: (B, S, S, 3) -> (B, G, G, out_chans), channels-last.

    Args:
        img_size: S.
        patch_stride: 4 (MobileSAM) or 1 (LiteMedSAM).
        embed_dims: width of the four stages.
        depths: blocks per stage.
        num_heads: heads per stage (stage 0 is convolutional and ignores it).
        window_sizes: attention window per stage.
        merge_strides: stride of the patch merging after stages 0, 1, 2.
        mlp_ratio: MLP hidden width over the block width.
        mbconv_expand_ratio: MBConv hidden width over its width.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
        out_chans: neck width (256).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_stride: int = 4,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes) == 4:
            raise ValueError("TinyViT has four stages: embed_dims, depths, heads, windows of 4")
        if len(merge_strides) != 3:
            raise ValueError(f"TinyViT merges three times, got merge_strides {merge_strides}")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(3, embed_dims[0], patch_stride, dtype=dtype, rngs=rngs)
        layers = [
            ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, embed_dims[1],
                      merge_strides[0], dtype=dtype, rngs=rngs)
        ]  # fmt: skip
        for i in range(1, 4):
            layers.append(
                BasicLayer(
                    embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                    local_conv_size, embed_dims[i + 1] if i < 3 else None,
                    merge_strides[i] if i < 3 else 1, dtype=dtype, rngs=rngs,
                )
            )  # fmt: skip
        self.layers = nnx.List(layers)
        self.neck = sam_neck(embed_dims[-1], out_chans, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: Float[Array, "b s s 3"]) -> Float[Array, "b g g c"]:
        x = self.patch_embed(x.astype(self.dtype))
        for layer in self.layers:
            x = layer(x)
        for layer in self.neck:
            x = layer(x)
        return x.astype(jnp.float32)


def tiny_vit_grid(img_size: int, patch_stride: int, merge_strides: Sequence[int]) -> int:
    """Side of the output grid: each 3x3 stride-s merge maps n to ceil(n / s)."""
    n = img_size // patch_stride
    for s in merge_strides:
        n = -(-n // s)
    return n
