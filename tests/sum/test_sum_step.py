"""The SUM interactive step (docs/sum.md §7.2, §9 item 16) on a tiny random SAM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.sum.data import Entry, Shapes, make_batch, pick, to_frame
from amsam_jax.sum.loss import SumLossConfig, sum_loss, upsample_logits
from amsam_jax.sum.recipes import sum_recipe
from amsam_jax.sum.refiner import prob_to_mask_prompt
from amsam_jax.sum.step import (
    SumStepConfig,
    decode,
    episode_inputs,
    lr_schedule,
    make_optimizers,
    make_sum_step,
    split_sum_model,
)
from amsam_jax.sum.trainer import step_config

CFG = SamConfig.tiny()
S, L = CFG.image_size, 4 * CFG.grid_size


@pytest.fixture(scope="module")
def sam():
    return build_sam(CFG, seed=1)


def _entries(rng, n=2, k=3, task=1, refined=False):
    out = []
    for i in range(n):
        h, w = (120, 200) if i % 2 else (200, 150)
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        prob = (
            np.stack(
                [
                    (
                        255
                        / (1 + np.exp((np.hypot(yy - h / 2 + 10 * j, xx - w / 2) - 25 - 8 * j) / 3))
                    )
                    for j in range(k)
                ]
            )
            .round()
            .astype(np.uint8)
        )
        ref = has = None
        if refined:
            ref = rng.integers(0, 255, (k, L, L), dtype=np.uint8)
            has = np.asarray([True] * (k - 1) + [False])
        out.append(Entry(f"img{i}", image, prob, task, ref, has, None))
    return out


def _batch(rng, entries, per=3):
    emb = rng.standard_normal((len(entries), CFG.grid_size, CFG.grid_size, 32)).astype(np.float32)
    return make_batch(entries, emb, Shapes(len(entries), per, S, L), rng)


def _state(t, params_tx, task_tx):
    return {
        "params": jax.tree.map(lambda x: jnp.array(x, copy=True), t.params),
        "task": jax.tree.map(lambda x: jnp.array(x, copy=True), t.task),
        "params_opt": params_tx.init(t.params),
        "task_opt": task_tx.init(t.task),
        "step": jnp.asarray(0, jnp.int32),
    }


# The smoke recipe's step, shapes and optimisers: its compilation (persistent cache) is then
# shared with the `sum:smoke` runs of test_sum_train.py.
SMOKE = sum_recipe("smoke")
STEP_CFG = step_config(SMOKE)
SMOKE_SHAPES = (1, SMOKE.train.human_masks_per_image)
# One box round, focal term only: its loss is checked against `sum_loss`, and U ≡ 1 zeroes it.
FOCAL_CFG = SumStepConfig(
    size=S,
    num_point_rounds=1,
    num_mask_only_rounds=0,
    loss=SumLossConfig(lambda_focal=20.0, lambda_dice=0.0, lambda_iou=0.0),
)


@pytest.fixture(scope="module")
def focal_step(sam):
    import optax

    t = split_sum_model(sam)
    tx = optax.sgd(1.0)
    return t, tx, make_sum_step(t.graphdef, FOCAL_CFG, tx, tx)


@pytest.fixture(scope="module")
def step_parts(sam):

    t = split_sum_model(sam)
    params_tx, task_tx = make_optimizers(SMOKE.train, 2 * SMOKE.train.steps)
    return t, params_tx, task_tx, make_sum_step(t.graphdef, STEP_CFG, params_tx, task_tx)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_make_batch_shapes_padding_and_frame(sam):
    rng = np.random.default_rng(0)
    entries = _entries(rng, n=2, k=2)
    b = _batch(rng, entries, per=3)
    assert b["prob"].shape == (6, S, S) and b["prob"].dtype == np.uint8
    np.testing.assert_array_equal(b["weight"], [1, 1, 0, 1, 1, 0])  # one padding mask per image
    np.testing.assert_array_equal(b["valid_hw"][:3], [[256, 192]] * 3)  # 200x150 -> long side 256
    np.testing.assert_array_equal(b["valid_hw"][3:], [[154, 256]] * 3)
    assert not b["prob"][0, 256 - 0 :, :].any() and not b["prob"][0, :, 192:].any()  # zero pad
    np.testing.assert_array_equal(b["image_index"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(b["prob"][0], to_frame(entries[0].prob[:1], (256, 192), S)[0])


def test_step_trains_decoder_not_task_zero_and_is_deterministic(step_parts):
    """Point-first episode (a box-first round 1 is the `focal_step` below)."""
    first_is_box = False
    t, params_tx, task_tx, step = step_parts
    rng = np.random.default_rng(1)
    batch = _batch(rng, _entries(rng, n=1, k=5, task=0), per=4)  # every task id 0 (§9.16)
    key = jax.random.key(3)
    s1, m1 = step(_state(t, params_tx, task_tx), t.frozen, batch, key, first_is_box)
    s2, m2 = step(_state(t, params_tx, task_tx), t.frozen, batch, key, first_is_box)
    assert np.isfinite(float(m1["loss"])) and float(m1["grad_norm"]) > 0
    for a, b in zip(_leaves(s1["params"]), _leaves(s2["params"]), strict=True):
        np.testing.assert_array_equal(a, b)  # same key, same result
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(_leaves(s1["params"]), _leaves(t.params), strict=True)
    ]
    assert sum(moved) > len(moved) // 2
    for a in _leaves(s1["task"]):  # ids all 0 -> the frozen row 0 is the only one used
        np.testing.assert_array_equal(a, 0.0)
    assert int(s1["step"]) == 1


def test_task_rows_in_use_train_and_row_zero_stays(step_parts):
    t, params_tx, task_tx, step = step_parts
    rng = np.random.default_rng(2)
    entries = _entries(rng, n=1, k=3, task=2)
    batch = _batch(rng, entries, per=4)
    batch["task"][1] = 0  # one mask of task 0 next to task-2 masks
    s, m = step(_state(t, params_tx, task_tx), t.frozen, batch, jax.random.key(0), False)
    table = np.concatenate(_leaves(s["task"]))
    assert float(m["task_grad_norm"]) > 0
    assert np.abs(table[2]).max() > 0
    np.testing.assert_array_equal(table[[0, 1, 3]], 0.0)


def test_single_round_loss_equals_sum_loss_on_the_same_prompt(focal_step):
    """One box round (no corrective or mask-only rounds): the step's loss is docs/sum.md §6.4."""
    t, tx, step = focal_step
    rng = np.random.default_rng(4)
    batch = _batch(rng, _entries(rng, refined=True))
    key = jax.random.key(5)
    _, m = step(_state(t, tx, tx), t.frozen, batch, key, True)
    # Independently: same box (the step's key layout), decode, upsample, sum_loss.
    from amsam_jax.sum.loss import valid_mask
    from amsam_jax.sum.sampling import box_from_mask, jitter_box
    from amsam_jax.sum.uncertainty import uncertainty_map

    y = batch["prob"] > 127
    hw = jnp.asarray(batch["valid_hw"])
    _, k_first, _, _ = jax.random.split(key, 4)
    box = jitter_box(k_first, box_from_mask(y & valid_mask(hw, y.shape)), hw, "sum", 0.1, 20.0)
    model = nnx.merge(t.graphdef, t.task, t.params, t.frozen)
    low, iou = decode(model, jnp.asarray(batch["embedding"]), batch["image_index"], None, None,
                      box, None, jnp.asarray(batch["task"]), False)  # fmt: skip
    u = uncertainty_map(batch["prob"], batch["refined"], S)
    u = jnp.where(jnp.asarray(batch["has_refined"])[:, None, None], u, 0.0)
    expect, _ = sum_loss(upsample_logits(low[:, 0], S), y, u, hw, iou[:, 0],
                         jnp.asarray(batch["weight"]), FOCAL_CFG.loss)  # fmt: skip
    np.testing.assert_allclose(float(m["loss"]), float(expect), rtol=1e-5)


def test_uncertainty_one_everywhere_zeroes_the_focal_gradient(focal_step):
    """§9 item 16: pseudo data with U ≡ 1 gives the focal term zero gradient."""
    t, tx, step = focal_step
    rng = np.random.default_rng(6)
    batch = _batch(rng, _entries(rng, refined=True, task=0))
    batch["prob"][:] = 255  # p_SAM = 1 ...
    batch["refined"][:] = 0  # ... p_ref = 0 ...
    batch["has_refined"][:] = True
    _, u_loss, _, _ = episode_inputs({k: jnp.asarray(v) for k, v in batch.items()}, FOCAL_CFG)
    assert np.asarray(u_loss).min() == 1.0  # ... so U = 1 on every pixel
    s, m = step(_state(t, tx, tx), t.frozen, batch, jax.random.key(0), True)
    assert float(m["grad_norm"]) == 0.0 and float(m["loss"]) == 0.0
    for a, b in zip(_leaves(s["params"]), _leaves(t.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lr_drops_by_the_factor_at_ten_twelfths():
    f = lr_schedule(1e-5, 120, 10 / 12, 0.1)
    assert float(f(99)) == pytest.approx(1e-5) and float(f(100)) == pytest.approx(1e-6)


def test_data_order_reshuffles_each_pass_and_covers_every_item():
    n = 5
    first = [pick(0, 0, p, n) for p in range(n)]
    second = [pick(0, 0, p, n) for p in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second or n < 3


def test_prob_to_mask_prompt_is_a_blockwise_logit():
    p = np.zeros((1, 8, 8), np.uint8)
    p[0, :4, :4] = 255
    p[0, 4:, 4:] = 51  # 0.2
    out = np.asarray(prob_to_mask_prompt(jnp.asarray(p), 2))[0, ..., 0]
    assert out[0, 0] > 5 and out[0, 1] < -5
    np.testing.assert_allclose(out[1, 1], np.log(0.2 / 0.8), rtol=1e-5)
