"""Bi-level step: partition, retracing, Orbax round trip, evaluate, and the hypergradient modes
against independent float64 references (docs/fewshot.md §9 items 3, 10, 11, 14; §5.4-5.5).

Float64 runs inside `jax.enable_x64(True)` blocks (never process-wide). Compiles dominate the
runtime, so every step function is built once per module and shared.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.evaluation import fewshot as evaluation
from amsam_jax.evaluation.fewshot import EvalData, evaluate_fewshot, predict_masks
from amsam_jax.evaluation.metrics import dice_per_class
from amsam_jax.fewshot.blo import (
    StepConfig,
    TrainingModel,
    build_step,
    darts_fd_hypergradient,
    make_epoch,
    make_loss_fn,
    make_step,
    split_trainable,
)
from amsam_jax.fewshot.config import FewShotConfig, TrainSection
from amsam_jax.fewshot.lora import apply_lora, mark_trainable
from amsam_jax.fewshot.trainer import schedules
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.training.state import restore_state, save_state
from amsam_jax.utils.runtime import decoder_program_options

TINY = SamConfig.tiny(num_multimask_outputs=1)
TOTAL = 200  # T for N = 4, B = 1, E = 100
CLEAN = schedules(FewShotConfig(), TOTAL)
REFERENCE = schedules(FewShotConfig(train=TrainSection(schedule="reference")), TOTAL)


@pytest.fixture(scope="module")
def model():
    sam = build_sam(TINY, seed=0)
    apply_lora(sam, rank=4, seed=1)
    mark_trainable(sam)
    return split_trainable(TrainingModel(PromptDecoder(sam), None))


def _batches(seed: int, count: int) -> list[dict]:
    """Host batches of one image: embedding (1, G, G, C), a disc label (1, 4G, 4G)."""
    rng = np.random.default_rng(seed)
    g, c = TINY.grid_size, TINY.prompt_embed_dim
    yy, xx = np.mgrid[: 4 * g, : 4 * g]
    out = []
    for _ in range(count):
        cy, cx, r = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(8, 20)
        label = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.int32)[None]
        out.append({"embedding": rng.standard_normal((1, g, g, c)), "label": label})
    return out


def _device(tree, dtype=None):
    """Fresh device buffers (safe to donate); floating leaves cast to `dtype` when given."""

    def put(x):
        x = np.asarray(x)
        if dtype is not None and np.issubdtype(x.dtype, np.floating):
            x = x.astype(dtype)
        return jnp.array(x, copy=True)

    return jax.tree.map(put, tree)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _initial_state(model, lower_tx, upper_tx) -> dict:
    return {
        "lower": model.lower,
        "prompt": model.prompt,
        "lower_opt": lower_tx.init(model.lower),
        "prompt_opt": upper_tx.init(model.prompt),
        "step": np.int32(0),
    }


def _tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


# ------------------------------------------------------------------------ float32 (production)


@pytest.fixture(scope="module")
def f32(model):
    lower_lr, upper_lr, b1 = CLEAN
    step, lower_tx, upper_tx = make_step(model.graphdef, StepConfig(), lower_lr, upper_lr, b1)
    none_step, _, _ = make_step(
        model.graphdef, StepConfig(hypergradient="none"), lower_lr, upper_lr, b1
    )
    host = _host(_initial_state(model, lower_tx, upper_tx))
    batches = [_device(b, np.float32) for b in _batches(0, 6)]
    return {
        "step": step,
        "none_step": none_step,
        "initial": host,
        "frozen": _device(model.frozen),
        "batches": batches,
    }


def test_partition_matches_docs_fewshot_3_2(model):
    lower = {p for p, _ in nnx.to_flat_state(model.lower)}
    prompt = [p for p, _ in nnx.to_flat_state(model.prompt)]
    frozen = {p for p, _ in nnx.to_flat_state(model.frozen)}
    assert prompt == [("decoder", "prompt_encoder", "no_mask_embed", "weight")]
    lower_heads = {p[2] for p in lower if p[-1] not in ("lora_a", "lora_b")}
    heads = {"iou_token", "mask_tokens", "output_upscaling", "output_hypernetworks_mlps"}
    assert lower_heads == heads
    assert sum(p[-1] in ("lora_a", "lora_b") for p in lower) == 28
    frozen_parts = {p[2] for p in frozen if p[1] == "mask_decoder"}
    assert frozen_parts == {"transformer", "iou_prediction_head"}
    assert not any(p[-1] in ("lora_a", "lora_b") for p in frozen)
    assert (
        "decoder",
        "prompt_encoder",
        "pe_layer",
        "positional_encoding_gaussian_matrix",
    ) in frozen
    q_kernel = ("decoder", "mask_decoder", "transformer", "layers", 0, "self_attn", "q_proj")
    assert (*q_kernel, "kernel") in frozen and (*q_kernel, "lora_b") in lower
    assert not lower & frozen


def test_exact_step_changes_only_the_trainable_state(f32):
    frozen_before = _host(f32["frozen"])
    initial = f32["initial"]
    state, metrics = f32["step"](_device(initial), f32["frozen"], *f32["batches"][:2])
    assert all(np.isfinite(float(v)) for v in metrics.values())  # eps_root: finite at step 0
    assert float(metrics["hypergradient_norm"]) > 0
    assert _tree_equal(_host(f32["frozen"]), frozen_before)
    assert int(state["step"]) == 1
    assert not _tree_equal(_host(state["prompt"]), initial["prompt"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state["lower"], initial["lower"])
    assert all(jax.tree.leaves(changed))  # AdamW with weight decay moves every lower leaf
    assert jax.tree.structure(state["lower"]) == jax.tree.structure(initial["lower"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_none_step_leaves_the_prompt_unchanged(f32):
    initial = f32["initial"]
    state, metrics = f32["none_step"](_device(initial), f32["frozen"], *f32["batches"][:2])
    assert _tree_equal(_host(state["prompt"]), initial["prompt"])
    assert _tree_equal(_host(state["prompt_opt"]), initial["prompt_opt"])
    assert not _tree_equal(_host(state["lower"]), initial["lower"])


def test_step_does_not_retrace(f32):
    step = f32["step"]
    state = _device(f32["initial"])
    for i in range(3):
        state, _ = step(state, f32["frozen"], *f32["batches"][2 * i : 2 * i + 2])
    assert int(state["step"]) == 3
    assert step._cache_size() == 1


def test_checkpoint_round_trip_restores_bitwise_and_next_step(f32, tmp_path):
    step, b = f32["step"], f32["batches"]
    state, _ = step(_device(f32["initial"]), f32["frozen"], b[0], b[1])
    compiled = step._cache_size()
    saved = _host(state)
    meta = {"step": 1, "epoch": 0, "best_dice": 0.0}
    save_state(tmp_path, "latest", state, meta)
    restored, restored_meta = restore_state(tmp_path, "latest", _device(f32["initial"]))
    assert restored_meta == meta
    assert _tree_equal(_host(restored), saved)

    next_a, metrics_a = step(_device(saved), f32["frozen"], b[2], b[3])
    next_b, metrics_b = step(restored, f32["frozen"], b[2], b[3])
    assert _tree_equal(_host(next_a), _host(next_b))
    assert _tree_equal(_host(metrics_a), _host(metrics_b))
    assert step._cache_size() == compiled  # a resumed run reuses the fresh run's compile
    assert restore_state(tmp_path, "best", f32["initial"]) is None


@pytest.mark.parametrize("hypergradient", ["exact", "first_order"])
def test_epoch_scan_equals_one_jitted_step_per_iteration_bitwise(model, f32, hypergradient):
    """`make_epoch` (the trainer's path) against `make_step` (its ragged-batch path), also split
    into two calls of other lengths, as a resumed or `checkpoint_every` run makes them."""
    lower_lr, upper_lr, b1 = CLEAN
    cfg = StepConfig(hypergradient=hypergradient)
    raw, _, _ = build_step(model.graphdef, cfg, lower_lr, upper_lr, b1)
    options = decoder_program_options()  # the same XLA options as make_epoch's
    step, epoch = jax.jit(raw, donate_argnums=0, compiler_options=options), make_epoch(raw)
    b = f32["batches"]
    data = jax.tree.map(lambda *xs: jnp.stack(xs), *b)  # (6, 1, ...)
    idx1, idx2 = np.array([0, 2, 4, 0, 2], np.int32), np.array([1, 3, 5, 3, 1], np.int32)
    state, per_step = _device(f32["initial"]), []
    for i, j in zip(idx1, idx2, strict=True):
        state, metrics = step(state, f32["frozen"], b[i], b[j])
        per_step.append(_host(metrics))
    whole, stacked = epoch(_device(f32["initial"]), f32["frozen"], data, data, idx1, idx2)
    split, _ = epoch(_device(f32["initial"]), f32["frozen"], data, data, idx1[:2], idx2[:2])
    split, _ = epoch(split, f32["frozen"], data, data, idx1[2:], idx2[2:])
    assert _tree_equal(_host(whole), _host(state)) and _tree_equal(_host(split), _host(state))
    for t, metrics in enumerate(per_step):
        assert _tree_equal({k: v[t] for k, v in _host(stacked).items()}, metrics)
    assert int(whole["step"]) == 5


def test_evaluation_is_one_call_per_chunk_and_equals_per_image_calls(model, f32, monkeypatch):
    rng = np.random.default_rng(6)
    embedding = rng.standard_normal((5, 16, 16, 32)).astype(np.float32)
    data = EvalData(embedding, np.zeros((5, 64, 64), np.int64), tuple("abcde"))
    state = {"lower": _device(model.lower), "prompt": _device(model.prompt)}
    cfg = StepConfig()
    whole = predict_masks(model.graphdef, cfg, state, f32["frozen"], data)
    single = [
        predict_masks(model.graphdef, cfg, state, f32["frozen"], EvalData(e[None], t[None], (s,)))
        for e, t, s in zip(data.embedding, data.label_low, data.stems, strict=True)
    ]
    monkeypatch.setattr(evaluation, "CHUNK", 2)  # 3 calls of 2 images, the last one padded
    chunked = predict_masks(model.graphdef, cfg, state, f32["frozen"], data)
    assert whole.shape == (5, 64, 64) and np.array_equal(whole, np.concatenate(single))
    assert np.array_equal(chunked, whole)


def test_evaluate_fewshot_is_the_mean_of_per_image_scores(model, f32):
    rng = np.random.default_rng(5)
    embedding = rng.standard_normal((3, 16, 16, 32)).astype(np.float32)
    labels = np.zeros((3, 64, 64), np.int64)
    labels[0, 10:40, 10:40] = 1
    labels[1, 30:64, 0:20] = 1  # image 2 keeps an empty label: scores 0
    data = EvalData(embedding, labels, ("a", "b", "c"))
    state = {"lower": _device(model.lower), "prompt": _device(model.prompt)}
    cfg = StepConfig()
    result = evaluate_fewshot(model.graphdef, cfg, state, f32["frozen"], data)
    preds = predict_masks(model.graphdef, cfg, state, f32["frozen"], data)
    dice = []
    for pred, target in zip(preds, labels, strict=True):
        tp, fp = np.sum((pred == 1) & (target == 1)), np.sum((pred == 1) & (target == 0))
        fn = np.sum((pred == 0) & (target == 1))
        dice.append(100 * 2 * tp / (2 * tp + fp + fn) if target.any() else 0.0)
    assert [r["stem"] for r in result["per_image"]] == ["a", "b", "c"]
    np.testing.assert_allclose([r["dice"] for r in result["per_image"]], dice, rtol=1e-12)
    np.testing.assert_allclose(result["dice"], np.mean(dice), rtol=1e-12)

    # All logits equal (hypernetwork outputs 0): ties go to background everywhere.
    def zero_last_layer(path, var):
        last = path[2] == "output_hypernetworks_mlps" and path[-2] == 2
        return var.replace(jnp.zeros_like(var[...])) if last else var

    tied = nnx.from_flat_state(
        [(p, zero_last_layer(p, v)) for p, v in nnx.to_flat_state(_device(model.lower))]
    )
    tied_state = {"lower": tied, "prompt": state["prompt"]}
    assert not predict_masks(model.graphdef, cfg, tied_state, f32["frozen"], data).any()
    assert evaluate_fewshot(model.graphdef, cfg, tied_state, f32["frozen"], data)["dice"] == 0.0
    assert dice_per_class(labels[0], labels[0], 2).tolist() == [1.0]


def test_eps_root_keeps_the_hypergradient_finite_where_a_gradient_is_zero():
    """Optax's default eps_root=0 puts sqrt'(0) on the gradient path (docs/fewshot.md §5.5)."""

    def hypergradient(eps_root):
        tx = optax.adamw(5e-3, eps=1e-8, eps_root=eps_root, weight_decay=0.1)
        w = {"used": jnp.ones(3), "dead": jnp.ones(2)}

        def lower_loss(w, a):  # like LoRA A while B = 0: d/d dead = a * 0, exactly 0
            return jnp.sum((a * w["used"]) ** 2) + a * jnp.sum(w["dead"] * jnp.zeros(2))

        def phi(a):
            g = jax.grad(lower_loss)(w, a)
            updates, _ = tx.update(g, tx.init(w), w)
            w_next = optax.apply_updates(w, updates)
            return jnp.sum(w_next["used"] * a) + jnp.sum(w_next["dead"])

        return jax.grad(phi)(jnp.asarray(0.7))

    assert np.isnan(hypergradient(0.0))
    assert np.isfinite(hypergradient(1e-30))


# ----------------------------------------------------------------- float64 hypergradient checks

FD_ON = dict(fd_accumulate_bug=True, fd_step1_bias=True, fd_reference_b1=True)


def _adam(opt_state) -> optax.ScaleByAdamState:
    assert isinstance(opt_state[0], optax.ScaleByAdamState)
    return opt_state[0]


@pytest.fixture(scope="module")
def f64(model):
    """Float64 steps, reference functions and host states at steps 0 and 3.

    Built inside an x64 block that is left before returning (no x64 leaks to other tests).
    """
    loss_fn = make_loss_fn(model.graphdef, StepConfig())
    cfgs = {
        "exact": (StepConfig(), CLEAN),
        "first_order": (StepConfig(hypergradient="first_order"), CLEAN),
        "sgd": (StepConfig(exact_jacobian="sgd"), CLEAN),
        "darts_off": (StepConfig(hypergradient="darts_fd"), REFERENCE),
        "darts_on": (StepConfig(hypergradient="darts_fd", **FD_ON), REFERENCE),
    }
    with jax.enable_x64(True):
        steps = {}
        for name, (cfg, (lower_lr, upper_lr, b1)) in cfgs.items():
            steps[name] = (make_step(model.graphdef, cfg, lower_lr, upper_lr, b1), cfg, b1)
        (step, lower_tx, upper_tx), _, _ = steps["exact"]
        frozen = _device(model.frozen, np.float64)
        init = _initial_state(model, lower_tx, upper_tx)
        init = _host(_device(init, np.float64))
        batches = [_device(b, np.float64) for b in _batches(1, 8)]
        state = _device(init)
        for i in range(3):
            state, _ = step(state, frozen, batches[2 * i], batches[2 * i + 1])
        after3 = _host(state)
    assert np.asarray(jax.tree.leaves(init["lower"])[0]).dtype == np.float64

    @jax.jit
    def grads_fn(w, a, frozen, batch):
        value, (gw, ga) = jax.value_and_grad(loss_fn, argnums=(0, 1))(w, a, frozen, batch)
        return value, gw, ga

    @jax.jit
    def mixed_hvp_fn(w, a, direction, frozen, batch):
        grad_a = lambda w: jax.grad(loss_fn, argnums=1)(w, a, frozen, batch)  # noqa: E731
        return jax.jvp(grad_a, (w,), (direction,))[1]

    def grads(w, a, batch):
        """(L, dL/dw, dL/da) at (w, a)."""
        return grads_fn(w, a, frozen, batch)

    def mixed_hvp(w, a, direction, batch):
        """[d^2 L / da dw] . direction, as jax.jvp of w -> dL/da (exact mixed HVP)."""
        return mixed_hvp_fn(w, a, direction, frozen, batch)

    return {
        "steps": steps,
        "frozen": frozen,
        "init": init,
        "after3": after3,
        "batches": batches,
        "grads": grads,
        "mixed_hvp": mixed_hvp,
    }


# Plain-jnp references (docs/fewshot.md §5.2, §5.4 b, §5.5), jitted only to avoid per-op compiles.
# Adam state tuples count steps from 0: the step from count c is step number t = c + 1.


@jax.jit
def _adamw_reference(w, m, v, t, g, lr, b1):
    """AdamW step number t (wd 0.1, b2 0.999, eps 1e-8, eps_root 0); returns (w, m, v).

    w' = w (1 - lr wd) - (lr / c1) m' / (sqrt(v') / sqrt(c2) + eps), c_i = 1 - b_i^t.
    """
    c1, c2 = 1 - b1**t, 1 - 0.999**t
    m2 = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
    v2 = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
    w2 = jax.tree.map(
        lambda p, m, v: p * (1 - lr * 0.1) - (lr / c1) * m / (jnp.sqrt(v) / jnp.sqrt(c2) + 1e-8),
        w,
        m2,
        v2,
    )
    return w2, m2, v2


@jax.jit
def _sgd_reference(w, g, lr):
    """w (1 - lr wd) - lr g: the lookahead with D = 1."""
    return jax.tree.map(lambda p, gp: p * (1 - lr * 0.1) - lr * gp, w, g)


@jax.jit
def _adam_jacobian(m, v, count, g, b1):
    """D = d(Adam direction)/dg element-wise (docs/fewshot.md §5.5), optax's eps_root = 1e-30."""
    t = count + 1
    c1, c2 = 1 - b1**t, 1 - 0.999**t

    def one(m, v, g):
        m2 = b1 * m + (1 - b1) * g
        q = jnp.sqrt((0.999 * v + 0.001 * g * g) / c2 + 1e-30)
        return ((1 - b1) / c1 * (q + 1e-8) - (m2 / c1) * 0.001 * g / (c2 * q)) / (q + 1e-8) ** 2

    return jax.tree.map(one, m, v, g)


@jax.jit
def _axpy(alpha, x, y):
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


@jax.jit
def _mul(x, y):
    return jax.tree.map(jnp.multiply, x, y)


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(tree))))


def _unit(tree):
    norm = _norm(tree)
    return jax.tree.map(lambda x: x / norm, tree)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _run(f64, name, host_state, pair):
    """Runs step `name` from `host_state` with a fresh upper optimiser; returns (state, h, metrics).

    h is read back from the upper Adam first moment: mu = (1 - b1) h from a zero state.
    """
    (step, _, upper_tx), cfg, _ = f64["steps"][name]
    state = dict(host_state)
    state["prompt_opt"] = upper_tx.init(host_state["prompt"])
    b1, b2 = f64["batches"][pair[0]], f64["batches"][pair[1]]
    new, metrics = step(_device(state), f64["frozen"], b1, b2)
    h = jax.tree.map(lambda mu: np.asarray(mu) / (1 - cfg.b1), _adam(new["prompt_opt"]).mu)
    np.testing.assert_allclose(_norm(h), float(metrics["hypergradient_norm"]), rtol=1e-12)
    return _host(new), h, metrics


def _rel(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("at", ["init", "after3"])
def test_exact_hypergradient_equals_central_difference_of_phi(f64, at):
    """h = dPhi/da, Phi(a) = L2(AdamWStep(w, s, grad_w L1(w, a)), a), along two directions."""
    grads, host = f64["grads"], f64[at]
    k = int(host["step"])
    pair = (6, 7)
    with jax.enable_x64(True):
        new, h, metrics = _run(f64, "exact", host, pair)
        w, a = _device(host["lower"]), _device(host["prompt"])
        adam = _adam(_device(host["lower_opt"]))
        lr = jnp.asarray(CLEAN[0](k), jnp.float64)
        b1, b2 = f64["batches"][pair[0]], f64["batches"][pair[1]]

        def phi(a):
            _, g, _ = grads(w, a, b1)
            w_next, _, _ = _adamw_reference(w, adam.mu, adam.nu, adam.count + 1, g, lr, 0.9)
            return float(grads(w_next, a, b2)[0]), w_next

        phi0, w_next = phi(a)
        # The real lower step is one AdamW step from (w_k, s_k) at a_k: the upper step neither
        # runs first nor touches w.
        assert _rel(new["lower"], w_next) < 1e-13
        np.testing.assert_allclose(float(metrics["upper_loss"]), phi0, rtol=1e-13)
        rng = np.random.default_rng(k)
        h_unit = _unit(h)
        eps = 1e-5
        for mix in (0.5, 0.0):  # towards h (a strong signal), then a plain random direction
            rand = _unit(jax.tree.map(lambda x: rng.standard_normal(x.shape), h))
            d = _unit(jax.tree.map(lambda u, r, m=mix: m * u + (1 - m) * r, h_unit, rand))
            values = {i: phi(_axpy(i * eps, _device(d), a))[0] for i in (-2, -1, 1, 2)}
            central = (values[1] - values[-1]) / (2 * eps)
            # Fourth-order central difference: at step 0 the first Adam step ~ g / (|g| + eps)
            # bends Phi sharply (docs/fewshot.md §5.5) and the 3-point error reaches ~1e-6 along
            # random d.
            central4 = (8 * (values[1] - values[-1]) - (values[2] - values[-2])) / (12 * eps)
            analytic = float(_flat(h) @ _flat(d))
            assert abs(central4 - analytic) <= 1e-6 * abs(analytic), (mix, central4, analytic)
            if mix:
                assert abs(central - analytic) <= 1e-6 * abs(analytic), (mix, central, analytic)


@pytest.mark.parametrize("at", ["init", "after3"])
def test_first_order_is_exact_minus_the_implicit_term(f64, at):
    """first_order = dL2/da at w_{k+1}; exact - first_order = -lr [d2 L1/da dw](D * grad_w L2)."""
    grads, host = f64["grads"], f64[at]
    k = int(host["step"])
    pair = (6, 7)
    with jax.enable_x64(True):
        new_fo, h_fo, _ = _run(f64, "first_order", host, pair)
        new_ex, h_ex, _ = _run(f64, "exact", host, pair)
        assert _rel(new_fo["lower"], new_ex["lower"]) < 1e-14  # the same real lower step
        w, a = _device(host["lower"]), _device(host["prompt"])
        adam = _adam(_device(host["lower_opt"]))
        b1, b2 = f64["batches"][pair[0]], f64["batches"][pair[1]]
        w_next = _device(new_fo["lower"])
        _, gw2, ga2 = grads(w_next, a, b2)
        assert _rel(h_fo, ga2) < 1e-13

        _, g, _ = grads(w, a, b1)
        if at == "init":  # B = 0: the LoRA A gradients are exactly 0 (why eps_root matters)
            flat_g = dict(nnx.to_flat_state(g))
            assert all(not np.asarray(v).any() for p, v in flat_g.items() if p[-1] == "lora_a")
        lr = float(CLEAN[0](k))
        jac = _adam_jacobian(adam.mu, adam.nu, adam.count, g, 0.9)
        implicit = jax.tree.map(lambda x: -lr * x, f64["mixed_hvp"](w, a, _mul(jac, gw2), b1))
        difference = jax.tree.map(np.subtract, h_ex, h_fo)
        assert _rel(difference, implicit) < 1e-8
        assert _rel(h_ex, jax.tree.map(np.add, h_fo, implicit)) < 1e-10
        assert _norm(implicit) > 0.05 * _norm(h_ex)  # the implicit term is not negligible


def test_sgd_jacobian_equals_darts_formula_with_exact_hvp(f64):
    """exact_jacobian="sgd": d/da L2(w(1 - lr wd) - lr grad_w L1(w, a), a) (chain rule by hand)."""
    grads, host = f64["grads"], f64["after3"]
    k = int(host["step"])
    pair = (6, 7)
    with jax.enable_x64(True):
        new, h, _ = _run(f64, "sgd", host, pair)
        w, a = _device(host["lower"]), _device(host["prompt"])
        b1, b2 = f64["batches"][pair[0]], f64["batches"][pair[1]]
        lr = float(CLEAN[0](k))
        _, g, _ = grads(w, a, b1)
        # The real lower step is still AdamW.
        adam = _adam(_device(host["lower_opt"]))
        w_adam, _, _ = _adamw_reference(w, adam.mu, adam.nu, adam.count + 1, g, lr, 0.9)
        assert _rel(new["lower"], w_adam) < 1e-13
        _, gw2, ga2 = grads(_sgd_reference(w, g, lr), a, b2)
        hvp = f64["mixed_hvp"](w, a, gw2, b1)
        expected = jax.tree.map(lambda d, x: d - lr * x, ga2, hvp)
        assert _rel(h, expected) < 1e-10
        _, h_ex, _ = _run(f64, "exact", host, pair)
        assert _rel(h, h_ex) > 1e-3  # a different Jacobian gives a different hypergradient


def _darts_reference(f64, host, pair, cfg, lower_b1):
    """Spec §5.4 b in plain jnp from the step-k state: h, vvec and w_{k+1}."""
    grads = f64["grads"]
    k = int(host["step"])
    lr = float(REFERENCE[0](k))
    w, a = _device(host["lower"]), _device(host["prompt"])
    adam = _adam(_device(host["lower_opt"]))
    b1, b2 = f64["batches"][pair[0]], f64["batches"][pair[1]]
    _, g, _ = grads(w, a, b1)
    w1, m1, v1 = _adamw_reference(w, adam.mu, adam.nu, adam.count + 1, g, lr, lower_b1)
    assert int(adam.count) == k
    _, g_new, _ = grads(w1, a, b1)
    if cfg.fd_accumulate_bug:  # g' + g
        g_new = _axpy(1.0, g, g_new)
    # The virtual step: an AdamW step from (w_{k+1}, m_{k+1}, v_{k+1}), number k + 2 (or 1).
    beta1 = 0.9 if cfg.fd_reference_b1 else lower_b1
    t = 1 if cfg.fd_step1_bias else k + 2
    w_virtual, _, _ = _adamw_reference(w1, m1, v1, t, g_new, lr, beta1)
    _, vvec, d = grads(w_virtual, a, b2)
    r = 0.01 / _norm(vvec)
    g_plus = grads(_axpy(r, vvec, w1), a, b1)[2]
    g_minus = grads(_axpy(-r, vvec, w1), a, b1)[2]
    hvp = jax.tree.map(lambda p, m: (p - m) / (2 * r), g_plus, g_minus)
    h = jax.tree.map(lambda dd, x: dd - lr * x, d, hvp)
    return {"h": h, "vvec": vvec, "w1": w1, "a": a, "batch1": b1}


@pytest.mark.parametrize("flags", ["darts_off", "darts_on"])
def test_darts_fd_equals_reference_formula(f64, flags):
    host = f64["after3"]
    pair = (6, 7)
    _, cfg, lower_b1 = f64["steps"][flags]
    assert lower_b1 == 0.95  # reference schedule: fd_reference_b1 makes a difference
    with jax.enable_x64(True):
        new, h, _ = _run(f64, flags, host, pair)
        ref = _darts_reference(f64, host, pair, cfg, lower_b1)
        assert _rel(new["lower"], ref["w1"]) < 1e-13
        assert _rel(h, ref["h"]) < 1e-10
        other_cfg = dataclasses.replace(
            cfg, **{key: not getattr(cfg, key) for key in FD_ON}
        )  # the flags change the result
        other = _darts_reference(f64, host, pair, other_cfg, lower_b1)["h"]
        assert _rel(h, other) > 1e-6


def test_fd_hvp_converges_to_exact_mixed_hvp_at_second_order(f64):
    host = f64["after3"]
    pair = (6, 7)
    cfg = f64["steps"]["darts_off"][1]
    grads = f64["grads"]
    with jax.enable_x64(True):
        ref = _darts_reference(f64, host, pair, cfg, 0.95)
        vvec, w1, a, b1 = ref["vvec"], ref["w1"], ref["a"], ref["batch1"]
        exact = f64["mixed_hvp"](w1, a, vvec, b1)
        errors = []
        # |R vvec| = radius. The reference's 0.01 crosses ReLU kinks of this random tiny model
        # (error ~30 %); below ~3e-3 the error is the smooth O(R^2) term.
        radii = (1e-3, 3e-4, 1e-4, 3e-5)
        for radius in radii:
            r = radius / _norm(vvec)
            g_plus = grads(_axpy(r, vvec, w1), a, b1)[2]
            g_minus = grads(_axpy(-r, vvec, w1), a, b1)[2]
            fd = jax.tree.map(lambda p, m, r=r: (p - m) / (2 * r), g_plus, g_minus)
            errors.append(_rel(fd, exact))
    slopes = np.diff(np.log(errors)) / np.diff(np.log(radii))
    assert errors[-1] < 1e-7, errors
    np.testing.assert_allclose(slopes, 2.0, atol=0.1, err_msg=str(errors))


# ------------------------------------------------- darts_fd on a toy problem in closed form


def _toy_loss(w, a, frozen, batch):
    """L(w, a) = ½wᵀAw + wᵀBa + c·w + ½aᵀCa + e·a + (u·w)³ (q·a) + ¼(p·w)⁴ (`frozen` unused).

    The cubic coupling makes grad_a L non-linear in w, so the central difference along vvec
    carries an exact R² term that pins the radius; the quartic term makes grad_w L non-linear.
    """
    w, a, b = w["w"], a["a"], batch
    s = jnp.dot(b["u"], w)
    return (
        0.5 * w @ b["A"] @ w + w @ b["B"] @ a + b["c"] @ w + 0.5 * a @ b["C"] @ a + b["e"] @ a
        + s**3 * jnp.dot(b["q"], a) + 0.25 * jnp.dot(b["p"], w) ** 4
    )  # fmt: skip


def _toy_grads(w, a, b):
    """(grad_w L, grad_a L) of `_toy_loss` by hand, NumPy float64."""
    s, qa, pw = b["u"] @ w, b["q"] @ a, b["p"] @ w
    gw = b["A"] @ w + b["B"] @ a + b["c"] + 3 * s**2 * qa * b["u"] + pw**3 * b["p"]
    ga = b["B"].T @ w + b["C"] @ a + b["e"] + s**3 * b["q"]
    return gw, ga


def _toy_batch(rng, n, m):
    sym = rng.standard_normal((n, n))
    c_sym = rng.standard_normal((m, m))
    return {
        "A": sym @ sym.T / n + np.eye(n),
        "B": rng.standard_normal((n, m)),
        "c": rng.standard_normal(n),
        "C": c_sym @ c_sym.T / m,
        "e": rng.standard_normal(m),
        "u": rng.standard_normal(n),
        "q": rng.standard_normal(m),
        "p": rng.standard_normal(n) / np.sqrt(n),
    }


@pytest.mark.parametrize(
    "flags",
    [
        {},
        dict(fd_radius=0.3),
        dict(fd_accumulate_bug=True, fd_step1_bias=True, fd_reference_b1=True),
    ],
)
def test_darts_fd_equals_closed_form_on_toy_problem(flags):
    # darts_fd_hypergradient on a loss whose gradients are written out by hand, with docs/
    # fewshot.md §5.4 b computed in NumPy: a fresh lower gradient g' at w_{k+1} (+ g with the
    # accumulate flag), a virtual AdamW step from the real optimiser's (m, v) with bias
    # corrections for step k + 2 (or 1), vvec and d at w', R = radius / |vvec|, and the central
    # difference of grad_a L1 around w_{k+1}, which for this loss is B1ᵀv + q1 (3s²t + R²t³)
    # exactly (s = u1·w_{k+1}, t = u1·vvec). Nothing comes from amsam_jax but the function
    # under test and optax's state layout. Catches a wrong or unnormalised radius (the R² term),
    # a flipped sign or a missing eta, a difference over R instead of 2R, perturbing w' instead
    # of w_{k+1}, D1 and D2 swapped in any of the three gradients, and a wrong bias correction,
    # beta1 or decoupled weight decay in the virtual step.
    n, m = 5, 3
    rng = np.random.default_rng(40)
    batch1, batch2 = _toy_batch(rng, n, m), _toy_batch(rng, n, m)
    w1 = rng.standard_normal(n) * 0.8
    a = rng.standard_normal(m)
    g = rng.standard_normal(n)  # the step-k lower gradient (only the accumulate flag uses it)
    k, eta, lower_b1 = 4, 0.05, 0.95
    cfg = StepConfig(hypergradient="darts_fd", **flags)
    with jax.enable_x64(True):
        # A real optax AdamW state after k + 1 updates with random gradients: (m, v) non-zero.
        tx = optax.adamw(1e-3, b1=lower_b1, b2=0.999, eps=1e-8, eps_root=1e-30, weight_decay=0.1)
        opt = tx.init({"w": jnp.asarray(w1)})
        for _ in range(k + 1):
            opt = tx.update(
                {"w": jnp.asarray(rng.standard_normal(n))}, opt, {"w": jnp.asarray(w1)}
            )[1]
        mu = np.asarray(optax.tree_utils.tree_get(opt, "mu")["w"])
        nu = np.asarray(optax.tree_utils.tree_get(opt, "nu")["w"])
        as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
        loss2, h = darts_fd_hypergradient(
            _toy_loss, {"w": jnp.asarray(w1)}, opt, {"a": jnp.asarray(a)}, None,
            {"w": jnp.asarray(g)}, as_jax(batch1), as_jax(batch2), jnp.asarray(eta),
            jnp.asarray(k, jnp.int32),
            {"lower_b1": lower_b1, "b2": cfg.b2, "eps": cfg.eps, "weight_decay": cfg.weight_decay},
            cfg,
        )  # fmt: skip
        h = np.asarray(h["a"])

    g_new, _ = _toy_grads(w1, a, batch1)
    if cfg.fd_accumulate_bug:
        g_new = g_new + g
    b1 = 0.9 if cfg.fd_reference_b1 else lower_b1
    t = 1 if cfg.fd_step1_bias else k + 2
    m2 = b1 * mu + (1 - b1) * g_new
    v2 = 0.999 * nu + 0.001 * g_new**2
    c1, c2 = 1 - b1**t, 1 - 0.999**t
    w_virtual = w1 * (1 - eta * 0.1) - (eta / c1) * m2 / (np.sqrt(v2) / np.sqrt(c2) + 1e-8)
    vvec, d = _toy_grads(w_virtual, a, batch2)
    r = cfg.fd_radius / np.linalg.norm(vvec)
    s, tv = batch1["u"] @ w1, batch1["u"] @ vvec
    hvp = batch1["B"].T @ vvec + batch1["q"] * (3 * s**2 * tv + r**2 * tv**3)
    expected = d - eta * hvp
    np.testing.assert_allclose(h, expected, rtol=1e-10, atol=1e-12)
    with jax.enable_x64(True):  # L2 at w' (float64: jnp outside the block is float32)
        want_loss2 = float(_toy_loss({"w": w_virtual}, {"a": a}, None, batch2))
    np.testing.assert_allclose(float(loss2), want_loss2, rtol=1e-12)
    # The checks are not vacuous: the R² term and the implicit term are far above the
    # tolerance, and |vvec| != 1 (an unnormalised radius changes R).
    radius_term = eta * np.abs(batch1["q"] * r**2 * tv**3).max()
    assert radius_term > 1e-7 * np.abs(expected).max(), radius_term
    assert np.abs(eta * hvp).max() > 0.1 * np.abs(d).max()
    assert abs(np.linalg.norm(vvec) - 1) > 0.5
