"""The mask-refinement module (docs/sum.md §3.2): training it, and its maps for a pool.

A "refiner" is a copy of SAM's prompt encoder + mask decoder, initialised from SAM. Its inputs
are the image embedding, the prompt that produced a mask and that mask's probabilities as the
dense mask prompt; its output is a refined 256² logit map. It is trained on human labels: for
each GT mask, frozen SAM predicts a mask from a prompt drawn from the GT (its tight box, or a
uniform point in it), and the refiner learns to turn (prompt, SAM's mask) into the GT with
focal ×20 + dice ×1. It is then run once over the pseudo-labelled pool; σ(refined) is stored
8-bit per mask as `<stem>.refined.npz`, from which U = |p_SAM − p_ref| (docs/sum.md §3.1).
The command line is `python -m amsam_jax.refine train|apply`.
"""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from amsam_jax.checkpoint import load_sam, read_sam_config, save_sam
from amsam_jax.data.sa1b import iter_pseudo_labels
from amsam_jax.sum.config import SumConfig
from amsam_jax.sum.data import (
    REFINED_SUFFIX,
    LabelledSet,
    Shapes,
    embed_entries,
    frame_key,
    labelled_specs,
    make_batch,
    model_frame_image,
    pick,
    prepare_label,
    write_refined,
)
from amsam_jax.sum.loss import SumLossConfig, upsample_logits, valid_mask
from amsam_jax.sum.sampling import box_from_mask, sample_first_point
from amsam_jax.sum.step import decode, round_loss, split_sum_model
from amsam_jax.training.embedder import Embedder
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.training.run import Run, TrainError, log
from amsam_jax.training.state import clone_state, init_optimizer
from amsam_jax.utils.image import read_image
from amsam_jax.utils.io import atomic_directory

REFINER_SAM = "refiner_sam"  # converted-SAM directory: base SAM with the refiner's decoder
REFINER_LOSS = SumLossConfig(lambda_focal=20.0, lambda_dice=1.0, lambda_iou=0.0)


def prob_to_mask_prompt(prob_u8: jax.Array, low_res: int) -> jax.Array:
    """8-bit probabilities on the S×S frame -> (M, L, L, 1) logits for the mask prompt: mean over
    S/L × S/L blocks, clipped to half a quantisation step from 0 and 1, then logit."""
    m, s, _ = prob_u8.shape
    f = s // low_res
    p = jnp.asarray(prob_u8, jnp.float32).reshape(m, low_res, f, low_res, f).mean(axis=(2, 4))
    p = jnp.clip(p / 255.0, 0.5 / 255.0, 1.0 - 0.5 / 255.0)
    return jnp.log(p / (1.0 - p))[..., None]


def _prompt(y, hw, key, use_box):
    if use_box:
        return None, None, box_from_mask(y & valid_mask(hw, y.shape))
    point, label = sample_first_point(key, y, jnp.zeros(hw.shape, jnp.float32), None, hw)
    return point[:, None], label[:, None], None


def make_refiner_step(graphdef, tx):
    """step(state, frozen, sam_params, task, batch, key, use_box) -> (state, metrics)."""

    def loss_fn(params, task, frozen, sam_params, batch, key, use_box):
        y = batch["prob"] > 127
        hw = batch["valid_hw"]
        coords, labels, box = _prompt(y, hw, key, use_box)
        sam = nnx.merge(graphdef, task, sam_params, frozen)
        low_sam, _ = decode(sam, batch["embedding"], batch["image_index"], coords, labels, box,
                            None, None, False)  # fmt: skip
        size = y.shape[-1]
        sam_prob = jnp.round(255.0 * jax.nn.sigmoid(upsample_logits(low_sam[:, 0], size)))
        mask_prompt = jax.lax.stop_gradient(prob_to_mask_prompt(sam_prob, low_sam.shape[-1]))
        refiner = nnx.merge(graphdef, task, params, frozen)
        low, iou = decode(refiner, batch["embedding"], batch["image_index"], coords, labels, box,
                          mask_prompt, None, False)  # fmt: skip
        loss, (_, _, metrics) = round_loss(low, iou, y, None, hw, batch["weight"], REFINER_LOSS)
        # The same loss of SAM's own mask: how much the refiner improves on it.
        sam_loss, _ = round_loss(low_sam, iou, y, None, hw, batch["weight"], REFINER_LOSS)
        return loss, {**metrics, "loss": loss, "sam_loss": sam_loss}

    def step(state, frozen, sam_params, task, batch, key, use_box: bool):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], task, frozen, sam_params, batch, key, use_box
        )
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

    return jax.jit(step, static_argnums=(6,), donate_argnums=(0,))


def train_refiner(
    cfg: SumConfig, workdir: Path, sam, sam_cfg, embedder: Embedder, weights: str
) -> Path:
    """Trains (or resumes, or finds finished) a refiner in `workdir`; returns its SAM dir."""
    r = cfg.validate().refine
    run = Run(workdir, cfg.to_dict(), cfg.train.checkpoint_every_s, defaults=type(cfg)().to_dict())
    out = run.workdir / REFINER_SAM
    if run.summary() is not None and (out / "config.json").is_file():
        return out
    labelled = LabelledSet(labelled_specs(cfg), cfg.data.labelled_split)
    low = sam.prompt_encoder.mask_input_size[0]
    shapes = Shapes(r.images, r.masks_per_image, sam_cfg.image_size, low)
    t = split_sum_model(sam)
    tx = optax.adam(r.lr)
    step_fn = make_refiner_step(t.graphdef, tx)
    opt = init_optimizer(tx, t.params)
    initial = {"params": t.params, "opt": opt, "step": jnp.asarray(0, jnp.int32)}
    state = clone_state(initial)
    sam_params = clone_state(t.params)
    it = 0
    restored = run.restore(initial)
    if restored is not None:
        state, meta = restored
        it = int(meta["step"])
        log(f"refiner: resume from step {it}")
    writer = run.metrics(it if restored is not None else None)
    log(f"refiner: {r.steps} steps on {len(labelled)} labelled images ({weights})")
    key = jax.random.key(cfg.seed + 1)
    with run.interruptible():
        state, it = _refiner_loop(cfg, run, writer, labelled, embedder, sam_cfg, shapes, t,
                                  step_fn, state, sam_params, key, it)  # fmt: skip
    # A copy: nnx.merge of nnx.split(sam) would share sam's Variables, and the update below
    # would then hand the refiner's decoder to the SUM run that called this.
    refined = nnx.clone(sam)
    nnx.update(PromptDecoder(refined), state["params"])
    with atomic_directory(out, overwrite=True) as tmp:
        save_sam(refined, sam_cfg, tmp, {"refiner_of": weights, "steps": it})
    run.write_summary({"refiner_sam": str(out), "steps": it, "weights": weights})
    log(f"refiner: saved {out}")
    return out


def _refiner_loop(cfg, run, writer, labelled, embedder, sam_cfg, shapes, t, step_fn, state,
                  sam_params, key, it):  # fmt: skip
    """Refiner steps from `it` to `refine.steps`; returns (state, steps done)."""
    r = cfg.refine
    while it < r.steps:
        rng = np.random.default_rng([cfg.seed, 5, it])
        entries = [
            labelled.load(pick(cfg.seed, 2, it * r.images + j, len(labelled)))
            for j in range(r.images)
        ]
        emb = embed_entries(embedder, entries, sam_cfg.image_size, sam_cfg.preprocess)
        batch = make_batch(entries, emb, shapes, rng)
        use_box = bool(rng.random() < r.p_box)
        state, metrics = step_fn(state, t.frozen, sam_params, t.task, batch,
                                 jax.random.fold_in(key, it), use_box)  # fmt: skip
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        run.check_finite({"loss": metrics["loss"]}, f"refiner step {it}")
        it += 1
        writer.write({"step": it, **metrics})
        if it < r.steps:
            run.save_latest(state, {"step": it})
            run.stop_if_requested(state, {"step": it}, f"refiner step {it}")
    return state, it


@partial(jax.jit, static_argnums=(0, 4))
def _refine_chunk(graphdef, state, embedding, prompts, use_box: bool):
    model = nnx.merge(graphdef, state)
    prob, coords, boxes = prompts
    mask_prompt = prob_to_mask_prompt(prob, model.prompt_encoder.mask_input_size[0])
    m = prob.shape[0]
    points = None if use_box else (coords[:, None], jnp.ones((m, 1), jnp.int32))
    sparse, dense = model.prompt_encoder(points, boxes if use_box else None, mask_prompt, None)
    emb = jnp.broadcast_to(embedding, (m, *embedding.shape[1:]))
    low, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
    return jnp.round(255.0 * jax.nn.sigmoid(low[:, 0])).astype(jnp.uint8)


def refine_folder(refiner_sam_dir, images_dir, labels_dir, out_dir, batch_masks: int = 16,
                  say=log) -> int:  # fmt: skip
    """Writes `<stem>.refined.npz` for every pseudo-labelled image (skips existing ones).

    Returns:
        the number of images written.
    """
    sam = load_sam(refiner_sam_dir)
    size = read_sam_config(refiner_sam_dir)[0].image_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphdef, state = nnx.split(sam)
    embedder = Embedder(sam.image_encoder, None)  # one pass over the pool: no disk cache
    items = list(iter_pseudo_labels(images_dir, labels_dir))
    written = 0
    for item in items:
        path = out_dir / f"{item.image_path.stem}{REFINED_SUFFIX}"
        if path.exists():
            continue
        ann = item.annotations
        k = len(ann.annotations)
        low = sam.prompt_encoder.mask_input_size[0]
        if k == 0:
            write_refined(path, np.zeros((0, low, low), np.uint8), np.zeros(0, bool))
            continue
        image = read_image(item.image_path)
        frame, hw = model_frame_image(image, size, sam.preprocess_mode)
        embedding = jnp.asarray(embedder.embed(frame[None], frame_key(size, sam.preprocess_mode)))
        prob, _ = prepare_label(ann.load_prob(), size)
        h0, w0 = ann.size
        scale = np.asarray([hw[1] / w0, hw[0] / h0, hw[1] / w0, hw[0] / h0])
        seeds = [a.get("point_coords") or [] for a in ann.annotations]
        use_box = not all(seeds)
        coords = np.asarray([s[0][:2] if s else (0.0, 0.0) for s in seeds], np.float64) * scale[:2]
        boxes = np.asarray([a["bbox"] for a in ann.annotations], np.float64)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        boxes = boxes * scale
        maps = []
        for start in range(0, k, batch_masks):
            idx = np.arange(start, min(start + batch_masks, k))
            pad = np.concatenate([idx, np.full(batch_masks - len(idx), idx[-1])])
            chunk = (
                jnp.asarray(prob[pad]),
                jnp.asarray(np.floor(coords[pad]), jnp.float32),
                jnp.asarray(boxes[pad], jnp.float32),
            )
            maps.append(np.asarray(_refine_chunk(graphdef, state, embedding, chunk, use_box))[
                : len(idx)])  # fmt: skip
        write_refined(path, np.concatenate(maps), np.ones(k, bool))
        written += 1
    say(f"refiner: wrote maps for {written} images into {out_dir}")
    return written


def ensure_refined_maps(
    cfg: SumConfig, workdir: Path, sam, sam_cfg, embedder: Embedder, weights: str, images_dir,
    labels_dir, say,
) -> Path:  # fmt: skip
    """The run's refined-map folder: trains a refiner first unless `data.refiner` names one."""
    if cfg.data.refiner:
        refiner_dir = Path(cfg.data.refiner) / REFINER_SAM
        if not (refiner_dir / "config.json").is_file():
            raise TrainError(
                cfg.data.refiner,
                f"not a trained refiner (no {REFINER_SAM}/; train one with "
                "`python -m amsam_jax.refine train`)",
            )
    else:
        refiner_dir = train_refiner(cfg, workdir / "refiner", sam, sam_cfg, embedder, weights)
    out = workdir / "refined"
    refine_folder(refiner_dir, images_dir, labels_dir, out, cfg.refine.batch_masks, say)
    return out
