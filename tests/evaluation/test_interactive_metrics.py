"""Interactive evaluation: mask IoU, boundary IoU, centre-of-error clicks (docs/sum.md §8.2-8.3,
§9 items 14-15) and the click loop with a fake predict function."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.evaluation import interactive, metrics, plots
from amsam_jax.predictor import SamPredictor


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


# ---------------------------------------------------------------- the episode, re-implemented


def _inner_distance_sq_brute_force(mask: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of each mask pixel to the nearest non-mask pixel, where the
    pixels outside the image are non-mask (the nearest of those is straight across the border)."""
    h, w = mask.shape
    rows, cols = np.mgrid[:h, :w]
    border = np.minimum.reduce([rows + 1, cols + 1, h - rows, w - cols]) ** 2
    bg_rows, bg_cols = np.nonzero(~mask)
    to_bg = (rows[..., None] - bg_rows) ** 2 + (cols[..., None] - bg_cols) ** 2  # (H, W, |bg|)
    nearest = np.minimum(border, to_bg.min(-1)) if len(bg_rows) else border
    return np.where(mask, nearest, 0)


def _click_brute_force(gt, pred):
    """docs/sum.md §8.3: ((x, y), label) of the next click, on integer squared distances."""

    def farthest(mask):
        d2 = _inner_distance_sq_brute_force(mask)
        row, col = divmod(int(np.argmax(d2)), mask.shape[1])  # first maximum in row-major order
        return (col, row), int(d2.max())

    first, _ = farthest(gt)
    if pred is None:
        return first, 1
    fn_xy, fn_max = farthest(gt & ~pred)
    fp_xy, fp_max = farthest(~gt & pred)
    if fn_max == 0 and fp_max == 0:
        return first, 1  # no error pixel: the click-1 point again, positive
    return (fn_xy, 1) if fn_max > fp_max else (fp_xy, 0)  # a tie goes to FP


def _episode_brute_force(predictor, gt, num_clicks, task):
    """docs/sum.md §8.3 on a SamPredictor: per round (IoU, boundary IoU, click)."""
    d = max(1, int(round(0.02 * np.hypot(*gt.shape))))
    coords, labels, rounds = [], [], []
    pred = mask_input = None
    for k in range(num_clicks):
        xy, label = _click_brute_force(gt, pred)
        coords.append(xy)
        labels.append(label)
        logits, iou_pred, low_res = predictor.predict(
            point_coords=np.array(coords, np.float32),
            point_labels=np.array(labels, np.int32),
            mask_input=mask_input,
            multimask_output=k == 0,  # click 1: three masks, keep the best predicted IoU
            return_logits=True,
            task=task,
        )
        best = int(np.argmax(iou_pred)) if k == 0 else 0
        pred = np.asarray(logits[best]) > 0
        mask_input = np.asarray(low_res[best])[None]  # the kept mask's low-res logits
        union = (gt | pred).sum()
        iou = 1.0 if union == 0 else (gt & pred).sum() / union
        rounds.append((iou, _biou_brute_force(gt, pred, d), (*xy, label), best))
    return rounds


@pytest.fixture(scope="module")
def episode_setup():
    """A tiny random SAM with a non-zero task row 2, a 44 x 52 image and three GT masks."""
    cfg = SamConfig.tiny()
    sam = build_sam(cfg, seed=10)
    row = sam.prompt_encoder.task_prompt_embedding[2].weight
    row[...] = jnp.asarray(np.random.default_rng(4).normal(0, 1, row.shape), jnp.float32)
    rng = np.random.default_rng(5)
    image = (ndimage.gaussian_filter(rng.random((44, 52, 3)), (3, 3, 0)) * 255).astype(np.uint8)
    masks = np.zeros((3, 44, 52), bool)
    masks[0, 6:30, 8:27] = True  # a rectangle
    masks[1] = _blobs(6, (44, 52))  # several components
    masks[2, 20:, 30:] = True  # touching the bottom-right border
    masks[2, 30:38, 40:47] = False  # with a hole
    return sam, interactive.EvalImage("img", image, masks, task=2)


def test_evaluate_interactive_equals_independent_episode_per_round(episode_setup):
    # The whole protocol (evaluate_interactive -> simulate_clicks -> next_click, metrics) against
    # docs/sum.md §8.3 re-implemented here: brute-force distances instead of the EDT, the same
    # SamPredictor called directly. Catches a click placed on the wrong error set or with the
    # wrong label, a tie not going to FP, (row, col) swapped, click 1 not the multimask
    # best-IoU mask, a wrong or missing mask prompt (e.g. the best of the 3 not kept, or the
    # logits of round k-2), clicks dropped from the prompt, the task id not passed ("matched"
    # must use the benchmark's id 2, whose row is non-zero) and IoU/boundary IoU per round.
    # Evaluation has no mask-only rounds and no random draws (§8.3): those are §7.2's training
    # episode, which tests/sum/test_sum_step.py covers.
    sam, item = episode_setup
    clicks = 5
    out = interactive.evaluate_interactive(sam, [item], clicks, tasks=("none", "matched"))
    predictor = SamPredictor(sam)
    predictor.set_image(item.image)
    rows = {(r["task"], r["mask"]): r for r in out["per_mask"]}
    labels, kept, per_task = set(), set(), {}
    for t, tid in (("none", None), ("matched", 2)):
        ious, bious = [], []
        for k, gt in enumerate(item.masks):
            want = _episode_brute_force(predictor, gt, clicks, tid)
            got = rows[(t, k)]
            assert got["task_id"] == tid
            np.testing.assert_allclose(got["iou"], [100 * w[0] for w in want], rtol=1e-12)
            np.testing.assert_allclose(got["biou"], [100 * w[1] for w in want], rtol=1e-12)
            # The clicks themselves, through simulate_clicks on the same predictor.
            predict = functools.partial(_predictor_fn, predictor, tid)
            sim = interactive.simulate_clicks(predict, gt, clicks)
            assert sim["clicks"] == [w[2] for w in want]
            labels |= {w[2][2] for w in want}
            kept.add(want[0][3])
            ious.append([w[0] for w in want])
            bious.append([w[1] for w in want])
        np.testing.assert_allclose(out[f"task_{t}"]["miou"], 100 * np.mean(ious, 0), rtol=1e-12)
        np.testing.assert_allclose(out[f"task_{t}"]["mbiou"], 100 * np.mean(bious, 0), rtol=1e-12)
        per_task[t] = ious
    # Not vacuous: both click labels occur, the IoU changes over the rounds, and the task row
    # changes the result.
    assert labels == {0, 1}
    assert any(len(set(r)) > 1 for r in per_task["none"])
    assert not np.allclose(per_task["none"], per_task["matched"])
    assert kept != {0}, kept


def _predictor_fn(predictor, task, coords, labels, mask_input, multimask):
    return predictor.predict(
        point_coords=coords,
        point_labels=labels,
        mask_input=mask_input,
        multimask_output=multimask,
        return_logits=True,
        task=task,
    )
