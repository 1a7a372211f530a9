"""LoRA, mask calibration, loss, metrics, schedules (docs/fewshot.md §9 items 2, 8, 9, 10, 12)."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.evaluation.metrics import dice_per_class, iou_per_class
from amsam_jax.fewshot.blo import StepConfig, TrainingModel, forward, split_trainable
from amsam_jax.fewshot.calibration import calibrate_masks
from amsam_jax.fewshot.config import FewShotConfig, TrainSection
from amsam_jax.fewshot.lora import (
    LoRALinear,
    LowerParam,
    PromptParam,
    apply_lora,
    count_params,
    decoder_attentions,
    mark_trainable,
)
from amsam_jax.fewshot.losses import cross_entropy, segmentation_loss, soft_dice_loss
from amsam_jax.fewshot.trainer import schedules
from amsam_jax.training.prompt_decoder import PromptDecoder

TINY = SamConfig.tiny(num_multimask_outputs=1)
NO_CALIBRATION = StepConfig(calibration=False)

# ----------------------------------------------------------------------------------------- LoRA


@partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, embedding, box):
    """Raw decoder logits (B, n, 4G, 4G) of a `PromptDecoder` (no calibration)."""
    return forward(nnx.merge(graphdef, state), embedding, box, NO_CALIBRATION)


@pytest.fixture(scope="module")
def tiny_pair():
    """Un-adapted and LoRA-adapted tiny decoders with the same base weights, and inputs."""
    base = PromptDecoder(build_sam(TINY, seed=0))
    adapted_sam = build_sam(TINY, seed=0)
    apply_lora(adapted_sam, rank=4, seed=1)
    adapted = PromptDecoder(adapted_sam)
    rng = np.random.default_rng(0)
    g, c = TINY.grid_size, TINY.prompt_embed_dim
    embedding = jnp.asarray(rng.standard_normal((2, g, g, c)), jnp.float32)
    boxes = jnp.asarray([[10.0, 20.0, 200.0, 180.0], [0.0, 0.0, 256.0, 256.0]], jnp.float32)
    return base, adapted, embedding, boxes


def _adapters(decoder: PromptDecoder) -> list[LoRALinear]:
    return [getattr(attn, p) for attn in decoder_attentions(decoder) for p in ("q_proj", "v_proj")]


@pytest.mark.parametrize("with_box", [False, True], ids=["no_box", "box"])
def test_lora_with_zero_b_is_bit_identical_to_base_decoder(tiny_pair, with_box):
    base, adapted, embedding, boxes = tiny_pair
    box = boxes if with_box else None
    out_base = np.asarray(_decode(*nnx.split(base), embedding, box))
    out_lora = np.asarray(_decode(*nnx.split(adapted), embedding, box))
    assert out_base.shape == (2, 2, 64, 64)
    assert np.array_equal(out_base, out_lora)


def test_lora_wraps_only_q_and_v_and_keeps_base_paths(tiny_pair):
    base, adapted, _, _ = tiny_pair
    attns = decoder_attentions(adapted)
    assert len(attns) == 7
    for attn, ref in zip(attns, decoder_attentions(base), strict=True):
        assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.v_proj, LoRALinear)
        assert type(attn.k_proj) is nnx.Linear and type(attn.out_proj) is nnx.Linear
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert np.array_equal(getattr(attn, name).kernel[...], getattr(ref, name).kernel[...])
            assert np.array_equal(getattr(attn, name).bias[...], getattr(ref, name).bias[...])
    # Base weights keep their checkpoint paths; only lora_a / lora_b are new.
    base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(base))}
    lora_paths = {p for p, _ in nnx.to_flat_state(nnx.state(adapted))}
    assert base_paths <= lora_paths
    assert {p[-1] for p in lora_paths - base_paths} == {"lora_a", "lora_b"}
    lora_state = nnx.state(adapted, nnx.LoRAParam)
    assert len(jax.tree.leaves(lora_state)) == 28
    assert {p[-2] for p, _ in nnx.to_flat_state(lora_state)} == {"q_proj", "v_proj"}


def test_lora_nonzero_b_equals_merged_q_and_v_kernels(tiny_pair):
    """Each adapter is on the forward path, and B != 0 acts exactly as W + A B on q/v only."""
    base, adapted, embedding, boxes = tiny_pair
    rng = np.random.default_rng(1)
    graphdef = nnx.graphdef(adapted)
    out_base = np.asarray(_decode(*nnx.split(base), embedding, boxes))
    adapters = _adapters(adapted)
    new_b = [0.2 * rng.standard_normal(m.lora_b.shape).astype(np.float32) for m in adapters]
    try:
        for module, b in zip(adapters, new_b, strict=True):
            module.lora_b[...] = b
            out_one = np.asarray(_decode(graphdef, nnx.state(adapted), embedding, boxes))
            module.lora_b[...] = np.zeros_like(b)
            assert not np.array_equal(out_one, out_base)
        for module, b in zip(adapters, new_b, strict=True):
            module.lora_b[...] = b
        out_lora = np.asarray(_decode(graphdef, nnx.state(adapted), embedding, boxes))
        products = [np.asarray(m.lora_a[...]) @ b for m, b in zip(adapters, new_b, strict=True)]
    finally:
        for module in adapters:
            module.lora_b[...] = np.zeros(module.lora_b.shape, np.float32)

    gd_base, st_base = nnx.split(base)
    merged = nnx.merge(gd_base, jax.tree.map(lambda x: jnp.array(x, copy=True), st_base))
    for linear, product in zip(_adapters(merged), products, strict=True):
        linear.kernel[...] = linear.kernel[...] + product  # q_proj / v_proj base Linear
    out_merged = np.asarray(_decode(*nnx.split(merged), embedding, boxes))
    assert not np.allclose(out_lora, out_base, atol=1e-3)
    np.testing.assert_allclose(out_lora, out_merged, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def vit_b_sam():
    """Real ViT-B shapes at 256 px, n = 2 (host-side random init, no encoder run)."""
    sam = build_sam(SamConfig.vit_b(image_size=256, num_multimask_outputs=1), seed=0)
    apply_lora(sam, rank=4, seed=0)
    return sam


def test_lora_count_and_init_on_vit_b_decoder(vit_b_sam):
    lora = nnx.state(vit_b_sam, nnx.LoRAParam)
    assert count_params(lora) == 23_552  # 2·2·(4·256+256·4) + 5·2·(4·256+128·4)
    flat = dict(nnx.to_flat_state(lora))
    assert len(flat) == 28
    for path, var in flat.items():
        assert path[0] == "mask_decoder" and path[-2] in ("q_proj", "v_proj")
        self_attn = "self_attn" in path
        if path[-1] == "lora_a":
            assert var.shape == (256, 4)
            a = np.asarray(var[...])
            assert np.abs(a).max() <= 0.0625  # U(-1/sqrt(256), 1/sqrt(256))
            assert np.abs(a).max() > 0.055
        else:
            assert var.shape == (4, 256 if self_attn else 128)
            assert not np.asarray(var[...]).any()
    all_a = np.concatenate([np.ravel(v[...]) for p, v in flat.items() if p[-1] == "lora_a"])
    assert abs(all_a.std() - 0.0625 / math.sqrt(3)) < 0.002  # uniform, not normal


def test_partition_counts_on_vit_b(vit_b_sam):
    mark_trainable(vit_b_sam)
    t = split_trainable(TrainingModel(PromptDecoder(vit_b_sam), None))
    assert count_params(t.lower) == 377_888  # docs/fewshot.md §3.2 without the IoU head
    assert count_params(t.prompt) == 256
    assert [p for p, _ in nnx.to_flat_state(t.prompt)] == [
        ("decoder", "prompt_encoder", "no_mask_embed", "weight")
    ]
    frozen_paths = [p for p, _ in nnx.to_flat_state(t.frozen)]
    assert any("iou_prediction_head" in p for p in frozen_paths)
    assert not any(p[-1] in ("lora_a", "lora_b") for p in frozen_paths)
    # The image encoder has no trainable Variable at all.
    assert count_params(nnx.state(vit_b_sam.image_encoder, nnx.Any(LowerParam, PromptParam))) == 0
    assert count_params(nnx.state(vit_b_sam.image_encoder, nnx.LoRAParam)) == 0

    mark_trainable(vit_b_sam, train_iou_head=True)
    t = split_trainable(TrainingModel(PromptDecoder(vit_b_sam), None))
    assert count_params(t.lower) == 509_986
    assert count_params(t.prompt) == 256


# ---------------------------------------------------------------------------------- calibration


def _literal_calibration(u: np.ndarray, h: np.ndarray, alpha: float) -> np.ndarray:
    """Paper Eqs. 9-12 with R materialised; u (b, c, hh, ww), h (b, n, c), float64 NumPy."""
    b, c = u.shape[:2]
    n = h.shape[1]
    r = []
    for i in range(c):
        u_hat = np.repeat(u[:, i : i + 1], n, axis=1)  # (b, n, hh, ww)  Eq. 9
        h_hat = h[:, :, i].reshape(b, n, 1, 1)
        r.append(u_hat * h_hat)
    r = np.concatenate(r, axis=0)  # (b·c, n, hh, ww)  Eq. 10
    assert r.shape == (b * c, n, *u.shape[2:])
    m_new = np.repeat(r.mean(axis=0, keepdims=True), b, axis=0)  # Eq. 11
    m_orig = np.einsum("bnc,bchw->bnhw", h, u)
    return alpha * m_orig + (1 - alpha) * m_new  # Eq. 12


@pytest.mark.parametrize("b", [1, 2, 3])
def test_calibration_closed_form_equals_materialised_eqs_9_to_12(b):
    rng = np.random.default_rng(b)
    u = rng.standard_normal((b, 32, 64, 64))
    h = rng.standard_normal((b, 2, 32))
    expected = _literal_calibration(u, h, 0.7)
    m_orig = np.einsum("bnc,bchw->bnhw", h, u)
    with jax.enable_x64(True):
        got = np.asarray(calibrate_masks(jnp.asarray(m_orig), 32, 0.7, "batch"))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_calibration_at_batch_one_is_a_fixed_rescale():
    assert 0.7 + 0.3 / 32 == 0.709375
    rng = np.random.default_rng(0)
    m = rng.standard_normal((1, 2, 64, 64))
    with jax.enable_x64(True):
        for average in ("batch", "sample"):
            got = np.asarray(calibrate_masks(jnp.asarray(m), 32, 0.7, average))
            np.testing.assert_allclose(got, 0.709375 * m, rtol=1e-15, atol=0)
    m32 = jnp.asarray(rng.standard_normal((1, 3, 64, 64)), jnp.float32)
    cal = calibrate_masks(m32, 32)
    assert np.array_equal(np.argmax(cal, axis=1), np.argmax(m32, axis=1))


def test_calibration_batch_average_couples_samples_and_sample_average_does_not():
    rng = np.random.default_rng(0)
    m = jnp.asarray(rng.standard_normal((3, 2, 8, 8)), jnp.float32)
    m2 = m.at[1].add(1.0)  # perturb sample 2 only
    batch = calibrate_masks(m, 32, average="batch"), calibrate_masks(m2, 32, average="batch")
    sample = calibrate_masks(m, 32, average="sample"), calibrate_masks(m2, 32, average="sample")
    assert not np.array_equal(batch[0][0], batch[1][0])
    assert np.array_equal(sample[0][0], sample[1][0])
    assert np.array_equal(sample[0][2], sample[1][2])
    np.testing.assert_allclose(batch[1][0] - batch[0][0], 0.3 / 32 / 3, rtol=1e-4)
    with pytest.raises(ValueError, match="calib_average"):
        calibrate_masks(m, 32, average="channel")


def test_forward_calibration_equals_literal_eqs_9_to_12_from_the_decoders_h_and_u(tiny_pair):
    # The calibrated logits of the model's forward pass (training, validation and test all use
    # it) against Eqs. 9-12 of docs/fewshot.md §6.3 materialised in float64 NumPy from the
    # decoder's own H (B, n, c) and U (B, c, h, w) for a batch of 3 with boxes. Catches a wrong
    # c (the tiny decoder has c = 4 upscaled channels, not SAM's 32), a wrong or swapped alpha,
    # the mean taken over masks or channels instead of the batch, calibration of something
    # other than H·U, and the `sample` average coupling the samples. At b = 1 the softmax over
    # classes of the calibrated logits is the softmax of M_orig at temperature 1/κ,
    # κ = α + (1 - α)/c.
    base, _, _, _ = tiny_pair
    rng = np.random.default_rng(7)
    g, dim = TINY.grid_size, TINY.prompt_embed_dim
    embedding = jnp.asarray(rng.standard_normal((3, g, g, dim)), jnp.float32)
    boxes = jnp.asarray([[10.0, 20.0, 200.0, 180.0], [0, 0, 256, 256], [64, 8, 90, 250]])
    pe = base.prompt_encoder
    dense = jnp.broadcast_to(pe.no_mask_embed.weight[...].reshape(1, 1, 1, -1), (3, g, g, dim))
    m_orig, _, hyper, upscaled = base.mask_decoder.predict_masks(
        embedding, pe.get_dense_pe(), pe._embed_boxes(boxes), dense
    )
    h = np.asarray(hyper, np.float64)  # (B, n, c)
    u = np.moveaxis(np.asarray(upscaled, np.float64), -1, 1)  # (B, c, 4G, 4G)
    c = TINY.prompt_embed_dim // 8
    assert h.shape == (3, 2, c) and u.shape == (3, c, 4 * g, 4 * g)
    np.testing.assert_allclose(m_orig, np.einsum("bnc,bchw->bnhw", h, u), rtol=1e-5, atol=1e-6)

    for alpha in (0.7, 0.4):
        cfg = StepConfig(calibration_alpha=alpha)
        got = np.asarray(forward(base, embedding, boxes, cfg))
        expected = _literal_calibration(u, h, alpha)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        # The "sample" average: Eqs. 9-12 on each sample alone.
        sample = StepConfig(calibration_alpha=alpha, calibration_average="sample")
        got = np.asarray(forward(base, embedding, boxes, sample))
        for i in range(3):
            expected = _literal_calibration(u[i : i + 1], h[i : i + 1], alpha)[0]
            np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)
    # Not vacuous: the coupling term is far above the tolerance.
    coupling = np.abs(0.3 / c * np.einsum("bnc,bchw->bnhw", h, u).mean(0)).max()
    assert coupling > 1e-3 * np.abs(m_orig).max()

    kappa = 0.7 + 0.3 / c
    got = np.asarray(forward(base, embedding[:1], boxes[:1], StepConfig()), np.float64)
    z = kappa * np.asarray(m_orig[:1], np.float64)
    softmax = np.exp(z - z.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(got, axis=1)), softmax, atol=1e-6)


# ----------------------------------------------------------------------------------------- loss


def _brute_force_loss(logits: np.ndarray, labels: np.ndarray, dice_weight: float = 0.8):
    """Pixel loops in float64: (loss, ce, dice)."""
    b, n, hh, ww = logits.shape
    ce_terms = []
    inter, z, v = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(b):
        for y in range(hh):
            for x in range(ww):
                e = [math.exp(logits[i, j, y, x]) for j in range(n)]
                p = [ej / sum(e) for ej in e]
                ce_terms.append(-math.log(p[labels[i, y, x]]))
                for j in range(n):
                    t = 1.0 if labels[i, y, x] == j else 0.0
                    inter[j] += p[j] * t
                    z[j] += p[j] * p[j]
                    v[j] += t * t
    ce = sum(ce_terms) / len(ce_terms)
    dice = float(np.mean([1 - (2 * inter[j] + 1e-5) / (z[j] + v[j] + 1e-5) for j in range(n)]))
    return (1 - dice_weight) * ce + dice_weight * dice, ce, dice


def _perfect_logits(labels: np.ndarray, n: int) -> np.ndarray:
    onehot = np.moveaxis(np.eye(n)[labels], -1, 1)  # (B, n, H, W)
    return np.where(onehot > 0, 50.0, -50.0).astype(np.float32)


def test_loss_of_confident_correct_logits_is_zero():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (2, 16, 16))
    loss = segmentation_loss(jnp.asarray(_perfect_logits(labels, 2)), jnp.asarray(labels))
    assert 0 <= float(loss) < 1e-6


def test_dice_of_class_absent_from_target_and_prediction_is_zero():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (2, 16, 16))  # class 2 never occurs, nor is it predicted
    logits = jnp.asarray(_perfect_logits(labels, 3))
    assert float(soft_dice_loss(logits, jnp.asarray(labels))) < 1e-6
    # With class 2 predicted everywhere instead, its term alone would be ~1 (mean over 3).
    wrong = logits.at[:, 2].set(100.0)
    assert float(soft_dice_loss(wrong, jnp.asarray(labels))) > 0.99


def test_loss_equals_brute_force_numpy():
    rng = np.random.default_rng(2)
    logits = 3.0 * rng.standard_normal((2, 3, 6, 5))
    labels = rng.integers(0, 3, (2, 6, 5))
    loss, ce, dice = _brute_force_loss(logits, labels)
    with jax.enable_x64(True):
        z, y = jnp.asarray(logits), jnp.asarray(labels)
        assert abs(float(segmentation_loss(z, y)) - loss) < 1e-12
        assert abs(float(cross_entropy(z, y)) - ce) < 1e-12
        assert abs(float(soft_dice_loss(z, y)) - dice) < 1e-12
    loss32 = segmentation_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    assert abs(float(loss32) - loss) < 1e-5


def test_dice_pools_sums_over_the_batch():
    labels = np.zeros((2, 8, 8), np.int64)
    labels[0, :6, :6] = 1  # a large object
    labels[1, 0, 0] = 1  # a one-pixel object
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 2, 8, 8))
    _, _, pooled = _brute_force_loss(logits, labels)
    per_sample = np.mean(
        [_brute_force_loss(logits[i : i + 1], labels[i : i + 1])[2] for i in (0, 1)]
    )
    assert abs(pooled - per_sample) > 0.05
    with jax.enable_x64(True):
        got = float(soft_dice_loss(jnp.asarray(logits), jnp.asarray(labels)))
    assert abs(got - pooled) < 1e-12


def test_cross_entropy_is_mean_negative_log_softmax():
    rng = np.random.default_rng(4)
    logits = 4.0 * rng.standard_normal((3, 2, 7, 7))
    labels = rng.integers(0, 2, (3, 7, 7))
    expected = -np.mean(np.take_along_axis(log_softmax(logits, axis=1), labels[:, None], 1))
    with jax.enable_x64(True):
        got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    assert abs(got - expected) < 1e-12


# -------------------------------------------------------------------------------------- metrics


def test_metric_hand_made_cases():
    target = np.zeros((8, 8), np.int64)
    target[2:6, 2:6] = 1
    assert dice_per_class(target, target, 2).tolist() == [1.0]
    assert iou_per_class(target, target, 2).tolist() == [1.0]
    assert dice_per_class(1 - target, target, 2).tolist() == [0.0]
    assert iou_per_class(1 - target, target, 2).tolist() == [0.0]
    empty = np.zeros_like(target)
    assert dice_per_class(empty, empty, 2).tolist() == [0.0]  # no foreground in the target
    assert dice_per_class(target, empty, 2).tolist() == [0.0]
    assert iou_per_class(empty, empty, 2).tolist() == [0.0]
    half = target.copy()
    half[2:4, 2:6] = 0  # 8 of 16 foreground pixels
    assert dice_per_class(half, target, 2).tolist() == [2 * 8 / (2 * 8 + 0 + 8)]
    assert iou_per_class(half, target, 2).tolist() == [8 / 16]
    # Three classes: class 2 absent from the target scores 0 even if never predicted.
    assert dice_per_class(target, target, 3).tolist() == [1.0, 0.0]


def test_metric_ties_go_to_background():
    logits = jnp.zeros((1, 2, 4, 4), jnp.float32)  # equal logits everywhere
    pred = np.asarray(jnp.argmax(logits, axis=1))[0]  # what evaluation._predict does
    assert not pred.any()
    target = np.ones((4, 4), np.int64)
    assert dice_per_class(pred, target, 2).tolist() == [0.0]


# ------------------------------------------------------------------------------------ schedules


def _train_cfg(**kw) -> FewShotConfig:
    return FewShotConfig(train=TrainSection(**kw))


def test_clean_schedule_values():
    total = 100 * math.ceil(2 / 1)  # T = E·ceil(|D1|/B): N = 4 -> D1 of 2, batch 1
    assert total == 200
    lower, upper, b1 = schedules(_train_cfg(), total)
    assert b1 == 0.9
    for k, factor in [(0, 1.0), (1, (1 - 1 / 200) ** 0.9), (total - 1, (1 / 200) ** 0.9)]:
        np.testing.assert_allclose(float(lower(k)), 5e-3 * factor, rtol=1e-6)
        np.testing.assert_allclose(float(upper(k)), 1e-3 * factor, rtol=1e-6)


def test_reference_schedule_values():
    total = 200
    lower, upper, b1 = schedules(_train_cfg(schedule="reference"), total)
    assert b1 == 0.95  # OneCycleLR's max momentum, never reset
    np.testing.assert_allclose(float(lower(0)), 5e-3 / 25, rtol=1e-6)
    np.testing.assert_allclose(float(upper(0)), 1e-3, rtol=1e-6)
    # k >= 1: poly of the lower base lr at k - 1, for both levels (reference bug for the upper).
    for k, factor in [(1, 1.0), (2, (1 - 1 / 200) ** 0.9), (total - 1, (2 / 200) ** 0.9)]:
        np.testing.assert_allclose(float(lower(k)), 5e-3 * factor, rtol=1e-6)
        np.testing.assert_allclose(float(upper(k)), 5e-3 * factor, rtol=1e-6)


def test_schedules_are_traceable_and_reject_unknown_kind():
    lower, _, _ = schedules(_train_cfg(), 200)
    np.testing.assert_allclose(
        float(jax.jit(lower)(jnp.asarray(1, jnp.int32))), 5e-3 * (199 / 200) ** 0.9, rtol=1e-6
    )
    with pytest.raises(Exception, match="schedule"):
        schedules(_train_cfg(schedule="cosine"), 200)
