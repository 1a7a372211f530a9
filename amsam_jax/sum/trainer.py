"""The SUM trainer (docs/sum.md §7.2): interactive fine-tuning of SAM's prompt encoder and mask
decoder on human labels plus uncertainty-weighted pseudo-labels.

    python -m amsam_jax.train --config train/configs/sum.py --workdir runs/sum

The run machinery (config guard, resume, metrics, checkpoints, NaN stop) is `training.run`. The
data order, the prompts and the rounds derive from (seed, iteration) only, so a killed run resumed
from `latest` continues exactly as if it had not stopped.

On several devices or processes (docs/scale.md) the step runs over the `mesh.data` mesh: every
process builds the same global batch, its masks are split over the devices, the state is
replicated. Process 0 alone writes the metrics, the export, the plots and the evaluation.
"""

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from amsam_jax.checkpoint import save_sam
from amsam_jax.data.folder import DataError
from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.evaluation.interactive import evaluate_interactive, labelled_eval_masks
from amsam_jax.evaluation.plots import plot_metric_vs_clicks, plot_sum_curves
from amsam_jax.sum.config import SumConfig
from amsam_jax.sum.data import (
    LabelledSet,
    PseudoSet,
    Shapes,
    embed_entries,
    labelled_specs,
    make_batch,
    pick,
)
from amsam_jax.sum.pseudo_labels import label_folder
from amsam_jax.sum.refiner import ensure_refined_maps
from amsam_jax.sum.step import SumStepConfig, make_optimizers, make_sum_step, split_sum_model
from amsam_jax.training import mesh as meshlib
from amsam_jax.training.embedder import Embedder
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.training.run import JsonlWriter, MemoryWriter, Run, TrainError, log
from amsam_jax.training.sam import resolve_sam
from amsam_jax.training.state import clone_state, init_optimizer
from amsam_jax.utils.image import list_images
from amsam_jax.utils.io import atomic_directory, write_json

UNCERTAINTY_SOURCES = ("refiner", "maps", "zeros")
TRAINABLE = ("params", "task")


def step_config(cfg: SumConfig) -> SumStepConfig:
    """The static settings of the interactive step from a run's config."""
    t = cfg.train
    if t.sample_frame not in ("1024", "256"):
        raise TrainError("train.sample_frame", f"must be '1024' or '256', got {t.sample_frame!r}")
    if t.box_jitter not in ("sum", "sam"):
        raise TrainError("train.box_jitter", f"must be 'sum' or 'sam', got {t.box_jitter!r}")
    try:
        return SumStepConfig(
            size=cfg.sam.image_size,
            num_point_rounds=t.num_point_rounds,
            num_mask_only_rounds=t.num_mask_only_rounds,
            box_jitter=t.box_jitter,
            box_jitter_std_frac=t.box_jitter_std_frac,
            box_jitter_max_px=t.box_jitter_max_px,
            grid_scale=1 if t.sample_frame == "1024" else 4,
            use_uncertainty_sampling=t.use_uncertainty_sampling,
            sampling_threshold=t.sampling_threshold,
            use_task_prompt=t.use_task_prompt,
            loss=cfg.loss,
        )
    except ValueError as e:
        raise TrainError(str(e)) from None


@dataclasses.dataclass
class SumSetup:
    """Everything a SUM run builds before iterating."""

    cfg: SumConfig
    sam: Any
    sam_cfg: Any
    weights: str
    trainable: Any
    step_cfg: SumStepConfig
    step_fn: Any
    initial: dict
    labelled: LabelledSet
    pseudo: PseudoSet | None
    embedder: Embedder
    human_shapes: Shapes
    pseudo_shapes: Shapes
    total_updates: int
    notes: dict
    mesh: Any = None  # the step's device mesh (`training.mesh.make_mesh`); None: one device


def pseudo_folder(cfg: SumConfig, workdir: Path, sam, say) -> tuple[Path, Path]:
    """(images dir, labels dir) of the unlabelled pool; pseudo-labels a plain image folder once
    with the automatic mask generator into `workdir/pseudo_labels`."""
    images = Path(cfg.data.unlabelled or bundled_synthetic_dir() / "train" / "images")
    if not images.is_dir():
        raise DataError(images, "data.unlabelled is not a directory")
    if any(images.glob("*.json")):
        return images, images
    out = workdir / "pseudo_labels"
    todo = [p for p in list_images(images) if not (out / f"{p.stem}.json").exists()]
    if todo:
        say(f"pseudo-labels: automatic mask generator on {len(todo)} images of {images} -> {out}")
        errors = label_folder(
            sam, images, out, cfg.data.amg_points_per_side, say=say, **_amg_thresholds(cfg)
        )
        if errors:
            raise DataError(None, errors[0])
    return images, out


def _amg_thresholds(cfg: SumConfig) -> dict:
    return {
        "pred_iou_thresh": cfg.data.amg_pred_iou_thresh,
        "stability_score_thresh": cfg.data.amg_stability_score_thresh,
    }


def build_sum_setup(cfg: SumConfig, workdir: Path, quiet: bool = False) -> SumSetup:
    """Resolves SAM, data, pseudo-labels and uncertainty maps, and builds the step."""
    say = (lambda m: None) if quiet else log
    if cfg.data.uncertainty not in UNCERTAINTY_SOURCES:
        raise TrainError(
            "data.uncertainty",
            f"must be one of {', '.join(UNCERTAINTY_SOURCES)}, got {cfg.data.uncertainty!r}",
        )
    if cfg.train.mix_mode not in ("alternate", "joint"):
        raise TrainError(
            "train.mix_mode", f"must be 'alternate' or 'joint', got {cfg.train.mix_mode!r}"
        )
    scfg = step_config(cfg)
    mesh = meshlib.make_mesh(cfg.mesh.data)
    check_batch_divides(cfg, mesh)
    mesh = mesh if mesh.devices.size > 1 else None  # one device: the plain single-device step
    sam, sam_cfg, weights_key, weights = resolve_sam(cfg)
    say(f"sam: {weights}")
    size = sam_cfg.image_size
    embedder = Embedder(sam.image_encoder, weights_key)
    labelled = LabelledSet(labelled_specs(cfg), cfg.data.labelled_split)
    say(f"labelled: {len(labelled)} images from {', '.join(labelled_specs(cfg))}")
    images_dir, labels_dir = pseudo_folder(cfg, workdir, sam, say)
    refined_dir = None
    if cfg.data.uncertainty == "maps":
        refined_dir = Path(cfg.data.refined_dir) if cfg.data.refined_dir else labels_dir
    elif cfg.data.uncertainty == "refiner":
        refined_dir = ensure_refined_maps(
            cfg, workdir, sam, sam_cfg, embedder, weights, images_dir, labels_dir, say
        )
    pseudo = PseudoSet(
        images_dir,
        labels_dir,
        refined_dir,
        use_refined=cfg.data.uncertainty != "zeros",
        min_ratio=cfg.data.min_ratio,
        max_ratio=cfg.data.max_ratio,
        max_num_mask=cfg.data.max_num_mask,
        min_refine_ratio=cfg.data.min_refine_ratio,
        size=size,
    )
    say(f"pseudo-labelled: {len(pseudo)} images ({images_dir}), U from {cfg.data.uncertainty}")
    low = sam.prompt_encoder.mask_input_size[0]
    human = Shapes(cfg.train.human_images, cfg.train.human_masks_per_image, size, low)
    pseudo_shapes = Shapes(cfg.train.pseudo_images, cfg.data.max_num_mask, size, low)
    updates_per_it = 2 if cfg.train.mix_mode == "alternate" else 1
    total_updates = cfg.train.steps * updates_per_it
    params_tx, task_tx = make_optimizers(cfg.train, total_updates)
    trainable = split_sum_model(sam)
    step_fn = make_sum_step(trainable.graphdef, scfg, params_tx, task_tx, mesh)
    initial = {
        "params": trainable.params,
        "task": trainable.task,
        "params_opt": init_optimizer(params_tx, trainable.params),
        "task_opt": init_optimizer(task_tx, trainable.task),
        "step": jnp.asarray(0, jnp.int32),
    }
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable.params))
    n_task = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable.task))
    say(
        f"trainable: prompt encoder + mask decoder {n_params:,} | task table {n_task:,} "
        f"({'trained, row 0 frozen' if cfg.train.use_task_prompt else 'off: stays zero'})"
    )
    return SumSetup(
        cfg, sam, sam_cfg, weights, trainable, scfg, step_fn, initial, labelled, pseudo,
        embedder, human, pseudo_shapes, total_updates, {}, mesh,
    )  # fmt: skip


def check_batch_divides(cfg: SumConfig, mesh) -> None:
    """The masks of each step kind must split evenly over the mesh's devices (docs/scale.md §1).

    Raises:
        MeshError: naming the settings whose product does not divide.
    """
    t = cfg.train
    human_masks = t.human_images * t.human_masks_per_image
    human = ("train.human_images x train.human_masks_per_image", human_masks)
    pseudo = ("train.pseudo_images x data.max_num_mask", t.pseudo_images * cfg.data.max_num_mask)
    if t.mix_mode == "alternate":
        kinds = [human, pseudo]
    else:
        kinds = [(f"{human[0]} + {pseudo[0]}", human[1] + pseudo[1])]
    for what, masks in kinds:
        meshlib.check_divides(f"{what} (masks per step)", masks, mesh)


# ----------------------------------------------------------------------------- batches


def human_batch(setup: SumSetup, it: int, rng: np.random.Generator) -> dict:
    cfg, shapes = setup.cfg, setup.human_shapes
    entries = []
    for j in range(shapes.images):
        i = pick(cfg.seed, 0, it * shapes.images + j, len(setup.labelled))
        entries.append(setup.labelled.load(i))
    emb = embed_entries(setup.embedder, entries, shapes.size, setup.sam_cfg.preprocess)
    return make_batch(entries, emb, shapes, rng)


def pseudo_batch(setup: SumSetup, it: int, rng: np.random.Generator) -> dict:
    """Images drawn in order from the reshuffled pool; skipped images are replaced by the next
    ones (docs/sum.md §2.2, §3.1)."""
    cfg, shapes, pool = setup.cfg, setup.pseudo_shapes, setup.pseudo
    entries, position, tries = [], it * shapes.images, 0
    while len(entries) < shapes.images:
        if tries >= 4 * len(pool) + 4 * shapes.images:
            reasons = "; ".join(f"{Path(k).name}: {v}" for k, v in list(pool.skipped.items())[:3])
            raise DataError(None, f"every pseudo-labelled image is skipped ({reasons})")
        entry = pool.load(pick(cfg.seed, 1, position + tries, len(pool)), rng)
        tries += 1
        if entry is not None:
            entries.append(entry)
    emb = embed_entries(setup.embedder, entries, shapes.size, setup.sam_cfg.preprocess)
    return make_batch(entries, emb, shapes, rng)


def joint_batch(a: dict, b: dict) -> dict:
    """One batch holding both sources (mix_mode "joint")."""
    out = {k: np.concatenate([a[k], b[k]]) for k in a}
    out["image_index"] = np.concatenate([a["image_index"], b["image_index"] + len(a["embedding"])])
    return out


def _first_is_box(seed: int, it: int, kind: int, p_point: float) -> bool:
    return bool(np.random.default_rng([seed, 7, it, kind]).random() >= p_point)


def finetuned_sam(setup: SumSetup, state: dict):
    """The base SAM with the trained prompt encoder, mask decoder and task table."""
    sam = nnx.clone(setup.sam)  # not nnx.merge(*nnx.split(...)): that shares the Variables
    decoder = PromptDecoder(sam)
    nnx.update(decoder, state["params"], state["task"])
    return sam


# ----------------------------------------------------------------------------- training


def train_sum(cfg: SumConfig, workdir: str | os.PathLike, writer: JsonlWriter | None = None):
    """Runs (or resumes) a SUM run in `workdir`; returns the summary dict."""
    cfg.validate()
    run = Run(workdir, cfg.to_dict(), cfg.train.checkpoint_every_s, defaults=type(cfg)().to_dict())
    workdir = run.workdir
    with run.setting_up():
        setup = build_sum_setup(cfg, workdir)
    state = clone_state(setup.initial)
    meta = {"step": 0}
    restored = run.restore(setup.initial)
    if restored is not None:
        state, meta = restored
        log(f"resume: from iteration {meta['step']} in {workdir}")
    main = meshlib.is_main_process()
    if writer is None:
        resumed = meta["step"] if restored is not None else None
        writer = run.metrics(resumed) if main else MemoryWriter()
    total = cfg.train.steps
    it = int(meta["step"])
    summary = run.summary()
    if it >= total and summary is not None:
        log(f"resume: the run in {workdir} is already complete ({it} iterations)")
        return summary
    if setup.mesh is not None:
        state = meshlib.replicate(state, setup.mesh)
    with run.interruptible():
        state, it = _sum_loop(setup, run, writer, state, it)
    run.save("final", state, {"step": it})
    state = meshlib.to_host(state)  # the rest runs on process 0 alone
    if not main:  # process 0 exports, evaluates and writes the summary
        meshlib.sync("sum-finished")
        return run.summary() or {"workdir": str(workdir)}
    summary = finish(setup, state, workdir, writer)
    run.write_summary(summary)
    meshlib.sync("sum-finished")
    return summary


def _sum_loop(setup: SumSetup, run: Run, writer: JsonlWriter, state: dict, it: int):
    """Iterations from `it` to `train.steps`; returns (state, iterations done)."""
    cfg = setup.cfg
    total = cfg.train.steps
    base_key = jax.random.key(cfg.seed)
    bar = tqdm(total=total, initial=it, desc="sum", file=sys.stderr, leave=False, disable=None)
    p_point = cfg.train.p_first_is_point
    mesh = setup.mesh
    frozen = setup.trainable.frozen
    if mesh is not None:
        frozen = meshlib.replicate(frozen, mesh)
    last_save = time.perf_counter()
    while it < total:
        rng = np.random.default_rng([cfg.seed, 3, it])
        t0 = time.perf_counter()
        hb, pb = human_batch(setup, it, rng), pseudo_batch(setup, it, rng)
        t_data = time.perf_counter() - t0
        key = jax.random.fold_in(base_key, it)
        record = {"kind": "iteration", "step": it + 1}
        if cfg.train.mix_mode == "alternate":
            kinds = [("human", hb, 0), ("pseudo", pb, 1)]
        else:
            kinds = [("joint", joint_batch(hb, pb), 0)]
        for name, batch, k in kinds:
            box = _first_is_box(cfg.seed, it, k, p_point)
            if mesh is not None:
                batch = meshlib.shard_batch(batch, mesh, replicate_keys=("embedding",))
            state, metrics = setup.step_fn(state, frozen, batch, jax.random.fold_in(key, k), box)
            metrics = {f"{name}_{m}": float(v) for m, v in jax.device_get(metrics).items()}
            metrics[f"{name}_first_prompt"] = "box" if box else "point"
            record.update(metrics)
            loss = {f"{name}_loss": metrics[f"{name}_loss"]}
            if not all(np.isfinite(list(loss.values()))):
                bar.close()
                run.check_finite(loss, f"iteration {it}")  # raises, naming what can be resumed
        it += 1
        record["step_time_s"] = time.perf_counter() - t0
        record["data_time_s"] = t_data
        record["pseudo_masks_without_refined_map"] = (
            setup.pseudo.masks_without_map if setup.pseudo else 0
        )
        if it % cfg.train.log_every == 0 or it == total:
            writer.write(record)
        first = kinds[0][0]
        bar.set_postfix(loss=f"{record[f'{first}_loss']:.4f}")
        bar.update(1)
        every = cfg.train.checkpoint_every
        if it < total:
            force = bool(every and it % every == 0)
            if meshlib.process_count() == 1:
                run.save_latest(state, {"step": it}, force=force)
            elif meshlib.agree(force or time.perf_counter() - last_save >= run.checkpoint_every_s):
                # One decision for every process: each one's clock would pick other iterations,
                # and a checkpoint is written by all of them together.
                run.save("latest", state, {"step": it})
                last_save = time.perf_counter()
            run.stop_if_requested(state, {"step": it}, f"iteration {it}")
    bar.close()
    run.save("latest", state, {"step": it})
    return state, it


def finish(setup: SumSetup, state: dict, workdir: Path, writer: JsonlWriter) -> dict:
    """Exports the fine-tuned SAM, plots the curves and runs the interactive evaluation."""
    cfg = setup.cfg
    sam = finetuned_sam(setup, state)
    export = workdir / "sam_finetuned"
    if not (export / "config.json").is_file():
        with atomic_directory(export, overwrite=True) as tmp:
            save_sam(sam, setup.sam_cfg, tmp, {"run": str(workdir), "weights": setup.weights})
    plot_sum_curves(writer.records(), workdir / "plots" / "curves.png")
    summary = {
        "workdir": str(workdir),
        "weights": setup.weights,
        "iterations": int(state["step"]) // (2 if cfg.train.mix_mode == "alternate" else 1),
        "finetuned_sam": str(export),
        "pseudo_images_skipped": len(setup.pseudo.skipped) if setup.pseudo else 0,
    }
    records = [r for r in writer.records() if r.get("kind") == "iteration"]
    if records:
        last = records[-1]
        summary.update({k: v for k, v in last.items() if k.endswith("_loss")})
    if cfg.data.eval_split:
        masks = labelled_eval_masks(
            labelled_specs(cfg), cfg.data.eval_split, cfg.data.eval_max_images
        )
        if masks:
            result = evaluate_interactive(sam, masks, cfg.train.eval_clicks, tasks=("0", "matched"))
            write_json(workdir / "eval_interactive.json", result)
            plot_metric_vs_clicks(result["task_0"], workdir / "plots" / "clicks.png")
            summary["eval_miou_at_clicks_1_3_5"] = [
                round(result["task_0"]["miou"][k - 1], 2)
                for k in (1, 3, 5)
                if k <= len(result["task_0"]["miou"])
            ]
    return summary
