"""SUM's loss, uncertainty map and samplers (docs/sum.md §9 items 1-11, 15, 17) on small grids."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from amsam_jax.sum import loss as sum_loss
from amsam_jax.sum import sampling, uncertainty

S = 16
M = 3


def _rand(seed, shape, low=-4.0, high=4.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _masks(seed, shape=(M, S, S)):
    return np.random.default_rng(seed).random(shape) < 0.4


# One jitted function per kind, reused across tests so each shape compiles once.
focal_fn = jax.jit(sum_loss.focal_loss_per_mask)
dice_fn = jax.jit(sum_loss.dice_loss_per_mask)
focal_grad = jax.jit(jax.grad(lambda x, y, u, v: jnp.sum(sum_loss.focal_loss_per_mask(x, y, u, v))))
dice_grad = jax.jit(jax.grad(lambda x, y, u, v: jnp.sum(sum_loss.dice_loss_per_mask(x, y, u, v))))
ref_focal = jax.jit(sum_loss.reference_focal_loss)
ref_dice = jax.jit(sum_loss.reference_dice_loss)
ref_focal_grad = jax.jit(jax.grad(lambda x, y: jnp.sum(ref_focal(x, y))))
ref_dice_grad = jax.jit(jax.grad(lambda x, y: jnp.sum(ref_dice(x, y))))
loss_fn = jax.jit(sum_loss.sum_loss, static_argnames="cfg")
loss_and_grad = jax.jit(jax.value_and_grad(sum_loss.sum_loss, has_aux=True), static_argnames="cfg")
first_fn = jax.jit(sampling.sample_first_point, static_argnames=("hard_threshold", "grid_scale"))
corr_fn = jax.jit(
    sampling.sample_corrective_point, static_argnames=("hard_threshold", "grid_scale")
)
FULL = np.full((M, 2), S, np.int32)  # valid_hw covering the whole frame
IOU_ONLY = sum_loss.SumLossConfig(lambda_focal=0.0, lambda_dice=0.0, lambda_iou=1.0)


# ---------------------------------------------------------------- §9.1 uncertainty map


def test_uncertainty_in_unit_interval_symmetric_zero_on_equal_and_none():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, S, S), dtype=np.uint8)
    b = rng.integers(0, 256, (2, S, S), dtype=np.uint8)
    b[0, :2] = 255 - a[0, :2].astype(np.int64)  # includes |0 - 255| = 1 extremes
    a[0, 0, 0], b[0, 0, 0] = 0, 255
    u_ab = np.asarray(uncertainty.uncertainty_map(a, b, S))
    assert u_ab.min() >= 0.0 and u_ab.max() <= 1.0 and u_ab[0, 0, 0] == 1.0
    np.testing.assert_array_equal(u_ab, np.asarray(uncertainty.uncertainty_map(b, a, S)))
    np.testing.assert_allclose(u_ab, np.abs(a / 255.0 - b / 255.0), atol=1e-6)
    assert not np.asarray(uncertainty.uncertainty_map(a, a, S)).any()
    np.testing.assert_array_equal(np.asarray(uncertainty.uncertainty_map(a, None, S)), 0.0)


def test_uncertainty_upsamples_refined_map_bilinear_half_pixel():
    rng = np.random.default_rng(1)
    p_sam = rng.integers(0, 256, (2, S, S), dtype=np.uint8)
    p_ref = rng.integers(0, 256, (2, S // 4, S // 4), dtype=np.uint8)
    u = np.asarray(uncertainty.uncertainty_map(p_sam, p_ref, S))
    # Upsampling: jax.image.resize's bilinear has half-pixel centres and no antialias effect.
    up = np.asarray(jax.image.resize(p_ref / 255.0, (2, S, S), "bilinear"))
    np.testing.assert_allclose(u, np.abs(p_sam / 255.0 - up), atol=1e-6)
    assert u.min() >= 0.0 and u.max() <= 1.0


def test_zero_missing_maps_zeroes_rows_and_counts_them():
    u = jnp.full((4, S, S), 0.3)
    out, count = uncertainty.zero_missing_maps(u, jnp.array([True, False, True, False]))
    out = np.asarray(out)
    assert int(count) == 2
    assert (out[[1, 3]] == 0).all() and np.allclose(out[[0, 2]], 0.3)


# ---------------------------------------------------------------- §9.2-5 loss


def test_zero_uncertainty_equals_plain_focal_and_dice_in_value_and_gradient():
    x, y = _rand(0, (M, S, S)), _masks(1)
    u0 = np.zeros((M, S, S), np.float32)
    np.testing.assert_allclose(focal_fn(x, y, u0, FULL), ref_focal(x, y), rtol=1e-5)
    np.testing.assert_allclose(dice_fn(x, y, u0, FULL), ref_dice(x, y), 1e-6)
    np.testing.assert_allclose(
        focal_grad(x, y, u0, FULL), ref_focal_grad(x, y), rtol=1e-4, atol=1e-10
    )
    np.testing.assert_allclose(dice_grad(x, y, u0, FULL), ref_dice_grad(x, y), rtol=1e-4, atol=1e-9)
    # A wrong target must change the value (the reference check is not vacuous).
    assert not np.allclose(focal_fn(x, ~y, u0, FULL), ref_focal(x, y))


def test_focal_matches_torchvision_formula_at_large_logits():
    x = np.array([[[-30.0, -5.0, 0.0, 5.0, 30.0, 80.0]]], np.float32)
    y = np.array([[[1, 0, 1, 1, 0, 1]]], bool)
    p = 1 / (1 + np.exp(-x.astype(np.float64)))
    ce = np.logaddexp(0, x.astype(np.float64)) - x * y
    p_t = p * y + (1 - p) * (1 - y)
    expect = ((0.25 * y + 0.75 * (1 - y)) * (1 - p_t) ** 2 * ce).mean()
    got = focal_fn(x, y)
    np.testing.assert_allclose(got, [expect], rtol=1e-5)


def test_full_uncertainty_gives_zero_focal_with_zero_gradient():
    x, y = _rand(2, (M, S, S)), _masks(3)
    u1 = np.ones((M, S, S), np.float32)
    np.testing.assert_array_equal(focal_fn(x, y, u1, FULL), 0.0)
    np.testing.assert_array_equal(focal_grad(x, y, u1, FULL), 0.0)


def test_uncertainty_at_least_half_everywhere_gives_dice_exactly_zero():
    x, y = _rand(4, (M, S, S)), _masks(5)
    u = np.random.default_rng(6).uniform(0.5, 1.0, (M, S, S)).astype(np.float32)
    u[:, 0, 0] = 0.5  # the threshold itself is excluded
    np.testing.assert_array_equal(dice_fn(x, y, u, FULL), 0.0)
    np.testing.assert_array_equal(dice_grad(x, y, u, FULL), 0.0)
    u[:, 0, 0] = 0.49  # one certain pixel brings the dice back
    assert (np.asarray(dice_fn(x, y, u, FULL)) != 0.0).any()


def test_focal_gradient_scales_per_pixel_by_one_minus_u():
    x, y = _rand(7, (M, S, S)), _masks(8)
    u = np.random.default_rng(9).uniform(0.0, 1.0, (M, S, S)).astype(np.float32)
    g0 = np.asarray(focal_grad(x, y, np.zeros_like(u), FULL))
    gu = np.asarray(focal_grad(x, y, u, FULL))
    np.testing.assert_allclose(gu, g0 * (1 - u), rtol=1e-5, atol=1e-12)
    assert np.abs(g0).min() > 0  # every pixel carries a gradient to scale


def test_dice_ignores_pixels_with_uncertainty_at_least_half():
    x, y = _rand(10, (M, S, S)), _masks(11)
    u = np.zeros((M, S, S), np.float32)
    u[:, :, : S // 2] = 0.75
    u[:, 0, S // 2] = 0.5
    uncertain = u >= 0.5
    g = np.asarray(dice_grad(x, y, u, FULL))
    assert (g[uncertain] == 0).all() and (g[~uncertain] != 0).all()
    base = np.asarray(dice_fn(x, y, u, FULL))
    x2 = np.where(uncertain, _rand(12, (M, S, S)), x)
    y2 = np.where(uncertain, ~y, y)
    np.testing.assert_array_equal(dice_fn(x2, y2, u, FULL), base)
    # The same change on certain pixels does move the loss.
    y3 = np.where(~uncertain, ~y, y)
    assert not np.allclose(dice_fn(x, y3, u, FULL), base)


def test_focal_normalised_by_pixel_count_not_by_certainty():
    x = np.full((M, S, S), 2.0, np.float32)  # uniform error: all logits 2, all targets 0
    y = np.zeros((M, S, S), bool)
    u = np.zeros((M, S, S), np.float32)
    full = np.asarray(focal_fn(x, y, u, FULL))
    u[:, : S // 2] = 1.0
    np.testing.assert_allclose(focal_fn(x, y, u, FULL), full / 2, rtol=1e-6)


def test_padded_valid_region_equals_cropped_computation():
    x, y = _rand(13, (2, S, S)), _masks(14, (2, S, S))
    u = np.random.default_rng(15).uniform(0, 1, (2, S, S)).astype(np.float32)
    iou_pred = np.array([0.3, 0.8], np.float32)
    hw = np.array([[10, 13], [S, 7]], np.int32)
    (_, padded), grad_padded = loss_and_grad(x, y, u, hw, iou_pred)
    grad_padded = np.asarray(grad_padded)
    per_mask = []
    for i, (h, w) in enumerate(hw):
        crop = (slice(i, i + 1), slice(0, h), slice(0, w))
        (_, metrics), g = loss_and_grad(x[crop], y[crop], u[crop], None, iou_pred[i : i + 1])
        per_mask.append(metrics)
        # The padded loss averages two masks, hence the factor 1/2 on each mask's gradient.
        np.testing.assert_allclose(grad_padded[crop], np.asarray(g) / 2, rtol=1e-5, atol=1e-12)
        outside = np.ones((S, S), bool)
        outside[:h, :w] = False
        assert (grad_padded[i][outside] == 0).all()
    for key in ("focal", "dice", "iou", "loss"):
        cropped = np.mean([float(m[key]) for m in per_mask])
        np.testing.assert_allclose(float(padded[key]), cropped, rtol=1e-6)
    # Without the valid region the padding counts, and the loss differs.
    _, unmasked = loss_fn(x, y, u, None, iou_pred)
    assert not np.isclose(float(unmasked["loss"]), float(padded["loss"]))


def test_sum_loss_composition_iou_target_and_mask_weight():
    x, y = _rand(16, (2, S, S)), _masks(17, (2, S, S))
    iou_pred = np.array([0.25, 0.5], np.float32)
    cfg = sum_loss.SumLossConfig(lambda_focal=20.0, lambda_dice=1.0, lambda_iou=1.0)
    total, metrics = loss_fn(x, y, None, None, iou_pred, cfg=cfg)
    pred = x >= 0
    iou_t = (pred & y).sum((1, 2)) / ((pred | y).sum((1, 2)) + 1e-7)
    focal = np.asarray(ref_focal(x, y))
    dice = np.asarray(ref_dice(x, y))
    per_mask = 20 * focal + dice + (iou_pred - iou_t) ** 2
    np.testing.assert_allclose(float(total), per_mask.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["iou"]), ((iou_pred - iou_t) ** 2).mean(), rtol=1e-5)
    weighted, _ = loss_fn(x, y, None, None, iou_pred, np.array([0.0, 1.0], np.float32), cfg=cfg)
    np.testing.assert_allclose(float(weighted), per_mask[1], rtol=1e-5)
    # A padding mask with an empty valid region (0, 0) stays finite and is weighted out.
    hw = np.array([[0, 0], [S, S]], np.int32)
    y255 = y.astype(np.uint8) * 255  # uint8 0/255 targets read as binary
    padded, _ = loss_fn(x, y255, None, hw, iou_pred, np.array([0.0, 1.0], np.float32), cfg=cfg)
    np.testing.assert_allclose(float(padded), per_mask[1], rtol=1e-5)
    # The IoU target carries no gradient: the IoU term's gradient wrt the logits is zero.
    _, g = loss_and_grad(x, y, None, None, iou_pred, cfg=IOU_ONLY)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_upsampling_keeps_sign_of_constant_logits():
    low = np.stack([np.full((4, 4), -0.3), np.full((4, 4), 0.7)]).astype(np.float32)
    up = np.asarray(sum_loss.upsample_logits(low, S))
    assert up.shape == (2, S, S)
    assert (up[0] < 0).all() and (up[1] > 0).all()
    np.testing.assert_allclose(up[0], -0.3, rtol=1e-6)


# ---------------------------------------------------------------- §6 loss, independent of loss.py


def _numpy_sum_loss(x, y, u, hw, iou_pred, weight, dice_mode="hard"):
    """docs/sum.md §6.1-6.4 written out in float64 NumPy on the cropped (h, w) arrays.

    Returns (loss, focal, dice, iou): the weighted mean over masks and the (M,) terms.
    """
    x, u = x.astype(np.float64), u.astype(np.float64)
    alpha, gamma = 0.25, 2.0
    focal, dice, iou = [], [], []
    for i, (h, w) in enumerate(hw):
        xi, yi, ui = x[i, :h, :w], y[i, :h, :w].astype(np.float64), u[i, :h, :w]
        s = 1.0 / (1.0 + np.exp(-xi))
        # ce = -[y log s + (1 - y) log(1 - s)], with log s = -log(1 + e^-x) and
        # log(1 - s) = -log(1 + e^x) so that |x| = 30 stays finite in float64.
        ce = yi * np.logaddexp(0.0, -xi) + (1 - yi) * np.logaddexp(0.0, xi)
        p_t = s * yi + (1 - s) * (1 - yi)
        fl = (alpha * yi + (1 - alpha) * (1 - yi)) * (1 - p_t) ** gamma * ce
        focal.append(((1 - ui) * fl).sum() / max(h * w, 1))
        if dice_mode == "hard":
            k = ((1 - ui) > 0.5).astype(np.float64)
            inter, total = (k * yi * s).sum(), (k * yi).sum() + (k * s).sum()
        else:  # y and s each multiplied by (1 - U)
            inter = ((1 - ui) * yi * (1 - ui) * s).sum()
            total = ((1 - ui) * yi).sum() + ((1 - ui) * s).sum()
        dice.append(1 - (2 * inter + 1) / (total + 1))
        pred = (s >= 0.5).astype(np.float64)
        i_t = (pred * yi).sum() / (pred.sum() + yi.sum() - (pred * yi).sum() + 1e-7)
        iou.append((iou_pred[i] - i_t) ** 2)
    focal, dice, iou = np.array(focal), np.array(dice), np.array(iou)
    per_mask = 20 * focal + 1 * dice + 1 * iou
    loss = (weight * per_mask).sum() / max(weight.sum(), 1.0)
    return loss, focal, dice, iou


def _uncertainty_maps(rng, shape):
    """Named U maps: continuous, the 0.5 boundary, mixed certain/uncertain, all 0, all 1."""
    boundary = rng.choice(np.array([0.0, 0.49, 0.5, 0.51, 1.0]), shape)
    blocks = np.zeros(shape)
    blocks[:, : shape[1] // 2] = 1.0
    return {
        "uniform": rng.uniform(0.0, 1.0, shape),
        "boundary": boundary,
        "half_uncertain": blocks,
        "all_certain": np.zeros(shape),
        "all_uncertain": np.ones(shape),
    }


def test_sum_loss_equals_numpy_formula_of_docs_at_several_uncertainty_maps():
    # The docs' formula, computed here without loss.py (its reference_* helpers included), on
    # masks that are random, empty (y = 0), full (y = 1) and a padding mask with an empty valid
    # region, at continuous and edge-case U maps, in both dice modes. Catches a focal term
    # normalised by sum(1 - U) or left unweighted, a dice mask at U <= 0.5 or a soft weight, a
    # swapped alpha, an IoU target at s > 0.5, a wrong lambda and padding pixels or masks
    # entering a sum or the average.
    rng = np.random.default_rng(30)
    m = 5
    x = rng.uniform(-6.0, 6.0, (m, S, S)).astype(np.float32)
    x[:, 0, :6] = [-30.0, -5.0, 0.0, 5.0, 30.0, 80.0]  # large |x| and the s = 0.5 tie
    y = rng.random((m, S, S)) < 0.4
    y[1] = False  # an empty mask
    y[2] = True  # a full one
    hw = np.array([[S, S], [11, 13], [S, 7], [5, S], [0, 0]], np.int32)
    weight = np.array([1.0, 1.0, 1.0, 1.0, 0.0], np.float32)  # the last mask is padding
    iou_pred = rng.uniform(0.0, 1.0, m).astype(np.float32)
    for dice_mode in ("hard", "soft"):
        cfg = sum_loss.SumLossConfig(dice_mode=dice_mode)
        for name, u in _uncertainty_maps(rng, (m, S, S)).items():
            u = u.astype(np.float32)
            loss, metrics = loss_fn(x, y, u, hw, iou_pred, weight, cfg=cfg)
            want, focal, dice, iou = _numpy_sum_loss(x, y, u, hw, iou_pred, weight, dice_mode)
            real = weight > 0
            err = f"{dice_mode} {name}"
            np.testing.assert_allclose(float(loss), want, rtol=2e-6, atol=1e-7, err_msg=err)
            for key, terms in (("focal", focal), ("dice", dice), ("iou", iou)):
                np.testing.assert_allclose(
                    float(metrics[key]), terms[real].mean(), rtol=2e-6, atol=1e-7, err_msg=err
                )
            np.testing.assert_allclose(
                focal_fn(x, y, u, hw), focal, rtol=2e-6, atol=1e-9, err_msg=err
            )
            got_dice = sum_loss.dice_loss_per_mask(x, y, u, hw, mode=dice_mode)
            np.testing.assert_allclose(got_dice, dice, rtol=2e-6, atol=1e-7, err_msg=err)
            if name == "all_uncertain":  # the edge cases are not vacuous: both terms vanish
                assert not focal.any() and not dice.any()
    # use_uncertainty=False: U is ignored, i.e. the formula at U = 0.
    u = rng.uniform(0.0, 1.0, (m, S, S)).astype(np.float32)
    loss, _ = loss_fn(
        x, y, u, hw, iou_pred, weight, cfg=sum_loss.SumLossConfig(use_uncertainty=False)
    )
    want = _numpy_sum_loss(x, y, np.zeros_like(u), hw, iou_pred, weight)[0]
    np.testing.assert_allclose(float(loss), want, rtol=2e-6)


def test_sum_loss_gradient_equals_central_difference_of_numpy_formula():
    # The gradient of the stable float32 rewrite (softplus and sigmoid of x(1 - 2y)) against a
    # float64 central difference of the docs' formula, at pixels that are certain, uncertain,
    # at U = 0.5 and outside the valid region (gradient 0). Catches a rewrite that has the
    # right value but a wrong derivative, e.g. a stop-gradient on 1 - p_t.
    rng = np.random.default_rng(31)
    m = 2
    x = rng.uniform(-4.0, 4.0, (m, S, S)).astype(np.float32)
    y = rng.random((m, S, S)) < 0.5
    u = rng.uniform(0.0, 1.0, (m, S, S)).astype(np.float32)
    u[0, 3, 4] = 0.5
    hw = np.array([[S, S], [10, 12]], np.int32)
    iou_pred = np.array([0.3, 0.6], np.float32)
    weight = np.ones(m, np.float32)
    _, g = loss_and_grad(x, y, u, hw, iou_pred, weight)
    g = np.asarray(g)
    # U = 0.5, two pixels outside mask 1's valid region, then random pixels inside both.
    pixels = [(0, 3, 4), (1, 12, 3), (1, 2, 14)]
    pixels += [tuple(p) for p in rng.integers(0, [2, 10, 12], (12, 3))]
    eps = 1e-5
    for i, r, c in pixels:
        xp, xm = x.astype(np.float64), x.astype(np.float64)
        xp[i, r, c] += eps
        xm[i, r, c] -= eps
        # The IoU target has no gradient; the step never crosses x = 0 at these pixels.
        fd = (
            _numpy_sum_loss(xp, y, u, hw, iou_pred, weight)[0]
            - _numpy_sum_loss(xm, y, u, hw, iou_pred, weight)[0]
        ) / (2 * eps)
        inside = r < hw[i, 0] and c < hw[i, 1]
        if not inside:
            assert g[i, r, c] == 0.0
        np.testing.assert_allclose(g[i, r, c], fd, rtol=1e-3, atol=1e-7, err_msg=f"{(i, r, c)}")


# ---------------------------------------------------------------- §9.6-9 samplers


def _draws(fn, num, *args, **kwargs):
    """num independent draws (vmapped over keys) of a sampler: coords (num, M, 2), labels."""
    keys = jax.random.split(jax.random.key(0), num)
    return jax.vmap(lambda k: fn(k, *args, **kwargs))(keys)


def _at(arr, coords):
    """Values of arr (N?, M, H, W) broadcast against coords (N, M, 2) = (x, y)."""
    cols, rows = coords[..., 0].astype(int), coords[..., 1].astype(int)
    m = np.arange(coords.shape[1])[None, :]
    return arr[m, rows, cols]


def _sampler_fixture():
    rng = np.random.default_rng(20)
    y = rng.random((M, S, S)) < 0.5
    u = rng.uniform(0, 1, (M, S, S)).astype(np.float32)
    u[rng.random((M, S, S)) < 0.3] = 1.0
    hw = np.array([[S, S], [10, 12], [S, 5]], np.int32)
    backup = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
    return y, u, hw, backup


def test_first_point_is_positive_certain_and_inside_valid_region():
    y, u, hw, backup = _sampler_fixture()
    coords, labels = _draws(first_fn, 300, y, backup, u, hw)
    coords, labels = np.asarray(coords), np.asarray(labels)
    assert coords.shape == (300, M, 2) and coords.dtype == np.float32
    assert (labels == 1).all() and labels.dtype == np.int32
    assert _at(y, coords).all()
    assert (_at(u, coords) < 1.0).all()
    assert (coords[..., 0] < hw[:, 1]).all() and (coords[..., 1] < hw[:, 0]).all()
    assert len({tuple(c) for c in coords[:, 0]}) > 20  # it does sample, not a constant


def test_first_point_falls_back_on_empty_or_fully_uncertain_mask():
    y, u, hw, backup = _sampler_fixture()
    y[0] = False  # empty
    u[1] = np.where(y[1], 1.0, u[1])  # every candidate has weight 0
    y[2, :, 5:] = False  # candidates only outside the valid region (columns >= 5)
    y[2, :, :5] = False
    y[2, 3, 9] = True
    coords, labels = first_fn(jax.random.key(1), y, backup, u, hw)
    np.testing.assert_array_equal(coords, backup)
    np.testing.assert_array_equal(labels, 1)


def test_corrective_point_in_error_set_with_label_y_and_never_on_certain_failure():
    y, u, hw, backup = _sampler_fixture()
    pred = np.random.default_rng(21).random((M, S, S)) < 0.5
    coords, labels = _draws(corr_fn, 300, y, pred, backup, u, hw)
    coords, labels = np.asarray(coords), np.asarray(labels)
    assert (_at(y, coords) != _at(pred, coords)).all()
    np.testing.assert_array_equal(labels, _at(y, coords).astype(np.int32))
    assert (_at(u, coords) < 1.0).all()
    assert (coords[..., 0] < hw[:, 1]).all() and (coords[..., 1] < hw[:, 0]).all()
    assert set(np.unique(labels)) == {0, 1}


def test_corrective_point_falls_back_to_backup_with_label_one():
    y, u, hw, backup = _sampler_fixture()
    pred = y.copy()
    pred[1] = ~y[1]
    u[1] = 1.0  # all errors fully uncertain
    pred[2, 0, 0] = ~y[2, 0, 0]
    u[2, 0, 0] = 1.0
    coords, labels = corr_fn(jax.random.key(2), y, pred, backup, u, hw)
    np.testing.assert_array_equal(coords, backup)
    np.testing.assert_array_equal(labels, 1)


def test_hard_threshold_excludes_pixels_at_or_above_tau():
    y, u, hw, backup = _sampler_fixture()
    coords, _ = _draws(first_fn, 200, y, backup, u, hw, hard_threshold=0.5)
    assert (_at(u, np.asarray(coords)) < 0.5).all()


def _chi2_pvalue(coords, probs):
    cols, rows = np.asarray(coords)[:, 0, 0], np.asarray(coords)[:, 0, 1]
    idx = rows.astype(int) * probs.shape[1] + cols.astype(int)
    counts = np.bincount(idx, minlength=probs.size)
    p = probs.ravel().astype(np.float64)
    assert counts[p == 0].sum() == 0
    expected = p[p > 0] / p[p > 0].sum() * len(idx)
    return stats.chisquare(counts[p > 0], expected).pvalue


def test_weighted_first_point_frequencies_proportional_to_one_minus_u():
    u = np.array([[[0.0, 0.5, 0.75], [0.9, 1.0, 0.2]]], np.float32)
    y = np.ones((1, 2, 3), bool)
    y[0, 0, 2] = False  # not a candidate despite its weight
    coords, _ = _draws(first_fn, 100_000, y, np.zeros((1, 2), np.float32), u)
    w = (1 - u[0]) * y[0]
    assert _chi2_pvalue(coords, w / w.sum()) > 1e-3
    # The same draws are far from uniform (the test has power).
    assert _chi2_pvalue(coords, (w > 0) / (w > 0).sum()) < 1e-6


def test_uniform_corrective_point_frequencies_uniform_over_errors():
    y = np.array([[[1, 1, 0], [0, 1, 0]]], bool)
    pred = np.array([[[0, 1, 1], [1, 0, 0]]], bool)  # errors: (0,0) FN, (0,2) FP, (1,0) FP, (1,1)
    coords, _ = _draws(corr_fn, 100_000, y, pred, np.zeros((1, 2), np.float32))
    err = (y != pred)[0]
    assert _chi2_pvalue(coords, err / err.sum()) > 1e-3


def test_points_are_column_row_and_grid_scale_maps_to_pixel_centres():
    y = np.zeros((1, S, S), bool)
    y[0, 3, 11] = True
    b = np.zeros((1, 2), np.float32)
    coords, _ = first_fn(jax.random.key(3), y, b)
    np.testing.assert_array_equal(coords, [[11.0, 3.0]])
    coords, labels = corr_fn(jax.random.key(3), y, np.zeros_like(y), b)
    np.testing.assert_array_equal(coords, [[11.0, 3.0]])
    np.testing.assert_array_equal(labels, [1])
    coords, _ = first_fn(jax.random.key(3), y, b, grid_scale=4)
    np.testing.assert_array_equal(coords, [[4 * 11 + 1.5, 4 * 3 + 1.5]])


def test_same_key_same_points_under_jit_and_masks_use_independent_keys():
    y, u, hw, backup = _sampler_fixture()
    a = first_fn(jax.random.key(5), y, backup, u, hw)
    b = first_fn(jax.random.key(5), y, backup, u, hw)
    c = first_fn(jax.random.key(6), y, backup, u, hw)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    pred = np.zeros_like(y)
    np.testing.assert_array_equal(
        corr_fn(jax.random.key(5), y, pred, backup, u, hw)[0],
        corr_fn(jax.random.key(5), y, pred, backup, u, hw)[0],
    )
    # Identical masks get different points (per-mask fold_in keys).
    same = np.repeat(np.ones((1, S, S), bool), M, axis=0)
    pts = np.asarray(first_fn(jax.random.key(7), same, backup, None, FULL)[0])
    assert len({tuple(p) for p in pts}) == M


# ---------------------------------------------------------------- §9.10 accumulation


def test_accumulation_shapes_and_earlier_entries_bit_identical():
    y, u, hw, backup = _sampler_fixture()
    coords, labels = None, None
    history = []
    for r in range(1, 5):
        new_c, new_l = corr_fn(jax.random.key(r), y, np.zeros_like(y), backup, u, hw)
        coords, labels = sampling.append_point(coords, labels, new_c, new_l)
        assert coords.shape == (M, r, 2) and labels.shape == (M, r)
        assert coords.dtype == jnp.float32 and labels.dtype == jnp.int32
        for j, (c, lab) in enumerate(history):
            assert np.array_equal(np.asarray(coords[:, j]), c)
            assert np.array_equal(np.asarray(labels[:, j]), lab)
        np.testing.assert_array_equal(coords[:, -1], new_c)
        history.append((np.asarray(new_c), np.asarray(new_l)))


# ---------------------------------------------------------------- §9.11 boxes


def test_box_from_mask_inclusive_extent_and_empty_mask():
    y = np.zeros((2, S, S), bool)
    y[0, 2:7, 4:12] = True
    y[0, 9, 1] = True
    np.testing.assert_array_equal(sampling.box_from_mask(y), [[1, 2, 11, 9], [0, 0, 0, 0]])


jitter_fn = jax.jit(jax.vmap(sampling.jitter_box, in_axes=(0, None, None, None)), static_argnums=3)


def test_sum_box_jitter_is_a_capped_nonnegative_translation_inside_image():
    h, w = 300, 400
    boxes = np.array(
        [[10, 20, 310, 220], [0, 0, 5, 3], [350, 250, 399, 299], [100, 50, 120, 90]], np.float32
    )
    out = np.asarray(jitter_fn(jax.random.split(jax.random.key(8), 2000), boxes, (h, w), "sum"))
    shift = out - boxes
    assert (out >= 0).all() and (out[..., [0, 2]] <= w).all() and (out[..., [1, 3]] <= h).all()
    assert (shift >= 0).all() and (shift <= 20).all()
    unclipped = (boxes[None, :, [2, 3]] + shift[..., [0, 1]] < [w, h]).all(-1)
    np.testing.assert_allclose(shift[unclipped][:, :2], shift[unclipped][:, 2:], atol=1e-4)
    assert (shift[:, 0] == 20).any() and (shift[:, 0] == 0).any()  # cap and clip-at-0 both hit
    # Box 2 pushed past the image edge is clipped to W and H.
    assert (out[:, 2, 2] == w).any() and (out[:, 2, 3] == h).any()


def test_sam_box_jitter_symmetric_capped_per_coordinate_and_ordered():
    h, w = 300, 400
    boxes = np.array([[10, 20, 310, 220], [100, 50, 120, 90]], np.float32)
    out = np.asarray(jitter_fn(jax.random.split(jax.random.key(9), 2000), boxes, (h, w), "sam"))
    noise = out - boxes
    assert (np.abs(noise) <= 20 + 1e-4).all()
    assert (noise < 0).any() and (noise > 0).any()
    assert not np.allclose(noise[..., 0], noise[..., 2])  # corners move independently
    assert (out[..., 0] <= out[..., 2]).all() and (out[..., 1] <= out[..., 3]).all()
    assert (out >= 0).all() and (out[..., [0, 2]] <= w).all() and (out[..., [1, 3]] <= h).all()
