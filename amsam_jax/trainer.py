"""The few-shot trainer: SAM resolution, data, embedding cache, bi-level loop, checkpoints."""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from amsam_jax import data as data_lib
from amsam_jax.blo import (
    BoxResidual,
    PromptDecoder,
    StepConfig,
    TrainingModel,
    make_step,
    split_trainable,
)
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.cache import EmbeddingCache, sam_weights_key
from amsam_jax.checkpoint import OFFICIAL_CHECKPOINTS, adapt_sam, load_sam, read_sam_config
from amsam_jax.configs import TrainConfig
from amsam_jax.evaluation import EvalData, evaluate
from amsam_jax.lora import apply_lora, count_params, mark_trainable

DEFAULT_SAM_DIR = "checkpoints/sam_vit_b"
CHECKPOINT_KINDS = ("latest", "best", "final")


class TrainError(Exception):
    """A run that cannot start or continue; one line naming the file/setting and the problem."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- SAM weights


def _download_official_vit_b(cache_root: Path, timeout: float) -> Path | None:
    """Downloads and converts the official ViT-B checkpoint once; None if impossible here."""
    url, sha, _ = OFFICIAL_CHECKPOINTS["vit_b"]
    converted = cache_root / "sam_vit_b"
    if (converted / "config.json").is_file():
        return converted
    pth = cache_root / Path(url).name
    if not pth.is_file():
        log(f"sam: trying the official ViT-B download ({url}, timeout {timeout:g} s)")
        tmp = pth.with_suffix(".part")
        cache_root.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                h = hashlib.sha256()
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    h.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tmp.unlink(missing_ok=True)
            log(f"sam: download failed ({e})")
            return None
        if h.hexdigest() != sha:
            tmp.unlink(missing_ok=True)
            log(f"sam: downloaded file has SHA-256 {h.hexdigest()}, expected {sha}: discarded")
            return None
        os.replace(tmp, pth)
    try:
        from weights_conversion.convert_sam import ConversionError, convert_checkpoint
    except ImportError as e:  # torch (the `convert` extra) is not installed
        log(f"sam: cannot convert {pth} without the `convert` extra ({e})")
        return None
    try:
        convert_checkpoint(pth, converted)
    except ConversionError as e:
        log(f"sam: conversion failed: {e}")
        return None
    return converted


def resolve_sam(cfg: TrainConfig) -> tuple[Any, SamConfig, str, str]:
    """Finds SAM weights: configured dir, $AMSAM_SAM, checkpoints/, download, or random.

    Returns:
        (model adapted to the training config, its SamConfig, weights key for the cache,
        a human description that says loudly when weights are random).
    """
    s = cfg.sam
    target = SamConfig.preset(
        s.model_type,
        image_size=s.image_size,
        num_multimask_outputs=s.num_classes,
        encoder_dtype=s.encoder_dtype,
    )
    candidates = [s.checkpoint] if s.checkpoint else [os.environ.get("AMSAM_SAM"), DEFAULT_SAM_DIR]
    sam_dir = next((c for c in candidates if c and Path(c).is_dir()), None)
    if s.checkpoint and sam_dir is None:
        raise TrainError(f"{s.checkpoint}: sam.checkpoint is not a directory")
    if sam_dir is None and s.download and s.model_type == "vit_b":
        cache_root = Path(os.environ.get("AMSAM_HOME", Path.home() / ".cache" / "amsam_jax"))
        downloaded = _download_official_vit_b(cache_root / "checkpoints", s.download_timeout_s)
        sam_dir = str(downloaded) if downloaded else None
    if sam_dir is not None:
        src_cfg, _ = read_sam_config(sam_dir)
        model = load_sam(sam_dir)
        target = dataclasses.replace(
            src_cfg,
            image_size=s.image_size,
            num_multimask_outputs=s.num_classes,
            encoder_dtype=s.encoder_dtype,
        )
        model = adapt_sam(model, target, reinit_heads=s.reinit_heads, seed=cfg.seed)
        key = f"{sam_weights_key(sam_dir, s.encoder_dtype)}-{s.image_size}"
        return model, target, key, f"converted SAM weights from {sam_dir}"
    if not s.allow_random:
        raise TrainError("no SAM weights found (set sam.checkpoint) and sam.allow_random is off")
    model = build_sam(target, seed=cfg.seed)
    key = f"random-{s.model_type}-{s.image_size}-seed{cfg.seed}-{s.encoder_dtype}"
    return (
        model,
        target,
        key,
        (
            f"RANDOM {s.model_type} WEIGHTS (no converted SAM, no download): Dice is a pipeline "
            "check, not a quality number"
        ),
    )


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    """One split's arrays in the model frame plus what evaluation needs."""

    stems: tuple[str, ...]
    image: np.ndarray  # (N, S, S, 3) preprocessed
    label_low: np.ndarray  # (N, L, L)
    original_size: np.ndarray  # (N, 2)
    masks: tuple[np.ndarray, ...]
    embedding: np.ndarray | None = None  # (N, G, G, C)
    boxes: np.ndarray | None = None  # (N, 4) model frame

    def eval_data(self) -> EvalData:
        return EvalData(self.embedding, self.label_low, self.stems, self.boxes, self.masks)

    def batch(self, idx: np.ndarray) -> dict:
        b = {
            "embedding": jnp.asarray(self.embedding[idx]),
            "label": jnp.asarray(self.label_low[idx]),
        }
        if self.boxes is not None:
            b["box"] = jnp.asarray(self.boxes[idx])
        return b


def load_split(samples, prep: data_lib.Preprocessing) -> Split:
    arrays = data_lib.load_split_arrays(samples, prep, original_masks=True)
    return Split(
        stems=tuple(arrays["stem"]),
        image=arrays["image"],
        label_low=arrays["label_low"],
        original_size=arrays["original_size"],
        masks=tuple(arrays["mask"]),
    )


def boxes_for(split: Split, box_file: dict, path: str, size: int) -> np.ndarray:
    """Each image's box (original pixels) mapped to the model frame: x·S/W, y·S/H, clipped."""
    out = []
    for stem, (h, w) in zip(split.stems, split.original_size, strict=True):
        entry = box_file["boxes"].get(stem)
        if entry is None:
            raise TrainError(f"{path}: no box for image {stem!r}")
        box = entry["box"] if entry["box"] is not None else [0.0, 0.0, float(w), float(h)]
        x0, y0, x1, y1 = box
        scaled = np.asarray([x0 * size / w, y0 * size / h, x1 * size / w, y1 * size / h])
        out.append(np.clip(scaled, 0, size))
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------- schedules


def schedules(t: TrainConfig, total: int):
    """(lower_lr(k), upper_lr(k), lower beta1) per spec §5.2 (clean or reference)."""
    tr = t.train
    base, upper_base, p = tr.lower_lr, tr.upper_lr, tr.power

    def poly(lr, k):
        return lr * jnp.maximum(1.0 - k / total, 0.0) ** p

    if tr.schedule == "clean":
        if tr.warmup:
            w = tr.warmup_period

            def lower(k):
                k = jnp.asarray(k, jnp.float32)
                return jnp.where(k < w, base * (k + 1) / w, poly(base, k - w))
        else:

            def lower(k):
                return poly(base, jnp.asarray(k, jnp.float32))

        def upper(k):
            return poly(upper_base, jnp.asarray(k, jnp.float32))

        return lower, upper, tr.b1
    if tr.schedule == "reference":

        def lower(k):
            k = jnp.asarray(k, jnp.float32)
            return jnp.where(k == 0, base / 25.0, poly(base, k - 1))

        def upper(k):  # the lower base lr after step 0 (reference bug)
            k = jnp.asarray(k, jnp.float32)
            return jnp.where(k == 0, upper_base, poly(base, k - 1))

        return lower, upper, 0.95  # OneCycleLR's constructor leaves beta1 at its max momentum
    raise TrainError(f"train.schedule must be 'clean' or 'reference', got {tr.schedule!r}")


def step_config(cfg: TrainConfig) -> StepConfig:
    tr, cal = cfg.train, cfg.calibration
    return StepConfig(
        hypergradient=tr.hypergradient if tr.bilevel else "none",
        dice_weight=tr.dice_weight,
        calibration=cal.enabled,
        calibration_alpha=cal.alpha,
        calibration_average=cal.average,
        hypergradient_clip=tr.hypergradient_clip,
        exact_jacobian=tr.exact_jacobian,
        exact_extra_lookahead=tr.exact_extra_lookahead,
        weight_decay=tr.weight_decay,
        b1=tr.b1,
        b2=tr.b2,
        eps=tr.eps,
        fd_radius=tr.fd_radius,
        fd_accumulate_bug=tr.fd_accumulate_bug,
        fd_step1_bias=tr.fd_step1_bias,
        fd_reference_b1=tr.fd_reference_b1,
        fd_final_attn_quirk=tr.fd_final_attn_quirk,
    )


# ----------------------------------------------------------------------------- checkpoints


def _tree_to_leaves(tree) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def save_tree(workdir: Path, kind: str, tree: dict, meta: dict) -> None:
    """Writes `ckpt/<kind>/<step>` (a pure tree + JSON meta) synchronously; Orbax renames a
    finished save into place, so a killed save never replaces the previous one."""
    mngr = ocp.CheckpointManager(
        (workdir / "ckpt" / kind).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        ),
    )
    mngr.save(
        int(meta["step"]),
        args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()


def restore_tree(workdir: Path, kind: str, template: dict) -> tuple[dict, dict] | None:
    """Restores `ckpt/<kind>` with the structure of the pure tree `template` as host-backed
    (uncommitted) arrays; None if there is no checkpoint."""
    root = (workdir / "ckpt" / kind).absolute()
    if not root.is_dir():
        return None
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step()
    if step is None:
        mngr.close()
        return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    mngr.close()
    # Orbax returns device-committed arrays; as step inputs they (and then the step's committed
    # outputs) are two more jit cache entries, i.e. two extra compiles in every resumed run.
    tree = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored["state"])
    return tree, restored["meta"]


def save_checkpoint(workdir: Path, kind: str, state: dict, meta: dict) -> None:
    """Writes the few-shot run state as `ckpt/<kind>/<step>`."""
    tree = {
        "lower": state["lower"].to_pure_dict(),
        "prompt": state["prompt"].to_pure_dict(),
        "opt": _tree_to_leaves((state["lower_opt"], state["prompt_opt"])),
    }
    save_tree(workdir, kind, tree, meta)


def restore_checkpoint(workdir: Path, kind: str, template: dict) -> tuple[dict, dict] | None:
    """Restores `ckpt/<kind>` into the structure of `template`; None if there is none."""
    abstract = {
        "lower": template["lower"].to_pure_dict(),
        "prompt": template["prompt"].to_pure_dict(),
        "opt": _tree_to_leaves((template["lower_opt"], template["prompt_opt"])),
    }
    restored = restore_tree(workdir, kind, abstract)
    if restored is None:
        return None
    tree, meta = restored
    lower = jax.tree.map(lambda x: x, template["lower"])
    prompt = jax.tree.map(lambda x: x, template["prompt"])
    nnx.replace_by_pure_dict(lower, tree["lower"])
    nnx.replace_by_pure_dict(prompt, tree["prompt"])
    treedef = jax.tree.structure((template["lower_opt"], template["prompt_opt"]))
    leaves = [jnp.asarray(tree["opt"][k]) for k in sorted(tree["opt"])]
    lower_opt, prompt_opt = jax.tree.unflatten(treedef, leaves)
    state = {
        "lower": lower,
        "prompt": prompt,
        "lower_opt": lower_opt,
        "prompt_opt": prompt_opt,
        "step": jnp.asarray(meta["step"], jnp.int32),
    }
    return state, meta


# ----------------------------------------------------------------------------- writer


class JsonlWriter:
    """Default metrics writer: one JSON object per line in workdir/metrics.jsonl."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.exists():
            # A resumed run replays from its checkpoint: drop the lines written after it.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        elif keep_until_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Setup:
    """Everything a run (or an evaluation of its checkpoints) builds before iterating."""

    cfg: TrainConfig
    sam_cfg: SamConfig
    weights: str
    graphdef: Any
    frozen: Any
    initial: dict
    step_cfg: StepConfig
    d1: Split
    d2: Split
    lower_tx: Any
    upper_tx: Any
    step_fn: Any
    total_steps: int
    iters_per_epoch: int
    box_note: str
    sam: Any


def build_setup(cfg: TrainConfig, workdir: Path, quiet: bool = False) -> Setup:
    """Resolves weights, loads and caches data, builds the partitioned model and step."""
    say = (lambda m: None) if quiet else log
    prep = data_lib.Preprocessing(size=cfg.sam.image_size, sam_pixel_norm=cfg.data.sam_pixel_norm)
    data_dir = Path(cfg.data.dir) if cfg.data.dir else data_lib.bundled_synthetic_dir()
    pool = data_lib.list_samples(data_dir, "train")
    shots = data_lib.select_few_shot(pool, cfg.data.shots, cfg.data.seed)
    if cfg.train.bilevel:
        d1_samples, d2_samples = data_lib.split_d1_d2(shots)
    else:  # SAMed: the lower level sees all shots; D2 (= all) only selects the checkpoint
        d1_samples, d2_samples = shots, shots
    d1, d2 = load_split(d1_samples, prep), load_split(d2_samples, prep)
    say(f"data: {data_dir} | {len(shots)} shots -> D1 {len(d1.stems)}, D2 {len(d2.stems)}")
    sam, sam_cfg, weights_key, weights = resolve_sam(cfg)
    say(f"sam: {weights}")

    enc_graphdef, enc_state = nnx.split(sam.image_encoder)
    encoder = jax.jit(lambda state, x: nnx.merge(enc_graphdef, state)(x))
    cache = EmbeddingCache()
    for split in (d1, d2):
        split.embedding = cache.get_or_compute(
            split.image,
            lambda x: np.asarray(encoder(enc_state, jnp.asarray(x))),
            weights_key,
            prep.key(),
        )
    say(f"embeddings: {cache.stats.hits} cached, {cache.stats.misses} computed ({cache.cache_dir})")

    box_note = "box prompts: off (no boxes.file / boxes.detector)"
    box_file_path = cfg.boxes.file
    if cfg.boxes.detector:
        box_file_path = str(ensure_box_file(cfg, data_dir, workdir))
    if box_file_path:
        from amsam_jax.boxes import BoxError, load_box_file

        try:
            box_file = load_box_file(box_file_path)
        except BoxError as e:
            raise TrainError(str(e)) from None
        for split in (d1, d2):
            split.boxes = boxes_for(split, box_file, box_file_path, sam_cfg.image_size)
        entries = [box_file["boxes"][s] for s in d1.stems + d2.stems]
        rate = float(np.mean([bool(e.get("fallback")) for e in entries]))
        box_note = f"box prompts: {box_file_path} (fallback rate {100 * rate:.1f}%)"
    say(box_note)

    apply_lora(sam, rank=cfg.lora.rank, alpha=cfg.lora.alpha, seed=cfg.seed)
    mark_trainable(sam, train_iou_head=cfg.lora.train_iou_head)
    residual = BoxResidual(sam_cfg.prompt_embed_dim) if cfg.boxes.residual else None
    trainable = split_trainable(TrainingModel(PromptDecoder(sam), residual))
    say(
        f"trainable: lower {count_params(trainable.lower):,} | prompt "
        f"{count_params(trainable.prompt):,} | frozen {count_params(trainable.frozen):,}"
    )
    iters = math.ceil(len(d1.stems) / cfg.train.batch_size)
    total = cfg.train.epochs * iters
    lower_lr, upper_lr, lower_b1 = schedules(cfg, total)
    scfg = step_config(cfg)
    step_fn, lower_tx, upper_tx = make_step(trainable.graphdef, scfg, lower_lr, upper_lr, lower_b1)
    initial = {
        "lower": trainable.lower,
        "prompt": trainable.prompt,
        "lower_opt": lower_tx.init(trainable.lower),
        "prompt_opt": upper_tx.init(trainable.prompt),
        "step": jnp.asarray(0, jnp.int32),
    }
    return Setup(
        cfg, sam_cfg, weights, trainable.graphdef, trainable.frozen, initial, scfg, d1, d2,
        lower_tx, upper_tx, step_fn, total, iters, box_note, sam,
    )  # fmt: skip


def ensure_box_file(cfg: TrainConfig, data_dir: Path, workdir: Path) -> Path:
    """Computes (or reuses, keyed by detector and image hashes) the run's box file."""
    from amsam_jax.boxes import BoxError, compute_box_file, list_images

    out = workdir / "boxes.json"
    try:
        compute_box_file(
            cfg.boxes.detector,
            list_images(data_dir, "all"),
            out,
            conf=cfg.boxes.conf,
            iou=cfg.boxes.iou,
            classes=list(cfg.boxes.classes) if cfg.boxes.classes else None,
            fallback=cfg.boxes.fallback,
        )
    except BoxError as e:
        raise TrainError(str(e)) from None
    return out


def _clone(state: dict) -> dict:
    """A copy that survives donation of the original buffers."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def train(cfg: TrainConfig, workdir: str | os.PathLike, writer: JsonlWriter | None = None) -> dict:
    """Runs (or resumes) a training run in `workdir`.

    Returns:
        summary: best D2 Dice, steps, weights description, paths.
    """
    from tqdm import tqdm

    from amsam_jax import reporting

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.json"
    if cfg_path.exists() and (workdir / "ckpt").exists():
        previous = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        if previous != cfg:
            raise TrainError(
                f"{workdir}: holds a run with a different config; use another --workdir"
            )
    cfg_path.write_text(cfg.to_json())
    setup = build_setup(cfg, workdir)
    state = _clone(setup.initial)
    meta = {"step": 0, "epoch": 0, "best_dice": 0.0}
    restored = restore_checkpoint(workdir, "latest", setup.initial)
    if restored is not None:
        state, meta = restored
        log(f"resume: from step {meta['step']} (epoch {meta['epoch']}) in {workdir}")
    writer = writer or JsonlWriter(workdir / "metrics.jsonl", keep_until_step=meta["step"])
    if restored is None and writer.path.exists():
        writer.path.unlink()

    summary_path = workdir / "summary.json"
    if int(meta["step"]) >= setup.total_steps and summary_path.exists():
        log(f"resume: the run in {workdir} is already complete ({meta['step']} steps)")
        return json.loads(summary_path.read_text())
    n1, n2 = len(setup.d1.stems), len(setup.d2.stems)
    bs = cfg.train.batch_size
    n2_batches = math.ceil(n2 / bs)
    step = int(meta["step"])
    best = float(meta["best_dice"])
    frozen = setup.frozen
    last_save = time.perf_counter()
    while step < setup.total_steps:
        epoch = step // setup.iters_per_epoch
        bar = tqdm(
            total=setup.iters_per_epoch,
            initial=step % setup.iters_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            file=sys.stderr,
            leave=False,
            disable=None,
        )
        while step < (epoch + 1) * setup.iters_per_epoch:
            i = step % setup.iters_per_epoch
            idx1 = np.arange(i * bs, min((i + 1) * bs, n1))
            j = 0 if cfg.train.upper_batch == "first" else step % n2_batches
            idx2 = np.arange(j * bs, min((j + 1) * bs, n2))
            t0 = time.perf_counter()
            state, metrics = setup.step_fn(
                state, frozen, setup.d1.batch(idx1), setup.d2.batch(idx2)
            )
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - t0
            if not all(math.isfinite(v) for k, v in metrics.items() if k.endswith("loss")) or not (
                math.isfinite(metrics["hypergradient_norm"])
            ):
                bar.close()
                raise TrainError(
                    f"non-finite loss at step {step} (lower {metrics['lower_loss']}, upper "
                    f"{metrics['upper_loss']}, |h| {metrics['hypergradient_norm']}); the last good "
                    f"checkpoint is {workdir / 'ckpt' / 'latest'}"
                )
            step += 1
            writer.write({"kind": "iteration", "step": step, "epoch": epoch, **metrics,
                          "step_time_s": elapsed})  # fmt: skip
            bar.set_postfix(loss=f"{metrics['lower_loss']:.4f}")
            bar.update(1)
            every = cfg.train.checkpoint_every
            if every and step % every == 0 and step % setup.iters_per_epoch:  # epoch ends below
                save_checkpoint(workdir, "latest", state, {**meta, "step": step, "epoch": epoch})
        # End of epoch: D2 Dice, best (strictly greater), latest.
        result = evaluate(setup.graphdef, setup.step_cfg, state, frozen, setup.d2.eval_data())
        dice = result["dice"]
        bar.set_postfix(loss=f"{metrics['lower_loss']:.4f}", d2_dice=f"{dice:.2f}")
        bar.close()
        log(
            f"epoch {epoch + 1}/{cfg.train.epochs}: lower loss {metrics['lower_loss']:.4f} "
            f"upper loss {metrics['upper_loss']:.4f} D2 Dice {dice:.2f}"
        )
        meta = {"step": step, "epoch": epoch + 1, "best_dice": best}
        if dice > best:
            best = dice
            meta["best_dice"] = best
            save_checkpoint(workdir, "best", state, {**meta, "d2_dice": dice})
        writer.write({"kind": "epoch", "step": step, "epoch": epoch + 1, "d2_dice": dice,
                      "d2_iou": result["iou"], "best_d2_dice": best})  # fmt: skip
        if time.perf_counter() - last_save >= cfg.train.checkpoint_every_s or (
            step >= setup.total_steps
        ):
            save_checkpoint(workdir, "latest", state, meta)
            last_save = time.perf_counter()

    save_checkpoint(workdir, "final", state, {**meta, "step": step})
    if not (workdir / "ckpt" / "best").exists():  # no epoch beat 0: best is the final state
        save_checkpoint(workdir, "best", state, {**meta, "step": step})
    reporting.plot_curves(writer.records(), workdir / "plots" / "curves.png")
    preds = evaluate_predictions(setup, state)
    reporting.write_samples(setup.d2, preds, workdir / "samples", cfg.train.num_samples)
    summary = {
        "workdir": str(workdir),
        "weights": setup.weights,
        "boxes": setup.box_note,
        "steps": step,
        "best_d2_dice": best,
        "final_d2_dice": float(
            evaluate(setup.graphdef, setup.step_cfg, state, frozen, setup.d2.eval_data())["dice"]
        ),  # fmt: skip
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_predictions(setup: Setup, state: dict) -> np.ndarray:
    from amsam_jax.evaluation import predict_masks

    return predict_masks(setup.graphdef, setup.step_cfg, state, setup.frozen, setup.d2.eval_data())


def trainable_leaves(state: dict) -> list[np.ndarray]:
    """The trainable parameters as host arrays (for exact comparisons across runs)."""
    return [np.asarray(x) for x in jax.tree.leaves((state["lower"], state["prompt"]))]


def load_run_state(workdir: str | os.PathLike, kind: str = "best") -> tuple[Setup, dict, dict]:
    """Rebuilds a run's setup from its config and restores checkpoint `kind`."""
    workdir = Path(workdir).absolute()
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise TrainError(f"{workdir}: no config.json (not a training workdir)")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    setup = build_setup(cfg, workdir, quiet=True)
    restored = restore_checkpoint(workdir, kind, setup.initial)
    if restored is None:
        raise TrainError(f"{workdir / 'ckpt' / kind}: no checkpoint")
    return setup, restored[0], restored[1]
