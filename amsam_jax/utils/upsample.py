"""SAM's mask upsampling (`Sam.postprocess_masks`) for the mask generator, size-bucketed.

`postprocess_masks` resizes the low-resolution logits to the model input (s x s), crops the
padding away and resizes to the original size, each step torch's
`F.interpolate(mode="bilinear", align_corners=False)` (`modeling/common.resize_bilinear`: width
first, then height, `(1 - lam) * x[i0] + lam * x[i1]`). Here the second resize takes its taps
(i0, i1, lam) as arrays padded to a size bucket, so every crop size in one bucket shares one
compiled program, and the padding is set to -inf (no pixel of any threshold, probability 0). The
arithmetic is the same element for element, so the logits are the same floats (tested).

Keep reductions (stability score, boxes) out of the jitted call that upsamples: XLA on CPU fuses
the gathers into the reductions with transposed layouts and gets ~100x slower; on a materialised
array the reductions are cheap.
"""

import jax.numpy as jnp
import numpy as np


def linear_taps(
    in_size: int, out_size: int, padded_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of torch's linear interpolation (align_corners=False), as `modeling/common.py`.

    Args:
        in_size: source length.
        out_size: destination length.
        padded_size: pad the taps to this length (index 0, weight 0) for a size bucket.

    Returns:
        (padded_size,) int32 i0, int32 i1 and float32 lam.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    pad = (padded_size or out_size) - out_size
    if pad < 0:
        raise ValueError(f"padded_size {padded_size} < out_size {out_size}")
    return (
        np.pad(i0, (0, pad)).astype(np.int32),
        np.pad(i1, (0, pad)).astype(np.int32),
        np.pad(lam, (0, pad)).astype(np.float32),
    )


def bucket_size(n: int) -> int:
    """`n` rounded up to steps of 32, or of a quarter octave above 256 (150 -> 160, 1500 -> 1536).

    Sixteen buckets up to 1024 px, four per octave above; at most 25% padding above 128 px.
    """
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    step = max(32, 1 << max(0, (n - 1).bit_length() - 3))
    return -(-n // step) * step


def crop_taps(input_size: tuple[int, int], crop_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Taps of the second resize (input crop -> crop size), padded to the crop's bucket.

    Returns:
        {"h": (i0, i1, lam) of length bucket(H), "w": (...) of bucket(W), "hw": (2,) int32 H, W}.
    """
    (h_in, w_in), (h, w) = input_size, crop_size
    return {
        "h": linear_taps(h_in, h, bucket_size(h)),
        "w": linear_taps(w_in, w, bucket_size(w)),
        "hw": np.asarray([h, w], np.int32),
    }


def _resize_axis(x, taps, axis: int):
    """`(1 - lam) * x[i0] + lam * x[i1]` along `axis` (jax; taps traced or constant)."""
    i0, i1, lam = taps
    shape = [1] * x.ndim
    shape[axis] = -1
    lam = jnp.asarray(lam).reshape(shape).astype(x.dtype)
    x0 = jnp.take(x, jnp.asarray(i0), axis=axis, mode="clip")
    x1 = jnp.take(x, jnp.asarray(i1), axis=axis, mode="clip")
    return (1 - lam) * x0 + lam * x1


def upsample_logits(low_res, image_size: int, taps: dict):
    """(N, L, L) low-res logits -> (N, Hb, Wb) logits at crop size, -inf outside (H, W).

    Equals `Sam.postprocess_masks(low_res[:, None], input_size, crop_size)[:, 0]` inside the
    (H, W) corner. Jittable: `image_size` static, `taps` (from `crop_taps`) traced.
    """
    length = low_res.shape[-1]
    up = linear_taps(length, image_size)  # constant: the model's L -> s
    x = _resize_axis(low_res, up, axis=2)
    x = _resize_axis(x, up, axis=1)  # (N, s, s); taps index the input crop's corner
    x = _resize_axis(x, taps["w"], axis=2)
    x = _resize_axis(x, taps["h"], axis=1)  # (N, Hb, Wb)
    hw = jnp.asarray(taps["hw"])
    rows = jnp.arange(x.shape[1])[:, None] < hw[0]
    cols = jnp.arange(x.shape[2])[None, :] < hw[1]
    return jnp.where(rows & cols, x, -jnp.inf)
