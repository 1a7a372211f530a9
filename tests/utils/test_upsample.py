"""Tests of `amsam_jax.utils.upsample`: the generator's bucketed `postprocess_masks`, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amsam_jax.modeling.common import _linear_indices, resize_bilinear
from amsam_jax.utils.upsample import bucket_size, crop_taps, linear_taps, upsample_logits

# (image size s, input crop (h, w), crop size (H, W)): up- and downsampling, odd ratios, a
# crop equal to the input, thin crops, crops that fill their bucket exactly and crops that do not.
CASES = [
    (64, (48, 64), (96, 128)),
    (64, (64, 43), (150, 101)),
    (64, (64, 64), (64, 64)),
    (64, (32, 64), (17, 33)),
    (64, (1, 64), (2, 300)),
    (64, (64, 3), (700, 5)),
]


def postprocess_masks(low_res, s, input_size, crop_size):
    """`Sam.postprocess_masks` on (N, L, L) (its body, without a model)."""
    x = resize_bilinear(low_res, (s, s), axes=(1, 2))[:, : input_size[0], : input_size[1]]
    return resize_bilinear(x, crop_size, axes=(1, 2))


@pytest.mark.parametrize("in_size,out_size", [(16, 64), (64, 17), (43, 101), (64, 64), (1, 5)])
def test_taps_are_the_model_taps_padded(in_size, out_size):
    ref = _linear_indices(in_size, out_size)
    padded = bucket_size(out_size)
    for ours, theirs in zip(linear_taps(in_size, out_size, padded), ref, strict=True):
        assert ours.shape == (padded,)
        np.testing.assert_array_equal(ours[:out_size], theirs)
        assert not ours[out_size:].any()
    with pytest.raises(ValueError):
        linear_taps(in_size, out_size, out_size - 1)


@pytest.mark.parametrize("s,input_size,crop_size", CASES)
def test_upsample_equals_postprocess_masks_bit_for_bit(s, input_size, crop_size):
    rng = np.random.default_rng(sum(crop_size))
    low_res = jnp.asarray(3 * rng.standard_normal((3, s // 4, s // 4)).astype(np.float32))
    ref = np.asarray(jax.jit(postprocess_masks, static_argnums=(1, 2, 3))(
        low_res, s, input_size, crop_size
    ))  # fmt: skip
    ours = np.asarray(jax.jit(upsample_logits, static_argnums=1)(
        low_res, s, crop_taps(input_size, crop_size)
    ))  # fmt: skip
    h, w = crop_size
    assert ours.shape == (3, bucket_size(h), bucket_size(w))
    np.testing.assert_array_equal(ours[:, :h, :w], ref)  # exact, not close
    assert np.isneginf(ours[:, h:]).all() and np.isneginf(ours[:, :, w:]).all()


def test_bucket_sizes_are_bounded_and_shared():
    sizes = np.arange(1, 5000)
    buckets = np.asarray([bucket_size(int(n)) for n in sizes])
    assert (buckets >= sizes).all() and (np.diff(buckets) >= 0).all()
    assert (buckets[sizes > 128] < 1.25 * sizes[sizes > 128]).all()
    assert len(set(buckets[sizes <= 1024].tolist())) == 8 + 4 + 4  # <= 256, 257-512, 513-1024
    assert [bucket_size(n) for n in (96, 90, 150, 160, 384, 1500, 2250)] == [
        96, 96, 160, 160, 384, 1536, 2560,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        bucket_size(0)
