"""Shared layers of the SAM port. Port of segment_anything/modeling/common.py (Apache-2.0)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.utils.upsample import linear_taps


class Buffer(nnx.Variable):
    """A non-trainable array loaded from the checkpoint (a torch buffer)."""


def gelu(x: jax.Array) -> jax.Array:
    # PyTorch nn.GELU is the exact erf form; nnx.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def layer_norm(
    num_features: int, epsilon: float, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """torch.nn.LayerNorm numerics: explicit eps and the two-pass variance.

    Flax's default `use_fast_variance=True` computes E[x^2] - E[x]^2, which differs from PyTorch.
    """
    return nnx.LayerNorm(
        num_features, epsilon=epsilon, use_fast_variance=False, dtype=dtype, rngs=rngs
    )


class MLPBlock(nnx.Module):
    """Linear -> activation -> Linear, as segment_anything's MLPBlock."""

    def __init__(
        self,
        embedding_dim: int,
        mlp_dim: int,
        act=gelu,
        *,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.lin1 = nnx.Linear(embedding_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(mlp_dim, embedding_dim, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: Float[Array, "... c"]) -> Float[Array, "... c"]:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nnx.Module):
    """Per-pixel LayerNorm over channels of an NHWC map (torch LayerNorm2d on NCHW)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, *, rngs: nnx.Rngs):
        del rngs
        self.weight = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        # Same two-pass formula as the reference (mean, then mean of squared deviations).
        u = jnp.mean(x, axis=-1, keepdims=True)
        s = jnp.mean(jnp.square(x - u), axis=-1, keepdims=True)
        x = (x - u) / jnp.sqrt(s + self.eps)
        return x * self.weight[...] + self.bias[...]


class ConvTranspose2x2(nnx.Module):
    """ConvTranspose2d(kernel=2, stride=2, padding=0) as an einsum plus depth-to-space.

    The kernel is stored in PyTorch's (I, O, 2, 2) layout so conversion is a copy, and the maths is
    exactly y[b, 2i+di, 2j+dj, o] = bias[o] + sum_c x[b, i, j, c] * W[c, o, di, dj]
    (docs/fewshot.md §1.5).
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        bound = 1.0 / (out_channels * 4) ** 0.5
        self.weight = nnx.Param(
            jax.random.uniform(
                rngs.params(), (in_channels, out_channels, 2, 2), jnp.float32, -bound, bound
            )
        )
        self.bias = nnx.Param(
            jax.random.uniform(rngs.params(), (out_channels,), jnp.float32, -bound, bound)
        )

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 o"]:
        b, h, w, _ = x.shape
        y = jnp.einsum("bhwc,coij->bhiwjo", x, self.weight[...])  # (B, H, 2, W, 2, O)
        y = y.reshape(b, 2 * h, 2 * w, -1)  # (B, 2H, 2W, O)
        return y + self.bias[...]


def _linear_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's linear interpolation (align_corners=False)."""
    return linear_taps(in_size, out_size)


def resize_linear(x, size: int, axis: int):
    """Linear resize of one axis, half-pixel centres, no antialiasing (torch F.interpolate).

    Works on numpy arrays (host-side post-processing, no compilation) and on jax arrays.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    i0, i1, lam = _linear_indices(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    lam = xp.asarray(lam).reshape(shape).astype(x.dtype)
    x0 = xp.take(x, i0, axis=axis)
    x1 = xp.take(x, i1, axis=axis)
    return (1 - lam) * x0 + lam * x1


def resize_bilinear(x, size: tuple[int, int], axes: tuple[int, int]):
    """Bilinear resize of two axes (H, W) like F.interpolate(mode="bilinear", align_corners=False).

    Deliberately not `jax.image.resize`, which antialiases when downsampling.
    """
    x = resize_linear(x, size[1], axes[1])
    return resize_linear(x, size[0], axes[0])
