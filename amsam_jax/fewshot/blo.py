"""Bi-level (BLO-SAM / AM-SAM) step functions: lower AdamW step + upper prompt step.

docs/fewshot.md §5. The default hypergradient (`exact`) is `jax.grad` through the real optax
AdamW update of the lower level, compiled into the same step as that update. `first_order` and
`darts_fd` reproduce the reference code and are tested against its formulas.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from amsam_jax.fewshot.calibration import calibrate_masks
from amsam_jax.fewshot.config import HYPERGRADIENTS
from amsam_jax.fewshot.lora import LOWER, PromptParam
from amsam_jax.fewshot.losses import segmentation_loss
from amsam_jax.training.mesh import replicated_outputs
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.utils.runtime import decoder_program_options


class BoxResidual(nnx.Module):
    """Option (B) of docs/fewshot.md §6.2: a zero-initialised upper-level offset (2, C) on the box
    tokens."""

    def __init__(self, dim: int):
        self.delta = PromptParam(jnp.zeros((2, dim), jnp.float32))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step functions (hashable; part of the compiled function)."""

    hypergradient: str = "exact"
    # "tokens": class k's logits are mask token k's; "single_mask": [0, mask token 0's].
    semantic_head: str = "tokens"
    dice_weight: float = 0.8
    calibration: bool = True
    calibration_alpha: float = 0.7
    calibration_average: str = "batch"
    hypergradient_clip: float | None = None
    exact_jacobian: str = "adam"  # "adam" (exact) or "sgd" (D = 1, DARTS-style lookahead)
    exact_extra_lookahead: bool = False
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    fd_radius: float = 0.01
    fd_accumulate_bug: bool = False
    fd_step1_bias: bool = False
    fd_reference_b1: bool = False
    fd_final_attn_quirk: bool = False


def merge_box_masks(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """One semantic prediction from M box-prompted ones (docs/fewshot.md §6.4).

    Class k's merged logit is the largest, over the image's valid boxes, of that box's log-odds
    of k against background, z_m[k] - z_m[0]; background's is 0. So a pixel is background where
    every box predicts background, and otherwise takes the class with the highest odds in any
    box: for one class, the union of the per-box masks. Padded boxes are -inf and never win.

    Args:
        logits: (B, M, n, h, w), channel 0 background.
        valid: (B, M) bool, at least one True per image.

    Returns:
        (B, n, h, w) logits.
    """
    odds = logits[:, :, 1:] - logits[:, :, :1]  # (B, M, n - 1, h, w)
    odds = jnp.where(valid[:, :, None, None, None], odds, -jnp.inf)
    best = jnp.max(odds, axis=1)  # (B, n - 1, h, w)
    return jnp.concatenate([jnp.zeros_like(best[:, :1]), best], axis=1)


def forward(
    model: PromptDecoder,
    embeddings: jax.Array,
    boxes: jax.Array | None,
    cfg: StepConfig,
    box_residual: BoxResidual | None = None,
    box_valid: jax.Array | None = None,
) -> jax.Array:
    """Decoder logits for cached image embeddings, one box, M boxes or none per image.

    Args:
        model: prompt encoder + mask decoder.
        embeddings: (B, G, G, C) image embeddings.
        boxes: (B, 4) boxes in the model input frame; (B, M, 4): M boxes per image, each
            decoded on its own and merged by `merge_box_masks` (docs/fewshot.md §6.4); or None
            (BLO-SAM: no sparse prompt).
        cfg: step settings (calibration).
        box_residual: optional upper-level offset on the two box tokens.
        box_valid: (B, M) bool with (B, M, 4) boxes: False marks a padded slot (None: all real).

    Returns:
        (B, n, 4G, 4G) logits (calibrated when enabled, after the merge).
    """
    pe = model.prompt_encoder
    images = embeddings.shape[0]
    per_image = None
    if boxes is not None and boxes.ndim == 3:  # row i·M + m: image i with its box m
        per_image = boxes.shape[1]
        embeddings = jnp.repeat(embeddings, per_image, axis=0)  # (B·M, G, G, C)
        boxes = boxes.reshape(-1, 4)  # (B·M, 4)
    b = embeddings.shape[0]
    if boxes is None:
        sparse = jnp.zeros((b, 0, pe.embed_dim), jnp.float32)
    else:
        sparse = pe._embed_boxes(boxes)  # (B, 2, C): image b is paired with box b
        if box_residual is not None:
            sparse = sparse + box_residual.delta[...]
    g_h, g_w = pe.image_embedding_size
    dense = jnp.broadcast_to(
        pe.no_mask_embed.weight[...].reshape(1, 1, 1, -1), (b, g_h, g_w, pe.embed_dim)
    )
    masks, _, hyper, _ = model.mask_decoder.predict_masks(
        embeddings, pe.get_dense_pe(), sparse, dense
    )
    if cfg.semantic_head == "single_mask":  # docs/fewshot.md §2.3: [0, SAM's single mask]
        foreground = masks[:, :1]
        masks = jnp.concatenate([jnp.zeros_like(foreground), foreground], axis=1)
    if per_image is not None:
        valid = jnp.ones((images, per_image), bool) if box_valid is None else box_valid
        masks = merge_box_masks(masks.reshape(images, per_image, *masks.shape[1:]), valid)
    if cfg.calibration:
        masks = calibrate_masks(
            masks, hyper.shape[-1], cfg.calibration_alpha, cfg.calibration_average
        )
    return masks


@dataclasses.dataclass(frozen=True)
class Trainable:
    """The split model: graph definition and the three Variable groups."""

    graphdef: Any
    lower: nnx.State
    prompt: nnx.State
    frozen: nnx.State


def split_trainable(model: nnx.Module) -> Trainable:
    """graphdef, lower (LoRA + LowerParam), prompt (PromptParam), frozen (everything else)."""
    graphdef, lower, prompt, frozen = nnx.split(model, LOWER, PromptParam, ...)
    return Trainable(graphdef, lower, prompt, frozen)


class TrainingModel(nnx.Module):
    """What a step merges: the prompt decoder and the optional box residual."""

    def __init__(self, decoder: PromptDecoder, box_residual: BoxResidual | None):
        self.decoder = decoder
        self.box_residual = box_residual


def make_loss_fn(graphdef, cfg: StepConfig) -> Callable:
    """L(w, a, frozen, batch): the segmentation loss of one batch."""

    def loss_fn(lower, prompt, frozen, batch):
        model = nnx.merge(graphdef, lower, prompt, frozen)
        logits = forward(
            model.decoder, batch["embedding"], batch.get("box"), cfg, model.box_residual,
            batch.get("box_valid"),
        )  # fmt: skip
        return segmentation_loss(logits, batch["label"], cfg.dice_weight)

    return loss_fn


# The numbers a run may pass to the step at run time (`hyper`) instead of compiling them in: a
# sweep over them then reuses one compiled program (docs/fewshot.md §5.7). The schedules read
# the first five (`fewshot.trainer.schedules`), the optimisers the rest.
HYPER_KEYS = (
    "lower_lr", "upper_lr", "power", "total", "warmup_period",
    "lower_b1", "b1", "b2", "eps", "weight_decay",
)  # fmt: skip


def optimizers(
    lower_lr: Callable, upper_lr: Callable, lower_b1, b1, b2, eps, weight_decay
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """The lower and upper AdamW (their numbers: Python floats, or traced scalars inside a step)."""
    # eps_root > 0 keeps d sqrt(v)/dg finite where a lower gradient is exactly 0
    # (docs/fewshot.md §5.5); the float32 forward update is unchanged by 1e-30.
    lower_tx = optax.adamw(
        lower_lr, b1=lower_b1, b2=b2, eps=eps, eps_root=1e-30, weight_decay=weight_decay
    )
    upper_tx = optax.adamw(
        upper_lr, b1=b1, b2=b2, eps=eps, eps_root=1e-30, weight_decay=weight_decay
    )
    return lower_tx, upper_tx


def _adam_moments(opt_state):
    return optax.tree_utils.tree_get(opt_state, "mu"), optax.tree_utils.tree_get(opt_state, "nu")


def build_step(
    graphdef,
    cfg: StepConfig,
    lower_lr: Callable[[jax.Array], jax.Array],
    upper_lr: Callable[[jax.Array], jax.Array],
    lower_b1: float,
) -> tuple[Callable, optax.GradientTransformation, optax.GradientTransformation]:
    """The bi-level step as a pure function (unjitted) and the two optimisers.

    `make_step` jits it for one iteration per call, `make_epoch` scans it over many; the
    arguments are those of `make_step`. The step is step(state, frozen, batch1, batch2,
    hyper=None): `hyper` (a dict of the `HYPER_KEYS` as float32 scalars) gives the schedules' and
    optimisers' numbers at run time, and `lower_lr` / `upper_lr` are then called as (k, hyper);
    None compiles in those of `cfg`, `lower_lr` (k) and `upper_lr` (k).
    """
    if cfg.hypergradient not in HYPERGRADIENTS:
        raise ValueError(
            f"hypergradient must be one of {HYPERGRADIENTS}, got {cfg.hypergradient!r}"
        )
    numbers = {"lower_b1": lower_b1, "b1": cfg.b1, "b2": cfg.b2, "eps": cfg.eps,
               "weight_decay": cfg.weight_decay}  # fmt: skip
    lower_tx, upper_tx = optimizers(lower_lr, upper_lr, **numbers)
    loss_fn = make_loss_fn(graphdef, cfg)
    grad_w = jax.value_and_grad(loss_fn, argnums=0)
    grad_a = jax.value_and_grad(loss_fn, argnums=1)

    def step(state, frozen, batch1, batch2, hyper=None):
        lower, prompt = state["lower"], state["prompt"]
        lower_opt, prompt_opt, k = state["lower_opt"], state["prompt_opt"], state["step"]
        if hyper is None:
            num, lr_lower, lr_upper = numbers, lower_lr, upper_lr
            lower_tx_k, upper_tx_k = lower_tx, upper_tx
        else:
            num = {name: hyper[name] for name in numbers}
            lr_lower, lr_upper = lambda c: lower_lr(c, hyper), lambda c: upper_lr(c, hyper)
            lower_tx_k, upper_tx_k = optimizers(lr_lower, lr_upper, **num)
        eta = lr_lower(k)
        metrics = {"lower_lr": eta, "upper_lr": lr_upper(k)}

        def lower_update(lower, lower_opt, g):
            updates, lower_opt = lower_tx_k.update(g, lower_opt, lower)
            return optax.apply_updates(lower, updates), lower_opt

        if cfg.hypergradient == "exact" and not cfg.exact_extra_lookahead:

            def phi(a):
                loss1, g = grad_w(lower, a, frozen, batch1)
                if cfg.exact_jacobian == "adam":
                    w_next, opt_next = lower_update(lower, lower_opt, g)
                    return loss_fn(w_next, a, frozen, batch2), (w_next, opt_next, loss1, g)

                # D = 1: SGD-style lookahead for the hypergradient, real AdamW step for w.
                def sgd_lookahead(w, gw):
                    lr = jnp.asarray(eta, w.dtype)  # float32 (1 - lr * wd) is off by ~3e-8
                    return w * (1 - lr * num["weight_decay"]) - lr * gw

                w_virtual = jax.tree.map(sgd_lookahead, lower, g)
                w_next, opt_next = lower_update(lower, lower_opt, jax.lax.stop_gradient(g))
                return loss_fn(w_virtual, a, frozen, batch2), (w_next, opt_next, loss1, g)

            (loss2, (lower_next, lower_opt_next, loss1, g)), h = jax.value_and_grad(
                phi, has_aux=True
            )(prompt)
        else:
            loss1, g = grad_w(lower, prompt, frozen, batch1)
            lower_next, lower_opt_next = lower_update(lower, lower_opt, g)
            if cfg.hypergradient == "exact":  # extra lookahead from (w_{k+1}, s_{k+1})

                def phi_extra(a):
                    g2 = jax.grad(loss_fn, argnums=0)(lower_next, a, frozen, batch1)
                    w_virtual, _ = lower_update(lower_next, lower_opt_next, g2)
                    return loss_fn(w_virtual, a, frozen, batch2)

                loss2, h = jax.value_and_grad(phi_extra)(prompt)
            elif cfg.hypergradient in ("first_order", "none"):
                loss2, h = grad_a(lower_next, prompt, frozen, batch2)
            else:
                loss2, h = darts_fd_hypergradient(
                    loss_fn, lower_next, lower_opt_next, prompt, frozen, g, batch1, batch2,
                    eta, k, num, cfg,
                )  # fmt: skip
        h_norm = optax.global_norm(h)
        if cfg.hypergradient_clip is not None:
            scale = jnp.minimum(1.0, cfg.hypergradient_clip / (h_norm + 1e-12))
            h = jax.tree.map(lambda x: x * scale, h)
        if cfg.hypergradient == "none":
            prompt_next, prompt_opt_next = prompt, prompt_opt
        else:
            updates, prompt_opt_next = upper_tx_k.update(h, prompt_opt, prompt)
            prompt_next = optax.apply_updates(prompt, updates)
        metrics.update(
            lower_loss=loss1,
            upper_loss=loss2,
            hypergradient_norm=h_norm,
            lower_grad_norm=optax.global_norm(g),
        )
        new_state = {
            "lower": lower_next,
            "prompt": prompt_next,
            "lower_opt": lower_opt_next,
            "prompt_opt": prompt_opt_next,
            "step": k + 1,
        }
        return new_state, metrics

    return step, lower_tx, upper_tx


def make_step(
    graphdef,
    cfg: StepConfig,
    lower_lr: Callable[[jax.Array], jax.Array],
    upper_lr: Callable[[jax.Array], jax.Array],
    lower_b1: float,
) -> tuple[Callable, optax.GradientTransformation, optax.GradientTransformation]:
    """Builds the jitted bi-level step and the two optimisers.

    Args:
        graphdef: graph definition of the `TrainingModel`.
        cfg: static step settings.
        lower_lr: schedule k -> lower learning rate.
        upper_lr: schedule k -> upper learning rate.
        lower_b1: lower AdamW beta1 (0.95 reproduces the reference's OneCycleLR side effect).

    Returns:
        (step, lower_tx, upper_tx) with step(state, frozen, batch1, batch2, hyper=None) ->
        (state, metrics) (`hyper`: see `build_step`); state = {"lower", "prompt", "lower_opt",
        "prompt_opt", "step"} is donated.
    """
    step, lower_tx, upper_tx = build_step(graphdef, cfg, lower_lr, upper_lr, lower_b1)
    return (
        jax.jit(step, donate_argnums=0, compiler_options=decoder_program_options()),
        lower_tx,
        upper_tx,
    )


def make_epoch(step: Callable, mesh: Mesh | None = None) -> Callable:
    """One jitted `lax.scan` of the (unjitted) `build_step` step over a run of iterations.

    The batches stay on the device for the whole run: iteration t uses D1 batch `idx1[t]` and D2
    batch `idx2[t]` of the stacked splits, so a call transfers only the two index vectors. The
    scanned body is the step itself; its results are bitwise those of calling the jitted step
    once per iteration (tests/fewshot/test_blo.py checks it).

    With a `mesh` (docs/scale.md §2) the stacked batches come split over its data axis along
    their B axis (`training.mesh.shard_batch(..., axis=1)`), everything else replicated, and the
    state and metrics come back replicated.

    Returns:
        epoch(state, frozen, data1, data2, idx1, idx2, hyper=None) -> (state, metrics), with
        data1/data2 the batches stacked as dicts of (n_batches, B, ...) arrays, idx1/idx2 (T,)
        int32, `hyper` as the step's and metrics the step's scalars stacked to (T,); state is
        donated. Each distinct T compiles once.
    """
    return jax.jit(
        epoch_of(step),
        donate_argnums=0,
        compiler_options=decoder_program_options(),
        **replicated_outputs(mesh),
    )


def epoch_of(step: Callable) -> Callable:
    """`make_epoch`'s function before `jax.jit`: a `lax.scan` of `step` over (idx1, idx2)."""

    def epoch(state, frozen, data1, data2, idx1, idx2, hyper=None):
        def body(state, ij):
            i, j = ij
            batch1 = jax.tree.map(lambda x: x[i], data1)
            batch2 = jax.tree.map(lambda x: x[j], data2)
            return step(state, frozen, batch1, batch2, hyper)

        return jax.lax.scan(body, state, (idx1, idx2))

    return epoch


def darts_fd_hypergradient(
    loss_fn, lower_next, lower_opt_next, prompt, frozen, g, batch1, batch2, eta, k, num, cfg
):
    """The reference's unrolled, finite-difference hypergradient (docs/fewshot.md §5.4 b);
    `num` holds the optimisers' numbers (`lower_b1`, `b2`, `eps`, `weight_decay`).

    Returns:
        (L2 at the virtual point w', h = d - eta * hvp).
    """
    g_new = jax.grad(loss_fn, argnums=0)(lower_next, prompt, frozen, batch1)
    if cfg.fd_accumulate_bug:  # the reference never zeroes the step-2 gradient
        g_new = jax.tree.map(jnp.add, g_new, g)
    mu, nu = _adam_moments(lower_opt_next)
    b1 = 0.9 if cfg.fd_reference_b1 else num["lower_b1"]
    b2 = num["b2"]
    # Count of the virtual step in the default float dtype (float32 unless x64): with a float32
    # count, 1 - b2 ** t is off by ~1e-5 relative in a float64 run.
    t = 1.0 if cfg.fd_step1_bias else (k + 2).astype(float)
    c1, c2 = 1.0 - b1**t, 1.0 - b2**t

    def virtual(w, m, v, gw):
        lr = jnp.asarray(eta, w.dtype)
        m2 = b1 * m + (1 - b1) * gw
        v2 = b2 * v + (1 - b2) * gw * gw
        return w * (1 - lr * num["weight_decay"]) - (lr / c1) * m2 / (
            jnp.sqrt(v2) / jnp.sqrt(c2) + num["eps"]
        )

    w_virtual = jax.tree.map(virtual, lower_next, mu, nu, g_new)
    if cfg.fd_final_attn_quirk:
        w_virtual = _keep_final_attn(w_virtual, lower_next)
    loss2, (vvec, d) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        w_virtual, prompt, frozen, batch2
    )
    r = cfg.fd_radius / optax.global_norm(vvec)
    w_plus = jax.tree.map(lambda w, v: w + r * v, lower_next, vvec)
    w_minus = jax.tree.map(lambda w, v: w - r * v, lower_next, vvec)
    g_plus = jax.grad(loss_fn, argnums=1)(w_plus, prompt, frozen, batch1)
    g_minus = jax.grad(loss_fn, argnums=1)(w_minus, prompt, frozen, batch1)
    h = jax.tree.map(lambda dd, gp, gm: dd - eta * (gp - gm) / (2 * r), d, g_plus, g_minus)
    return loss2, h


def _keep_final_attn(w_virtual: nnx.State, w_next: nnx.State) -> nnx.State:
    """Reference quirk: the virtual step does not reach final_attn_token_to_image's LoRA."""
    flat_v = dict(nnx.to_flat_state(w_virtual))
    flat_n = dict(nnx.to_flat_state(w_next))
    merged = [(p, flat_n[p] if "final_attn_token_to_image" in p else v) for p, v in flat_v.items()]
    return nnx.from_flat_state(merged)
