"""SUM's interactive training step (docs/sum.md §7.2), and the pieces the refiner's step shares.

One jitted function per step kind. An episode decodes every mask of the batch R + 2 times:
round 1 (a positive point with multimask output, or a jittered box), R - 1 corrective rounds
(one point each, sampled from the error region with weights 1 - U), a mask-only round at a
random position among them and a last mask-only round. The previous round's low-res logits are
fed back with stop-gradient, so each round's gradient is taken on its own (`value_and_grad`
per round, summed): the same gradient as differentiating the round-averaged loss, with the
activations of one round alive at a time.

Static shapes: the points of round t live in slots 0..k_t-1; the mid mask-only round keeps its
slot as a padding point (label -1), SAM's own representation of "no point", so one compiled
function serves every position of that round.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from amsam_jax.modeling.prompt_encoder import TaskParam
from amsam_jax.modeling.sam import Sam
from amsam_jax.sum.loss import (
    SumLossConfig,
    dice_loss_per_mask,
    focal_loss_per_mask,
    iou_target,
    upsample_logits,
    valid_mask,
)
from amsam_jax.sum.sampling import (
    append_point,
    box_from_mask,
    jitter_box,
    sample_corrective_point,
    sample_first_point,
)
from amsam_jax.sum.uncertainty import uncertainty_map, zero_missing_maps
from amsam_jax.training.mesh import replicated
from amsam_jax.training.prompt_decoder import PromptDecoder


@dataclasses.dataclass(frozen=True)
class SumStepConfig:
    """Static settings of the interactive step (hashable)."""

    size: int = 1024
    num_point_rounds: int = 8
    num_mask_only_rounds: int = 2
    box_jitter: str = "sum"
    box_jitter_std_frac: float = 0.1
    box_jitter_max_px: float = 20.0
    grid_scale: int = 1  # 1: sample on the S frame; 4: on the low-res grid (docs/sum.md §5.7)
    use_uncertainty_sampling: bool = True
    sampling_threshold: float | None = None
    use_task_prompt: bool = True
    loss: SumLossConfig = SumLossConfig()

    def __post_init__(self):
        if self.num_point_rounds < 1:
            raise ValueError("train.num_point_rounds must be >= 1")
        if self.num_mask_only_rounds not in (0, 1, 2):
            raise ValueError("train.num_mask_only_rounds must be 0, 1 or 2 (mid + last)")

    @property
    def num_passes(self) -> int:
        return self.num_point_rounds + self.num_mask_only_rounds


@dataclasses.dataclass
class SumTrainable:
    """The partition of SAM's prompt encoder + mask decoder (the image encoder never enters)."""

    graphdef: nnx.GraphDef
    task: nnx.State  # the task table (TaskParam)
    params: nnx.State  # every other nnx.Param of the prompt encoder and mask decoder
    frozen: nnx.State  # buffers


def split_sum_model(sam: Sam) -> SumTrainable:
    graphdef, task, params, frozen = nnx.split(PromptDecoder(sam), TaskParam, nnx.Param, ...)
    return SumTrainable(graphdef, task, params, frozen)


def decode(model, embedding, image_index, coords, labels, box, mask_input, task, multimask):
    """Masks of one round: (M, K, L, L) low-res logits and (M, K) IoU predictions."""
    points = None if coords is None else (coords, labels)
    sparse, dense = model.prompt_encoder(points, box, mask_input, task)
    return model.mask_decoder(
        embedding[image_index], model.prompt_encoder.get_dense_pe(), sparse, dense, multimask
    )


def round_loss(low, iou_pred, y, u, valid_hw, weight, loss_cfg: SumLossConfig):
    """docs/sum.md §6.4 per mask for K outputs: the mask loss is the minimum over the K outputs,
    the IoU head is trained on all K. Returns (loss, chosen output index (M,), upsampled chosen
    logits (M, S, S), metrics)."""
    m, k, low_res = low.shape[0], low.shape[1], low.shape[-1]
    size = y.shape[-1]
    up = upsample_logits(low.reshape(m * k, low_res, low_res), size)

    def rep(a):
        return None if a is None else jnp.repeat(a, k, axis=0)

    yk, uk, hwk = rep(y), rep(u), rep(valid_hw)
    focal = focal_loss_per_mask(up, yk, uk, hwk, loss_cfg.focal_alpha, loss_cfg.focal_gamma)
    dice = dice_loss_per_mask(
        up, yk, uk, hwk, loss_cfg.dice_smooth, loss_cfg.dice_uncertainty_threshold,
        loss_cfg.dice_mode,
    )  # fmt: skip
    mask_loss = (loss_cfg.lambda_focal * focal + loss_cfg.lambda_dice * dice).reshape(m, k)
    iou_loss = jnp.square(iou_pred - iou_target(up, yk, hwk).reshape(m, k))
    chosen = jnp.argmin(mask_loss, axis=1)
    per_mask = jnp.take_along_axis(mask_loss, chosen[:, None], 1)[:, 0] + (
        loss_cfg.lambda_iou * jnp.mean(iou_loss, axis=1)
    )
    denom = jnp.maximum(jnp.sum(weight), 1.0)
    loss = jnp.sum(weight * per_mask) / denom
    up_chosen = jnp.take_along_axis(up.reshape(m, k, size, size), chosen[:, None, None, None], 1)

    def chosen_mean(v):
        picked = jnp.take_along_axis(v.reshape(m, k), chosen[:, None], 1)[:, 0]
        return jnp.sum(weight * picked) / denom

    metrics = {
        "focal": chosen_mean(focal),
        "dice": chosen_mean(dice),
        "iou_mse": jnp.sum(weight * jnp.mean(iou_loss, axis=1)) / denom,
    }
    return loss, (chosen, up_chosen[:, 0], metrics)


def episode_inputs(batch: dict, cfg: SumStepConfig):
    """Targets, U (for the loss and for sampling) and per-mask settings of a batch."""
    size = cfg.size
    prob = batch["prob"]
    y = prob > 127  # p/255 > 0.5
    u = uncertainty_map(prob, batch["refined"], size)
    u, _ = zero_missing_maps(u, batch["has_refined"])
    u_loss = u if cfg.loss.use_uncertainty else None
    u_sample = u if cfg.use_uncertainty_sampling else None
    task = batch["task"] if cfg.use_task_prompt else None
    return y, u_loss, u_sample, task


def _grid(a, cfg: SumStepConfig):
    """A (M, S, S) map on the sampling grid (the S frame, or every 4th pixel from 1)."""
    if a is None or cfg.grid_scale == 1:
        return a
    return a[
        :, cfg.grid_scale // 2 - 1 :: cfg.grid_scale, cfg.grid_scale // 2 - 1 :: cfg.grid_scale
    ]


def make_sum_step(
    graphdef: nnx.GraphDef, cfg: SumStepConfig, params_tx, task_tx, mesh: Mesh | None = None
):
    """The jitted step(state, frozen, batch, key, first_is_box) -> (state, metrics).

    state = {"params", "task", "params_opt", "task_opt", "step"}; `first_is_box` is static
    (two compiled variants per batch shape).

    With a `mesh` (docs/scale.md §2), the step expects the batch's per-mask arrays split over its
    data axis and everything else replicated (`training.mesh.shard_batch` with
    `replicate_keys=("embedding",)`, `training.mesh.replicate`), and returns the new state and the
    metrics replicated: `jit` turns the loss's sums over masks into per-device partial sums and
    one all-reduce, so the gradient is the global batch's.
    """

    def pass_fn(params, task_state, frozen, batch, y, u_loss, prompt, multimask):
        model = nnx.merge(graphdef, task_state, params, frozen)
        coords, labels, box, mask_input, task = prompt
        low, iou = decode(
            model, batch["embedding"], batch["image_index"], coords, labels, box, mask_input,
            task, multimask,
        )  # fmt: skip
        loss, (chosen, up, metrics) = round_loss(
            low, iou, y, u_loss, batch["valid_hw"], batch["weight"], cfg.loss
        )
        chosen_low = jnp.take_along_axis(low, chosen[:, None, None, None], 1)[:, 0]
        return loss, (chosen_low, up, metrics)

    grad_fn = jax.value_and_grad(pass_fn, argnums=(0, 1), has_aux=True)

    def step(state, frozen, batch, key, first_is_box: bool):
        y, u_loss, u_sample, task = episode_inputs(batch, cfg)
        hw = batch["valid_hw"]
        gs = cfg.grid_scale
        y_g, u_g = _grid(y, cfg), _grid(u_sample, cfg)
        hw_g = (hw + gs - 1) // gs
        k_backup, k_first, k_mid, k_rounds = jax.random.split(key, 4)
        # Backup point (docs/sum.md §5.6): the SA-1B seed point if any, else a uniform draw from y.
        uniform, _ = sample_first_point(
            k_backup, y_g, jnp.zeros(hw.shape, jnp.float32), None, hw_g, None, gs
        )
        seed = batch["seed"]
        backup = jnp.where(jnp.isnan(seed), uniform, seed)
        coords = labels = box = None
        if first_is_box:
            box = jitter_box(
                k_first, box_from_mask(y & valid_mask(hw, y.shape)), hw, cfg.box_jitter,
                cfg.box_jitter_std_frac, cfg.box_jitter_max_px,
            )  # fmt: skip
        else:
            first, first_label = sample_first_point(
                k_first, y_g, backup, u_g, hw_g, cfg.sampling_threshold, gs
            )
            coords, labels = append_point(None, None, first, first_label)
            backup = first
        n_mid = 1 if cfg.num_mask_only_rounds == 2 else 0
        last_mid_pass = cfg.num_point_rounds + n_mid
        mid = jax.random.randint(k_mid, (), 2, last_mid_pass + 1)  # pass index of the mid round
        zeros = jax.tree.map(jnp.zeros_like, (state["params"], state["task"]))
        grads, total, mask_input, pred = zeros, 0.0, None, None
        metrics_sum = None
        n_pass = 0

        def run(prompt, multimask):
            return grad_fn(
                state["params"], state["task"], frozen, batch, y, u_loss, prompt, multimask
            )

        for t in range(1, cfg.num_passes + 1):
            last_mask_only = cfg.num_mask_only_rounds >= 1 and t == cfg.num_passes
            if 2 <= t <= last_mid_pass:
                pred_g = _grid(pred, cfg) if gs == 1 else (mask_input[..., 0] > 0)
                point, label = sample_corrective_point(
                    jax.random.fold_in(k_rounds, t), y_g, pred_g, backup, u_g, hw_g,
                    cfg.sampling_threshold, gs,
                )  # fmt: skip
                is_mid = (t == mid) & (n_mid == 1)
                point = jnp.where(is_mid, 0.0, point)
                label = jnp.where(is_mid, -1, label)
                coords, labels = append_point(coords, labels, point, label)
            elif t > 1 and not last_mask_only:
                raise AssertionError("unreachable round layout")
            prompt = (coords, labels, box, mask_input, task)
            (loss, (low, up, m)), g = run(prompt, multimask=t == 1 and not first_is_box)
            grads = jax.tree.map(jnp.add, grads, g)
            total = total + loss
            metrics_sum = m if metrics_sum is None else jax.tree.map(jnp.add, metrics_sum, m)
            mask_input = jax.lax.stop_gradient(low)[..., None]
            pred = jax.lax.stop_gradient(up) > 0
            n_pass += 1
        grads = jax.tree.map(lambda x: x / n_pass, grads)
        g_params, g_task = grads
        updates, params_opt = params_tx.update(g_params, state["params_opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        task_opt, task_state = state["task_opt"], state["task"]
        if cfg.use_task_prompt:
            t_updates, task_opt = task_tx.update(g_task, state["task_opt"], state["task"])
            task_state = optax.apply_updates(state["task"], t_updates)
        final_iou = jnp.sum(batch["weight"] * _iou(pred, y, hw)) / jnp.maximum(
            jnp.sum(batch["weight"]), 1.0
        )
        metrics = {
            "loss": total / n_pass,
            **{k: v / n_pass for k, v in metrics_sum.items()},
            "final_round_iou": final_iou,
            "grad_norm": optax.global_norm(g_params),
            "task_grad_norm": optax.global_norm(g_task),
            "masks": jnp.sum(batch["weight"]),
        }
        new_state = {
            "params": params,
            "task": task_state,
            "params_opt": params_opt,
            "task_opt": task_opt,
            "step": state["step"] + 1,
        }
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, static_argnums=(4,), donate_argnums=(0,))
    return jax.jit(step, static_argnums=(4,), donate_argnums=(0,), out_shardings=replicated(mesh))


def _iou(pred, y, hw):
    valid = valid_mask(hw, y.shape)
    p, t = pred & valid, y & valid
    inter = jnp.sum(p & t, axis=(1, 2))
    union = jnp.sum(p | t, axis=(1, 2))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def lr_schedule(base: float, total_steps: int, drop_frac: float, factor: float):
    """Constant `base`, times `factor` from optimiser step floor(drop_frac · total) on."""
    drop = int(drop_frac * total_steps)
    return lambda count: base * jnp.where(count >= drop, factor, 1.0)


def make_optimizers(train_cfg, total_updates: int):
    """Adam (weight decay 0, no clipping; docs/sum.md §7.2.7) for SAM's weights and task table."""
    params_tx = optax.adam(
        lr_schedule(
            train_cfg.lr_pretrained, total_updates, train_cfg.lr_drop_frac,
            train_cfg.lr_drop_factor,
        ),
        b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
    )  # fmt: skip
    task_tx = optax.adam(
        lr_schedule(
            train_cfg.lr_task, total_updates, train_cfg.lr_drop_frac, train_cfg.lr_drop_factor
        ),
        b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
    )  # fmt: skip
    return params_tx, task_tx
