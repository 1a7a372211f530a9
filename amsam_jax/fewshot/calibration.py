"""Mask calibration of AM-SAM (paper Eqs. 9-12), in closed form (docs/fewshot.md §6.3)."""

import jax
import jax.numpy as jnp


def calibrate_masks(
    masks: jax.Array, num_channels: int, alpha: float = 0.7, average: str = "batch"
) -> jax.Array:
    """M_final = alpha * M_orig + (1 - alpha) * M_new, with M_new from the Hadamard products.

    Eqs. 9-11 average R_i = U_i * H_i over the batch and the c upscaled channels, which equals
    (1 / c) * mean over the batch of M_orig; the (B * c, n, h, w) tensor is never built.

    Args:
        masks: M_orig (B, n, h, w), the decoder's dot products H . U.
        num_channels: c, the number of upscaled channels (32 for SAM).
        alpha: fixed mixing weight (0.7 in the paper).
        average: "batch" (literal Eq. 11: couples the samples of a batch) or "sample" (per
            sample, M_final = (alpha + (1 - alpha) / c) * M_orig for any B). Equal at B = 1.

    Returns:
        (B, n, h, w) calibrated logits.
    """
    if average == "batch":
        mean = jnp.mean(masks, axis=0, keepdims=True)
    elif average == "sample":
        mean = masks
    else:
        raise ValueError(f"calib_average must be 'batch' or 'sample', got {average!r}")
    return alpha * masks + ((1.0 - alpha) / num_channels) * mean
