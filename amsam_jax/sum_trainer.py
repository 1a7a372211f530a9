"""The SUM trainer (spec `sum.md` §7.2): interactive fine-tuning of SAM's prompt encoder and
mask decoder on human labels plus uncertainty-weighted pseudo-labels.

Shares the few-shot trainer's machinery: SAM resolution (`trainer.resolve_sam`), the embedding
cache, Orbax checkpoints (`trainer.save_tree`/`restore_tree`), the JSON-lines writer and the CLI
(`python -m amsam_jax.train --config train/configs/sum.py`). The data order, the prompts and
the rounds derive from (seed, iteration) only, so a killed run resumed from `latest` continues
exactly as if it had not stopped.
"""

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax import sum_data
from amsam_jax.cache import EmbeddingCache
from amsam_jax.data import DataError, bundled_synthetic_dir
from amsam_jax.sum_config import SumConfig
from amsam_jax.sum_step import (
    SumStepConfig,
    make_optimizers,
    make_sum_step,
    split_sum_model,
)
from amsam_jax.trainer import JsonlWriter, TrainError, log, resolve_sam, restore_tree, save_tree

UNCERTAINTY_SOURCES = ("refiner", "maps", "zeros")


def step_config(cfg: SumConfig) -> SumStepConfig:
    t = cfg.train
    if t.sample_frame not in ("1024", "256"):
        raise TrainError(f"train.sample_frame must be '1024' or '256', got {t.sample_frame!r}")
    if t.box_jitter not in ("sum", "sam"):
        raise TrainError(f"train.box_jitter must be 'sum' or 'sam', got {t.box_jitter!r}")
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


class Embedder:
    """The frozen image encoder behind the content-keyed embedding cache (one image at a time)."""

    def __init__(self, sam, weights_key: str, size: int):
        graphdef, state = nnx.split(sam.image_encoder)
        self._fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
        self._state = state
        self._weights_key = weights_key
        self._prep_key = f"sam-longest-side-{size}-pil-bilinear-meanstd-pad"
        self.size = size
        self.cache = EmbeddingCache()
        self._memory: dict[str, np.ndarray] = {}

    def __call__(self, key: str, image: np.ndarray) -> np.ndarray:
        """(G, G, C) embedding of a uint8 image; `key` names it in the in-memory cache."""
        if key not in self._memory:
            frame, _ = sum_data.model_frame_image(image, self.size)
            self._memory[key] = self.cache.get_or_compute(
                frame[None],
                lambda x: np.asarray(self._fn(self._state, jnp.asarray(x))),
                self._weights_key,
                self._prep_key,
            )[0]
            if len(self._memory) > 256:
                self._memory.pop(next(iter(self._memory)))
        return self._memory[key]


@dataclasses.dataclass
class SumSetup:
    cfg: SumConfig
    sam: Any
    sam_cfg: Any
    weights: str
    trainable: Any
    step_cfg: SumStepConfig
    step_fn: Any
    initial: dict
    labelled: sum_data.LabelledSet
    pseudo: sum_data.PseudoSet | None
    embedder: Embedder
    human_shapes: sum_data.Shapes
    pseudo_shapes: sum_data.Shapes
    total_updates: int
    notes: dict


def labelled_specs(cfg: SumConfig) -> tuple[str, ...]:
    """`data.labelled`, or the bundled synthetic few-shot set as a salient-object source."""
    return cfg.data.labelled or (f"{bundled_synthetic_dir()}:salient",)


def pseudo_folder(cfg: SumConfig, workdir: Path, sam, say) -> tuple[Path, Path]:
    """(images dir, labels dir) of the unlabelled pool; pseudo-labels a plain image folder once
    with the automatic mask generator into `workdir/pseudo_labels`."""
    from amsam_jax.sa1b import list_images

    images = Path(cfg.data.unlabelled or bundled_synthetic_dir() / "train" / "images")
    if not images.is_dir():
        raise DataError(images, "data.unlabelled is not a directory")
    if any(images.glob("*.json")):
        return images, images
    out = workdir / "pseudo_labels"
    todo = [p for p in list_images(images) if not (out / f"{p.stem}.json").exists()]
    if todo:
        from amsam_jax.pseudo_labels import label_folder

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
            f"data.uncertainty must be one of {', '.join(UNCERTAINTY_SOURCES)}, "
            f"got {cfg.data.uncertainty!r}"
        )
    if cfg.train.mix_mode not in ("alternate", "joint"):
        raise TrainError(
            f"train.mix_mode must be 'alternate' or 'joint', got {cfg.train.mix_mode!r}"
        )
    scfg = step_config(cfg)
    sam, sam_cfg, weights_key, weights = resolve_sam(cfg)
    say(f"sam: {weights}")
    size = sam_cfg.image_size
    labelled = sum_data.LabelledSet(labelled_specs(cfg), cfg.data.labelled_split)
    say(f"labelled: {len(labelled)} images from {', '.join(labelled_specs(cfg))}")
    images_dir, labels_dir = pseudo_folder(cfg, workdir, sam, say)
    refined_dir = None
    if cfg.data.uncertainty == "maps":
        refined_dir = Path(cfg.data.refined_dir) if cfg.data.refined_dir else labels_dir
    elif cfg.data.uncertainty == "refiner":
        from amsam_jax import refine

        refined_dir = refine.ensure_refined_maps(
            cfg, workdir, sam, sam_cfg, weights_key, weights, images_dir, labels_dir, say
        )
    pseudo = sum_data.PseudoSet(
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
    human = sum_data.Shapes(cfg.train.human_images, cfg.train.human_masks_per_image, size, low)
    pseudo_shapes = sum_data.Shapes(cfg.train.pseudo_images, cfg.data.max_num_mask, size, low)
    updates_per_it = 2 if cfg.train.mix_mode == "alternate" else 1
    total_updates = cfg.train.steps * updates_per_it
    params_tx, task_tx = make_optimizers(cfg.train, total_updates)
    trainable = split_sum_model(sam)
    step_fn = make_sum_step(trainable.graphdef, scfg, params_tx, task_tx)
    initial = {
        "params": trainable.params,
        "task": trainable.task,
        "params_opt": params_tx.init(trainable.params),
        "task_opt": task_tx.init(trainable.task),
        "step": jnp.asarray(0, jnp.int32),
    }
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable.params))
    n_task = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable.task))
    say(
        f"trainable: prompt encoder + mask decoder {n_params:,} | task table {n_task:,} "
        f"({'trained, row 0 frozen' if cfg.train.use_task_prompt else 'off: stays zero'})"
    )
    embedder = Embedder(sam, weights_key, size)
    return SumSetup(
        cfg, sam, sam_cfg, weights, trainable, scfg, step_fn, initial, labelled, pseudo,
        embedder, human, pseudo_shapes, total_updates, {},
    )  # fmt: skip


# ----------------------------------------------------------------------------- data order


def _order(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def pick(seed: int, stream: int, position: int, n: int) -> int:
    """The item at global `position` of a stream that reshuffles every pass over n items."""
    return int(_order(seed, stream, position // n, n)[position % n])


def human_batch(setup: SumSetup, it: int, rng: np.random.Generator) -> dict:
    cfg, shapes = setup.cfg, setup.human_shapes
    entries = []
    for j in range(shapes.images):
        i = pick(cfg.seed, 0, it * shapes.images + j, len(setup.labelled))
        entries.append(setup.labelled.load(i))
    emb = np.stack([setup.embedder(e.key, e.image) for e in entries])
    return sum_data.make_batch(entries, emb, shapes, rng)


def pseudo_batch(setup: SumSetup, it: int, rng: np.random.Generator) -> dict:
    """Images drawn in order from the reshuffled pool; skipped images are replaced by the next
    ones (spec §2.2, §3.1)."""
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
    emb = np.stack([setup.embedder(e.key, e.image) for e in entries])
    return sum_data.make_batch(entries, emb, shapes, rng)


def joint_batch(a: dict, b: dict) -> dict:
    """One batch holding both sources (mix_mode "joint")."""
    out = {k: np.concatenate([a[k], b[k]]) for k in a}
    out["image_index"] = np.concatenate([a["image_index"], b["image_index"] + len(a["embedding"])])
    return out


def _first_is_box(seed: int, it: int, kind: int, p_point: float) -> bool:
    return bool(np.random.default_rng([seed, 7, it, kind]).random() >= p_point)


# ----------------------------------------------------------------------------- checkpoints


def _leaves(tree) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def state_tree(state: dict) -> dict:
    return {
        "params": state["params"].to_pure_dict(),
        "task": state["task"].to_pure_dict(),
        "opt": _leaves((state["params_opt"], state["task_opt"])),
    }


def restore_state(workdir: Path, kind: str, template: dict) -> tuple[dict, dict] | None:
    restored = restore_tree(workdir, kind, state_tree(template))
    if restored is None:
        return None
    tree, meta = restored
    params = jax.tree.map(lambda x: x, template["params"])
    task = jax.tree.map(lambda x: x, template["task"])
    nnx.replace_by_pure_dict(params, tree["params"])
    nnx.replace_by_pure_dict(task, tree["task"])
    treedef = jax.tree.structure((template["params_opt"], template["task_opt"]))
    params_opt, task_opt = jax.tree.unflatten(
        treedef, [jnp.asarray(tree["opt"][k]) for k in sorted(tree["opt"])]
    )
    state = {
        "params": params,
        "task": task,
        "params_opt": params_opt,
        "task_opt": task_opt,
        "step": jnp.asarray(meta["step"], jnp.int32),
    }
    return state, meta


def finetuned_sam(setup: SumSetup, state: dict):
    """The base SAM with the trained prompt encoder, mask decoder and task table."""
    from amsam_jax.blo import PromptDecoder

    graphdef, sam_state = nnx.split(setup.sam)
    sam = nnx.merge(graphdef, sam_state)  # a copy that shares nothing mutable with setup.sam
    decoder = PromptDecoder(sam)
    nnx.update(decoder, state["params"], state["task"])
    return sam


# ----------------------------------------------------------------------------- training


def _clone(state: dict) -> dict:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def train_sum(cfg: SumConfig, workdir: str | os.PathLike, writer: JsonlWriter | None = None):
    """Runs (or resumes) a SUM run in `workdir`; returns the summary dict."""
    from tqdm import tqdm

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.json"
    if cfg_path.exists() and (workdir / "ckpt").exists():
        previous = json.loads(cfg_path.read_text())
        if previous != json.loads(cfg.to_json()):
            raise TrainError(
                f"{workdir}: holds a run with a different config; use another --workdir"
            )
    cfg_path.write_text(cfg.to_json())
    setup = build_sum_setup(cfg, workdir)
    state = _clone(setup.initial)
    meta = {"step": 0}
    restored = restore_state(workdir, "latest", setup.initial)
    if restored is not None:
        state, meta = restored
        log(f"resume: from iteration {meta['step']} in {workdir}")
    writer = writer or JsonlWriter(workdir / "metrics.jsonl", keep_until_step=meta["step"])
    if restored is None and writer.path.exists():
        writer.path.unlink()
    summary_path = workdir / "summary.json"
    total = cfg.train.steps
    it = int(meta["step"])
    if it >= total and summary_path.exists():
        log(f"resume: the run in {workdir} is already complete ({it} iterations)")
        return json.loads(summary_path.read_text())
    base_key = jax.random.key(cfg.seed)
    last_save = time.perf_counter()
    bar = tqdm(total=total, initial=it, desc="sum", file=sys.stderr, leave=False, disable=None)
    p_point = cfg.train.p_first_is_point
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
            state, metrics = setup.step_fn(
                state, setup.trainable.frozen, batch, jax.random.fold_in(key, k), box
            )
            metrics = {f"{name}_{m}": float(v) for m, v in jax.device_get(metrics).items()}
            metrics[f"{name}_first_prompt"] = "box" if box else "point"
            record.update(metrics)
            if not math.isfinite(metrics[f"{name}_loss"]):
                bar.close()
                raise TrainError(
                    f"non-finite {name} loss at iteration {it}; the last good checkpoint is "
                    f"{workdir / 'ckpt' / 'latest'}"
                )
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
        due = time.perf_counter() - last_save >= cfg.train.checkpoint_every_s
        if it < total and ((every and it % every == 0) or due):
            save_tree(workdir, "latest", state_tree(state), {"step": it})
            last_save = time.perf_counter()
    bar.close()
    save_tree(workdir, "latest", state_tree(state), {"step": it})
    save_tree(workdir, "final", state_tree(state), {"step": it})
    summary = finish(setup, state, workdir, writer)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def finish(setup: SumSetup, state: dict, workdir: Path, writer: JsonlWriter) -> dict:
    """Exports the fine-tuned SAM, plots the curves and runs the interactive evaluation."""
    from amsam_jax.checkpoint import save_sam

    cfg = setup.cfg
    sam = finetuned_sam(setup, state)
    export = workdir / "sam_finetuned"
    if not export.exists():
        tmp = workdir / "sam_finetuned.tmp"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        save_sam(sam, setup.sam_cfg, tmp, {"run": str(workdir), "weights": setup.weights})
        os.replace(tmp, export)
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
        from amsam_jax.interactive_eval import evaluate_interactive, labelled_eval_masks

        masks = labelled_eval_masks(
            labelled_specs(cfg), cfg.data.eval_split, cfg.data.eval_max_images
        )
        if masks:
            result = evaluate_interactive(sam, masks, cfg.train.eval_clicks, tasks=("0", "matched"))
            (workdir / "eval_interactive.json").write_text(json.dumps(result, indent=2) + "\n")
            from amsam_jax.interactive import plot_metric_vs_clicks

            plot_metric_vs_clicks(result["task_0"], workdir / "plots" / "clicks.png")
            summary["eval_miou_at_clicks_1_3_5"] = [
                round(result["task_0"]["miou"][k - 1], 2)
                for k in (1, 3, 5)
                if k <= len(result["task_0"]["miou"])
            ]
    return summary


def plot_sum_curves(records: list[dict], path: Path) -> None:
    """plots/curves.png: the human and pseudo-label losses per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r for r in records if r.get("kind") == "iteration"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("human", "pseudo", "joint"):
        pts = [(r["step"], r[f"{name}_loss"]) for r in its if f"{name}_loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (mean over rounds)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trainable_leaves(state: dict) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves((state["params"], state["task"]))]
