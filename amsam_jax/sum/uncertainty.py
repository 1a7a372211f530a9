"""SUM's per-pixel uncertainty map U = |p_SAM - p_ref| (docs/sum.md §3.1, A11), pure jnp."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, UInt8

from amsam_jax.modeling.common import resize_bilinear


def uncertainty_map(
    p_sam_u8: UInt8[Array, "m s s"], p_ref_u8: UInt8[Array, "m l l"] | None, size: int
) -> Float[Array, "m s s"]:
    """U = |p_SAM - upsample(p_ref)| in [0, 1] on the padded S x S frame.

    Args:
        p_sam_u8: (M, S, S) SAM's 8-bit soft pseudo-label probabilities (value / 255), padded
            frame, before binarisation.
        p_ref_u8: (M, l, l) the refiner's 8-bit probabilities over the padded frame (any l;
            upsampled bilinearly with half-pixel centres to S), or None for the "Vanilla"
            source (U = 0).
        size: S, the padded frame (1024 for SAM).

    Returns:
        (M, S, S) float32 U.
    """
    p_sam = jnp.asarray(p_sam_u8, jnp.float32) / 255.0
    if p_sam.shape[-2:] != (size, size):
        raise ValueError(f"p_sam must be (M, {size}, {size}), got {p_sam.shape}")
    if p_ref_u8 is None:
        return jnp.zeros_like(p_sam)
    p_ref = jnp.asarray(p_ref_u8, jnp.float32) / 255.0
    if p_ref.shape[-2:] != (size, size):
        p_ref = resize_bilinear(p_ref, (size, size), axes=(-2, -1))
    # Bilinear weights are convex, so p_ref stays in [0, 1] up to rounding; clip the rounding.
    return jnp.clip(jnp.abs(p_sam - p_ref), 0.0, 1.0)


def zero_missing_maps(
    uncertainty: Float[Array, "m s s"], has_map: Bool[Array, " m"]
) -> tuple[Float[Array, "m s s"], jax.Array]:
    """U = 0 for masks without a refined map (docs/sum.md A11), and how many such masks there are.

    A mask that fails the refinement-size filter or has no refined map is treated as fully
    certain, as the reference does; the count is meant to be logged.

    Args:
        uncertainty: (M, S, S) U.
        has_map: (M,) True where a refined map exists (and passed the size filter).

    Returns:
        (U with zeroed rows (M, S, S), number of masks without a map as an int32 scalar).
    """
    has_map = jnp.asarray(has_map, bool)
    u = jnp.where(has_map[:, None, None], uncertainty, 0.0)
    return u, jnp.sum(~has_map).astype(jnp.int32)
