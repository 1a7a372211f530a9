"""Interactive evaluation: mask IoU, boundary IoU, centre-of-error clicks (docs/sum.md §8.2-8.3,
§9 items 14-15) and the click loop with a fake predict function."""

import numpy as np
import pytest
from scipy import ndimage

from amsam_jax.evaluation import interactive, metrics, plots


def _boundary_brute_force(mask: np.ndarray, d: int) -> np.ndarray:
    """∂M by definition: p is interior iff its (2d+1)^2 window lies in the image and in M."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                continue
            inside = r - d >= 0 and c - d >= 0 and r + d < h and c + d < w
            interior = inside and mask[r - d : r + d + 1, c - d : c + d + 1].all()
            out[r, c] = not interior
    return out


def _biou_brute_force(gt, pred, d):
    gb, pb = _boundary_brute_force(gt, d), _boundary_brute_force(pred, d)
    union = (gb | pb).sum()
    return 1.0 if union == 0 else (gb & pb).sum() / union


def _blobs(seed, shape=(20, 23)):
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.gaussian_filter(noise, 2.0) > 0.5


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_mask_boundary_matches_brute_force_and_padded_erosions(d):
    for seed in range(4):
        mask = _blobs(seed)
        assert mask.any() and not mask.all()
        got = metrics.mask_boundary(mask, d)
        np.testing.assert_array_equal(got, _boundary_brute_force(mask, d))
        # The construction of docs/sum.md §8.2: 1-px zero pad, d erosions with a 3x3 kernel, crop.
        padded = np.pad(mask, 1)
        eroded = ndimage.binary_erosion(padded, np.ones((3, 3)), iterations=d)[1:-1, 1:-1]
        np.testing.assert_array_equal(got, mask & ~eroded)


def test_boundary_iou_matches_brute_force_on_random_masks():
    gt = _blobs(10, (40, 37))
    pred = _blobs(11, (40, 37)) | gt & _blobs(12, (40, 37))
    d = metrics.boundary_dilation(40, 37)
    assert d == 1
    expect = _biou_brute_force(gt, pred, d)
    assert 0 < expect < 1
    assert metrics.boundary_iou(gt, pred) == pytest.approx(expect, abs=1e-12)
    # A larger ratio changes d (and the score) through the formula.
    d_big = metrics.boundary_dilation(40, 37, 0.1)
    assert d_big == 5
    assert metrics.boundary_iou(gt, pred, 0.1) == pytest.approx(
        _biou_brute_force(gt, pred, d_big), abs=1e-12
    )


def test_boundary_iou_identical_disjoint_symmetric_and_empty():
    a = np.zeros((30, 30), bool)
    a[5:20, 4:18] = True
    b = np.zeros((30, 30), bool)
    b[22:28, 20:29] = True
    c = np.zeros((30, 30), bool)
    c[8:25, 6:22] = True
    assert metrics.boundary_iou(a, a) == 1.0
    assert metrics.boundary_iou(a, b) == 0.0
    assert metrics.boundary_iou(a, c) == metrics.boundary_iou(c, a)
    assert 0 < metrics.boundary_iou(a, c) < 1
    empty = np.zeros((30, 30), bool)
    assert metrics.boundary_iou(empty, empty) == 1.0


def test_thin_mask_is_all_boundary_and_border_touching_mask_has_border_boundary():
    h, w = 200, 220
    d = metrics.boundary_dilation(h, w)  # round(0.02 * 297.3) = 6
    assert d == 6
    thin = np.zeros((h, w), bool)
    thin[50:150, 100 : 100 + 2 * d] = True  # 2d wide < 2d + 1
    np.testing.assert_array_equal(metrics.mask_boundary(thin, d), thin)
    thick = np.zeros((h, w), bool)
    thick[50:150, 100 : 100 + 2 * d + 1] = True  # 2d + 1 wide: one interior column
    assert metrics.mask_boundary(thick, d).sum() < thick.sum()
    full = np.ones((h, w), bool)
    bound = metrics.mask_boundary(full, d)
    assert bound[0].all() and bound[-1].all() and bound[:, 0].all() and bound[:, -1].all()
    assert bound[d - 1, w // 2] and not bound[d, w // 2] and not bound[h // 2, w // 2]


def test_boundary_dilation_formula():
    assert metrics.boundary_dilation(1024, 1024) == 29
    assert metrics.boundary_dilation(480, 640) == 16  # 0.02 * 800
    assert metrics.boundary_dilation(10, 10) == 1  # max(1, round(0.28))


def test_mask_iou_values_empty_union_and_bool_inputs_only():
    gt = np.zeros((8, 8), bool)
    gt[:4] = True
    pred = np.zeros((8, 8), bool)
    pred[2:6] = True
    assert metrics.mask_iou(gt, pred) == pytest.approx(16 / 48)
    assert metrics.mask_iou(gt, gt) == 1.0
    assert metrics.mask_iou(np.zeros((8, 8), bool), np.zeros((8, 8), bool)) == 1.0
    with pytest.raises(TypeError):
        metrics.mask_iou(gt, pred.astype(np.float32))


def test_first_click_at_gt_centre_with_border_as_background():
    gt = np.zeros((12, 16), bool)
    gt[2:7, 4:9] = True  # 5x5 square, centre (row 4, col 6)
    assert interactive.next_click(gt, None) == ((6, 4), 1)
    corner = np.zeros((10, 10), bool)
    corner[0:5, 0:5] = True  # touches the top-left border: centre (2, 2), not (0, 0)
    assert interactive.next_click(corner, None) == ((2, 2), 1)
    band = np.zeros((6, 10), bool)
    band[1:3, 2:8] = True  # every pixel is at distance 1: first in row-major order
    assert interactive.next_click(band, None) == ((2, 1), 1)
    with pytest.raises(ValueError):
        interactive.next_click(np.zeros((4, 4), bool), None)


def test_later_clicks_pick_larger_error_region_with_its_label():
    gt = np.zeros((20, 20), bool)
    gt[2:12, 2:12] = True
    pred = gt.copy()
    pred[4:11, 4:11] = False  # large false-negative hole, centre (7, 7)
    pred[15:17, 15:17] = True  # small false positive
    assert interactive.next_click(gt, pred) == ((7, 7), 1)
    pred = gt.copy()
    pred[13:20, 10:17] = True  # large false positive touching the bottom border
    pred[2, 2] = False  # one-pixel false negative
    (x, y), label = interactive.next_click(gt, pred)
    assert label == 0 and not gt[y, x] and pred[y, x]
    assert (x, y) == (13, 16)
    # No error: the click-1 point is repeated as a positive click.
    assert interactive.next_click(gt, gt) == interactive.next_click(gt, None)


def _fake_predict(gt, calls):
    """Click 1: three candidates; best-IoU candidate misses one GT pixel (logit exactly 0).
    Later: echoes the mask prompt and turns positive-clicked pixels on."""

    def predict(coords, labels, mask_input, multimask):
        calls.append((coords.copy(), labels.copy(), mask_input, multimask))
        if multimask:
            near = np.where(gt, 1.0, -1.0).astype(np.float32)
            near[3, 4] = 0.0  # a logit of 0 is background
            cands = np.stack([np.full(gt.shape, -1.0), near, np.full(gt.shape, 1.0)])
            iou_pred = np.array([0.1, 0.9, 0.5], np.float32)
        else:
            logits = mask_input[0].copy()
            for (x, y), lab in zip(coords.astype(int), labels, strict=True):
                logits[y, x] = 1.0 if lab == 1 else -1.0
            cands, iou_pred = logits[None], np.array([0.7], np.float32)
        return cands.astype(np.float32), iou_pred, cands.astype(np.float32)

    return predict


def test_simulate_clicks_with_fake_predict(tmp_path):
    gt = np.zeros((16, 16), bool)
    gt[3:11, 4:12] = True
    calls = []
    out = interactive.simulate_clicks(_fake_predict(gt, calls), gt, num_clicks=4)
    assert len(out["iou"]) == len(out["biou"]) == len(out["clicks"]) == 4
    assert out["iou"][0] == pytest.approx(63 / 64)
    assert out["iou"][1:] == [1.0, 1.0, 1.0]
    assert out["clicks"][0][2] == 1
    assert out["clicks"][1] == (4, 3, 1)  # the one missed GT pixel (row 3, col 4)
    assert [c[3] for c in calls] == [True, False, False, False]
    assert calls[0][2] is None
    for k, (coords, labels, mask_input, _) in enumerate(calls):
        assert coords.shape == (k + 1, 2) and labels.shape == (k + 1,)
        assert coords.dtype == np.float32 and labels.dtype == np.int32
        assert mask_input is None if k == 0 else mask_input.shape == (1, 16, 16)
    # The kept candidate (index 1) is fed back as the mask prompt.
    assert calls[1][2].shape == (1, 16, 16)
    assert calls[1][2][0, 3, 4] == 0.0 and calls[1][2][0, 5, 5] == 1.0

    other = {"iou": [0.5, 0.5, 0.5, 0.5], "biou": [0.25, 0.5, 0.75, 1.0], "clicks": []}
    summary = interactive.summarize([out, other])
    assert summary["num_masks"] == 2
    np.testing.assert_allclose(summary["miou"], [100 * (63 / 64 + 0.5) / 2, 75, 75, 75])
    np.testing.assert_allclose(
        summary["mbiou"], [50 * (out["biou"][0] + 0.25), 50 * (1 + 0.5), 87.5, 100]
    )
    path = tmp_path / "plots" / "clicks.png"
    plots.plot_metric_vs_clicks(summary, path)
    assert path.stat().st_size > 1000
