"""Few-shot selection, D1/D2 and the reference preprocessing (docs/fewshot.md §4.1, §4.2)."""

import numpy as np
import pytest
from folder_fixtures import write_pair
from scipy import ndimage

from amsam_jax.build_sam import PIXEL_MEAN, PIXEL_STD
from amsam_jax.data import folder as D
from amsam_jax.fewshot import preprocessing as P

# ----------------------------------------------------------------------------------------------
# Few-shot selection and D1/D2


def fake_samples(n):
    return [D.Sample(f"{i:03d}", f"{i:03d}.png", f"{i:03d}.png") for i in range(n)]


def test_few_shot_first_n_and_seeded_subsets():
    pool = fake_samples(20)
    assert P.select_few_shot(pool, 4) == pool[:4]
    seeded = P.select_few_shot(pool, 8, seed=3)
    assert seeded == P.select_few_shot(pool, 8, seed=3)
    assert seeded != P.select_few_shot(pool, 8, seed=4)
    assert len(set(seeded)) == 8 and seeded == sorted(seeded, key=pool.index)
    assert P.select_few_shot(pool, 20, seed=0) == pool
    with pytest.raises(D.DataError, match="only 20 samples"):
        P.select_few_shot(pool, 21)
    with pytest.raises(D.DataError, match="at least 1"):
        P.select_few_shot(pool, 0)


@pytest.mark.parametrize(
    "n, sizes", [(4, (2, 2)), (5, (2, 3)), (8, (4, 4)), (16, (8, 8)), (2, (1, 1))]
)
def test_d1_d2_split_sizes(n, sizes):
    samples = fake_samples(n)
    d1, d2 = P.split_d1_d2(samples)
    assert (len(d1), len(d2)) == sizes and d1 + d2 == samples
    with pytest.raises(D.DataError, match="at least 2"):
        P.split_d1_d2(samples[:1])


# ----------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_matches_the_reference_scipy_calls_and_keeps_overshoot():
    rng = np.random.default_rng(0)
    image = np.zeros((90, 130, 3), np.uint8)
    image[:, 65:] = 255  # a sharp edge: the cubic spline over- and undershoots
    image[:45, :, 1] = rng.integers(0, 256, (45, 130))
    mask = rng.random((90, 130)) > 0.5
    img, label, low = P.preprocess(image, mask)
    assert (img.shape, img.dtype) == ((256, 256, 3), np.float32)
    assert (label.shape, label.dtype) == ((256, 256), np.int32)
    assert (low.shape, low.dtype) == ((64, 64), np.int32)
    # The literal reference calls.
    ref = ndimage.zoom(image / 255.0, (256 / 90, 256 / 130, 1), order=3)
    np.testing.assert_allclose(img, ref, rtol=0, atol=1e-6)
    ref_label = ndimage.zoom(mask.astype(np.int32), (256 / 90, 256 / 130), order=0)
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_array_equal(low, ndimage.zoom(ref_label, 0.25, order=0))
    # Corner-aligned nearest neighbour: output o reads input round(o * 255 / 63).
    src = np.round(np.arange(64) * 255 / 63).astype(int)
    np.testing.assert_array_equal(low, label[np.ix_(src, src)])
    assert img.min() < -0.05 and img.max() > 1.05  # no clipping


def test_preprocess_sam_pixel_norm_and_key():
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    unit, _, _ = P.preprocess(image, mask)
    norm, _, _ = P.preprocess(image, mask, sam_pixel_norm=True)
    mean, std = np.array(PIXEL_MEAN), np.array(PIXEL_STD)
    np.testing.assert_allclose(norm, (unit.astype(np.float64) * 255 - mean) / std, atol=1e-4)
    small, label, low = P.preprocess(image, mask, size=128, low_res=32)
    assert small.shape == (128, 128, 3) and label.shape == (128, 128) and low.shape == (32, 32)
    keys = {
        P.Preprocessing().key(),
        P.Preprocessing(sam_pixel_norm=True).key(),
        P.Preprocessing(size=128).key(),
        P.Preprocessing(low_res=32).key(),
    }
    assert len(keys) == 4 and P.Preprocessing().key() == P.Preprocessing().key()


def test_load_split_arrays_stacks_preprocessed_samples(tmp_path):
    write_pair(tmp_path, "test", "b", size=(20, 30))
    write_pair(tmp_path, "test", "a", size=(25, 15))
    samples = D.list_samples(tmp_path, "test")
    arrays = P.load_split_arrays(samples, P.Preprocessing(), original_masks=True)
    assert arrays["stem"] == ["a", "b"]
    assert arrays["image"].shape == (2, 256, 256, 3) and arrays["image"].dtype == np.float32
    assert arrays["label"].shape == (2, 256, 256) and arrays["label"].dtype == np.int32
    assert arrays["label_low"].shape == (2, 64, 64) and arrays["label_low"].dtype == np.int32
    np.testing.assert_array_equal(arrays["original_size"], [[25, 15], [20, 30]])
    for i, sample in enumerate(samples):
        image, mask = D.load_sample(sample)
        np.testing.assert_array_equal(arrays["mask"][i], mask)
        expected = P.preprocess(image, mask)
        for j, key in enumerate(("image", "label", "label_low")):
            np.testing.assert_array_equal(arrays[key][i], expected[j])
    assert "mask" not in P.load_split_arrays(samples[:1])
