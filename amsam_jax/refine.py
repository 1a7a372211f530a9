"""The mask-refinement module (spec `sum.md` §3.2 [rec]) and its CLI.

A "refiner" is a copy of SAM's prompt encoder + mask decoder, initialised from SAM. Its inputs
are the image embedding, the prompt that produced a mask and that mask's probabilities as the
dense mask prompt; its output is a refined 256² logit map. It is trained on human labels: for
each GT mask, frozen SAM predicts a mask from a prompt drawn from the GT (its tight box, or a
uniform point in it), and the refiner learns to turn (prompt, SAM's mask) into the GT with
focal ×20 + dice ×1. It is then run once over the pseudo-labelled pool; σ(refined) is stored
8-bit per mask as `<stem>.refined.npz`, from which U = |p_SAM − p_ref| (spec §3.1).

    python -m amsam_jax.refine train --config train/configs/sum.py --workdir runs/refiner
    python -m amsam_jax.refine apply --refiner runs/refiner --images DIR [--labels DIR] --out DIR
"""

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from amsam_jax import sum_data
from amsam_jax.sampling import box_from_mask, sample_first_point
from amsam_jax.sum_loss import SumLossConfig, valid_mask
from amsam_jax.sum_step import decode, round_loss, split_sum_model
from amsam_jax.trainer import TrainError, log, restore_tree, save_tree

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
        from amsam_jax.sum_loss import upsample_logits

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


def _state_tree(state):
    return {
        "params": state["params"].to_pure_dict(),
        "opt": {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state["opt"]))},
    }


def train_refiner(cfg, workdir: Path, sam, sam_cfg, weights_key: str, weights: str) -> Path:
    """Trains (or resumes, or finds finished) a refiner in `workdir`; returns its SAM dir."""
    from amsam_jax.checkpoint import save_sam
    from amsam_jax.sum_trainer import Embedder, labelled_specs, pick

    workdir = Path(workdir).absolute()
    out = workdir / REFINER_SAM
    if (out / "config.json").is_file():
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json())
    r = cfg.refine
    labelled = sum_data.LabelledSet(labelled_specs(cfg), cfg.data.labelled_split)
    low = sam.prompt_encoder.mask_input_size[0]
    shapes = sum_data.Shapes(r.images, r.masks_per_image, sam_cfg.image_size, low)
    embedder = Embedder(sam, weights_key, sam_cfg.image_size)
    t = split_sum_model(sam)
    tx = optax.adam(r.lr)
    step_fn = make_refiner_step(t.graphdef, tx)
    initial = {"params": t.params, "opt": tx.init(t.params), "step": jnp.asarray(0, jnp.int32)}
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), initial)
    sam_params = jax.tree.map(lambda x: jnp.array(x, copy=True), t.params)
    it = 0
    restored = restore_tree(workdir, "latest", _state_tree(initial))
    if restored is not None:
        tree, meta = restored
        params = jax.tree.map(lambda x: x, initial["params"])
        nnx.replace_by_pure_dict(params, tree["params"])
        treedef = jax.tree.structure(initial["opt"])
        opt = jax.tree.unflatten(treedef, [tree["opt"][k] for k in sorted(tree["opt"])])
        it = int(meta["step"])
        state = {"params": params, "opt": opt, "step": jnp.asarray(it, jnp.int32)}
        log(f"refiner: resume from step {it}")
    log(f"refiner: {r.steps} steps on {len(labelled)} labelled images ({weights})")
    key = jax.random.key(cfg.seed + 1)
    last_save = time.perf_counter()
    metrics_path = workdir / "metrics.jsonl"
    while it < r.steps:
        rng = np.random.default_rng([cfg.seed, 5, it])
        entries = [
            labelled.load(pick(cfg.seed, 2, it * r.images + j, len(labelled)))
            for j in range(r.images)
        ]
        emb = np.stack([embedder(e.key, e.image) for e in entries])
        batch = sum_data.make_batch(entries, emb, shapes, rng)
        use_box = bool(rng.random() < r.p_box)
        state, metrics = step_fn(state, t.frozen, sam_params, t.task, batch,
                                 jax.random.fold_in(key, it), use_box)  # fmt: skip
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            raise TrainError(f"refiner: non-finite loss at step {it}")
        it += 1
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": it, **metrics}) + "\n")
        if it < r.steps and time.perf_counter() - last_save >= cfg.train.checkpoint_every_s:
            save_tree(workdir, "latest", _state_tree(state), {"step": it})
            last_save = time.perf_counter()
    graphdef, sam_state = nnx.split(sam)
    refined = nnx.merge(graphdef, sam_state)
    from amsam_jax.blo import PromptDecoder

    nnx.update(PromptDecoder(refined), state["params"])
    tmp = workdir / (REFINER_SAM + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_sam(refined, sam_cfg, tmp, {"refiner_of": weights, "steps": it})
    tmp.rename(out)
    log(f"refiner: saved {out}")
    return out


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
    from amsam_jax.checkpoint import load_sam, read_sam_config
    from amsam_jax.sa1b import PseudoLabelError, iter_pseudo_labels, prepare_label
    from amsam_jax.transforms import read_image_rgb

    sam = load_sam(refiner_sam_dir)
    size = read_sam_config(refiner_sam_dir)[0].image_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graphdef, state = nnx.split(sam)
    enc_graphdef, enc_state = nnx.split(sam.image_encoder)
    encoder = jax.jit(lambda st, x: nnx.merge(enc_graphdef, st)(x))
    try:
        items = list(iter_pseudo_labels(images_dir, labels_dir))
    except PseudoLabelError as e:
        raise TrainError(str(e)) from None
    written = 0
    for item in items:
        path = out_dir / f"{item.image_path.stem}{sum_data.REFINED_SUFFIX}"
        if path.exists():
            continue
        ann = item.annotations
        k = len(ann.annotations)
        low = sam.prompt_encoder.mask_input_size[0]
        if k == 0:
            sum_data.write_refined(path, np.zeros((0, low, low), np.uint8), np.zeros(0, bool))
            continue
        image = read_image_rgb(item.image_path)
        frame, hw = sum_data.model_frame_image(image, size)
        embedding = encoder(enc_state, jnp.asarray(frame[None]))
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
        sum_data.write_refined(path, np.concatenate(maps), np.ones(k, bool))
        written += 1
    say(f"refiner: wrote maps for {written} images into {out_dir}")
    return written


def ensure_refined_maps(
    cfg, workdir: Path, sam, sam_cfg, weights_key, weights, images_dir, labels_dir, say
) -> Path:
    """The run's refined-map folder: trains a refiner first unless `data.refiner` names one."""
    if cfg.data.refiner:
        refiner_dir = Path(cfg.data.refiner) / REFINER_SAM
        if not (refiner_dir / "config.json").is_file():
            raise TrainError(
                f"{cfg.data.refiner}: not a trained refiner (no {REFINER_SAM}/; train one with "
                "`python -m amsam_jax.refine train`)"
            )
    else:
        refiner_dir = train_refiner(cfg, workdir / "refiner", sam, sam_cfg, weights_key, weights)
    out = workdir / "refined"
    refine_folder(refiner_dir, images_dir, labels_dir, out, cfg.refine.batch_masks, say)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amsam_jax.refine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a refiner on the config's labelled data")
    tr.add_argument("--config", help="train/configs/sum.py[:smoke] (default: sum)")
    tr.add_argument("--workdir", required=True)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap = sub.add_parser("apply", help="write <stem>.refined.npz for a pseudo-labelled folder")
    ap.add_argument("--refiner", required=True, help="a refiner workdir (or its refiner_sam/)")
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", help="SA-1B-format json folder (default: next to the images)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-masks", type=int, default=16)
    args = parser.parse_args(argv)

    from amsam_jax.checkpoint import CheckpointError
    from amsam_jax.configs import apply_overrides
    from amsam_jax.data import DataError
    from amsam_jax.train import ConfigError, enable_compilation_cache, load_config

    enable_compilation_cache()
    try:
        if args.command == "train":
            from amsam_jax.recipes import sum_recipe
            from amsam_jax.sum_config import SumConfig
            from amsam_jax.trainer import resolve_sam

            base = load_config(args.config) if args.config else sum_recipe()
            cfg = apply_overrides(base, args.set)
            if not isinstance(cfg, SumConfig):
                raise ConfigError(f"{args.config}: not a SUM config")
            sam, sam_cfg, key, weights = resolve_sam(cfg)
            out = train_refiner(cfg, Path(args.workdir), sam, sam_cfg, key, weights)
            print(json.dumps({"refiner_sam": str(out)}))
        else:
            ref = Path(args.refiner)
            ref = ref / REFINER_SAM if (ref / REFINER_SAM).is_dir() else ref
            n = refine_folder(ref, args.images, args.labels, args.out, args.batch_masks)
            print(json.dumps({"written": n, "out": args.out}))
    except (ConfigError, ValueError, TrainError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
