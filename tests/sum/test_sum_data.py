"""SUM's pseudo-label mask filter and training label (docs/sum.md §2.2, §9 item 13)."""

import numpy as np

from amsam_jax.sum.data import filter_masks, label_target, prepare_label


def filter_rows():
    """Crop 100 x 200: ratio <= 0.95 <=> area <= 19000; A' = area (1024/200)² >= 10000 <=>
    area >= 381.47."""
    areas = np.array([381, 382, 19000, 19001, 5000, 100, 20000, 1000])
    crops = np.tile([0, 0, 100, 200], (len(areas), 1))
    return areas, crops


def test_filter_keeps_exactly_rows_within_ratio_and_min_area():
    areas, crops = filter_rows()
    result = filter_masks(areas, crops, np.random.default_rng(0))
    np.testing.assert_array_equal(result.indices, [1, 2, 4, 7])
    # min_ratio = 1 (the code default): A' >= 100 <=> area >= 3.81.
    result = filter_masks(areas, crops, np.random.default_rng(0), min_ratio=1)
    np.testing.assert_array_equal(result.indices, [0, 1, 2, 4, 5, 7])


def test_filter_caps_at_40_uniformly_in_index_order():
    areas = np.full(100, 5000)
    areas[::3] = 10  # too small
    crops = np.tile([0, 0, 100, 200], (100, 1))
    eligible = np.flatnonzero(areas == 5000)
    seen = set()
    for seed in range(20):
        idx = filter_masks(areas, crops, np.random.default_rng(seed)).indices
        assert len(idx) == 40 and np.all(np.diff(idx) > 0)
        assert set(idx) <= set(eligible)
        seen |= set(idx.tolist())
    assert seen == set(eligible.tolist())  # every eligible row can be drawn
    again = filter_masks(areas, crops, np.random.default_rng(3)).indices
    np.testing.assert_array_equal(
        again, filter_masks(areas, crops, np.random.default_rng(3)).indices
    )


def test_filter_skips_images_with_no_mask_alpha_or_huge_side():
    areas, crops = filter_rows()
    rng = np.random.default_rng(0)
    assert filter_masks(areas[[0, 3]], crops[[0, 3]], rng).indices is None
    skipped = filter_masks(areas, crops, rng, has_alpha=True)
    assert skipped.indices is None and "alpha" in skipped.reason
    assert filter_masks(areas, crops, rng, image_hw=(5001, 300)).indices is None
    assert filter_masks(areas, crops, rng, image_hw=(5000, 300)).indices is not None


def test_prepare_label_nearest_resize_pad_and_target():
    rng = np.random.default_rng(0)
    p_sam = rng.integers(0, 256, (3, 30, 45), dtype=np.uint8)
    p, (h, w) = prepare_label(p_sam, size=64)
    assert p.dtype == np.uint8 and p.shape == (3, 64, 64) and (h, w) == (43, 64)
    rows = np.floor(np.arange(h) * np.float32(30 / 43)).astype(int)
    cols = np.floor(np.arange(w) * np.float32(45 / 64)).astype(int)
    np.testing.assert_array_equal(p[:, :h, :w], p_sam[:, rows][:, :, cols])
    assert not p[:, h:].any() and not p[:, :, w:].any()
    np.testing.assert_array_equal(label_target(p), p / 255 > 0.5)
    assert label_target(np.array([127, 128], np.uint8)).tolist() == [False, True]
