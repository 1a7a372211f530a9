"""The few-shot trainer (AM-SAM / BLO-SAM / SAMed): data, cached embeddings, the bi-level loop.

    python -m amsam_jax.train --config train/configs/am_sam.py --workdir runs/am_sam

The run machinery (config guard, resume, metrics, checkpoints, NaN stop) is `training.run`; the
bi-level step is `fewshot.blo` (docs/fewshot.md §5). A killed run resumed from `latest` replays
deterministically: it ends with the same parameters as an uninterrupted one.

On several devices or processes (docs/scale.md) the step runs over the `mesh.data` mesh: every
process builds the same D1 and D2 batches, their images are split over the devices, the state is
replicated. Process 0 alone evaluates D2 and writes the metrics, plots, samples and summary.
"""

import dataclasses
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from amsam_jax.boxes.box_file import compute_box_file, list_split_images, load_box_file
from amsam_jax.build_sam import SamConfig, abstract_sam
from amsam_jax.data.folder import list_samples
from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.evaluation.fewshot import compile_evaluation, evaluate_fewshot, predict_masks
from amsam_jax.evaluation.plots import plot_curves, write_samples
from amsam_jax.fewshot.blo import (
    BoxResidual,
    StepConfig,
    Trainable,
    TrainingModel,
    build_step,
    epoch_of,
    make_epoch,
    split_trainable,
)
from amsam_jax.fewshot.config import FewShotConfig
from amsam_jax.fewshot.lora import apply_lora, count_params, mark_trainable
from amsam_jax.fewshot.preprocessing import (
    Preprocessing,
    Split,
    assign_boxes,
    load_split,
    select_few_shot,
    split_d1_d2,
)
from amsam_jax.training import mesh as meshlib
from amsam_jax.training.embedder import Embedder
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.training.run import (
    JsonlWriter,
    MemoryWriter,
    Run,
    TrainError,
    log,
    read_run_config,
)
from amsam_jax.training.sam import load_located, locate_sam
from amsam_jax.training.state import clone_state, init_optimizer, restore_state
from amsam_jax.utils import program_cache
from amsam_jax.utils.runtime import decoder_program_options

CHECKPOINT_KINDS = ("latest", "best", "final")


def schedules(t: FewShotConfig, total: int):
    """(lower_lr(k, hyper=None), upper_lr(k, hyper=None), lower beta1) per docs/fewshot.md §5.2
    (clean or reference). With `hyper` (`hyperparameters`, as arrays inside a step) the schedules
    read their numbers from it, else they compile in those of `t` and `total`."""
    tr = t.train
    fixed = hyperparameters(t, total)

    def numbers(h):
        h = fixed if h is None else h
        return h["lower_lr"], h["upper_lr"], h["power"], h["total"], h["warmup_period"]

    def poly(lr, k, p, n):
        return lr * jnp.maximum(1.0 - k / n, 0.0) ** p

    if tr.schedule == "clean":
        if tr.warmup:

            def lower(k, h=None):
                base, _, p, n, w = numbers(h)
                k = jnp.asarray(k, jnp.float32)
                return jnp.where(k < w, base * (k + 1) / w, poly(base, k - w, p, n))
        else:

            def lower(k, h=None):
                base, _, p, n, _ = numbers(h)
                return poly(base, jnp.asarray(k, jnp.float32), p, n)

        def upper(k, h=None):
            _, upper_base, p, n, _ = numbers(h)
            return poly(upper_base, jnp.asarray(k, jnp.float32), p, n)

        return lower, upper, fixed["lower_b1"]

    def lower(k, h=None):
        base, _, p, n, _ = numbers(h)
        k = jnp.asarray(k, jnp.float32)
        return jnp.where(k == 0, base / 25.0, poly(base, k - 1, p, n))

    def upper(k, h=None):  # the lower base lr after step 0 (reference bug)
        base, upper_base, p, n, _ = numbers(h)
        k = jnp.asarray(k, jnp.float32)
        return jnp.where(k == 0, upper_base, poly(base, k - 1, p, n))

    return lower, upper, fixed["lower_b1"]


def hyperparameters(t: FewShotConfig, total: int) -> dict[str, float]:
    """The run's `blo.HYPER_KEYS` numbers: the schedules' (`total` steps in all) and the
    optimisers'. The trainer passes them to its step at run time (float32 scalars), so runs that
    differ only in these compile the same program (docs/fewshot.md §5.7)."""
    tr = t.train
    if tr.schedule not in ("clean", "reference"):
        raise TrainError(f"train.schedule must be 'clean' or 'reference', got {tr.schedule!r}")
    # OneCycleLR's constructor leaves beta1 at its max momentum (the reference schedule)
    lower_b1 = tr.b1 if tr.schedule == "clean" else 0.95
    return {"lower_lr": tr.lower_lr, "upper_lr": tr.upper_lr, "power": tr.power,
            "total": total, "warmup_period": tr.warmup_period, "lower_b1": lower_b1,
            "b1": tr.b1, "b2": tr.b2, "eps": tr.eps, "weight_decay": tr.weight_decay}  # fmt: skip


def step_config(cfg: FewShotConfig) -> StepConfig:
    """The static settings of the bi-level step from a run's config."""
    tr, cal = cfg.train, cfg.calibration
    return StepConfig(
        hypergradient=tr.hypergradient if tr.bilevel else "none",
        semantic_head=cfg.sam.head_init,
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


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """Everything a run (or an evaluation of its checkpoints) builds before iterating."""

    cfg: FewShotConfig
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
    step_fn: Any  # one iteration per call (`blo.make_step`)
    epoch_fn: Any  # a run of iterations per call (`blo.make_epoch`)
    total_steps: int
    iters_per_epoch: int
    box_note: str
    sam: Any
    embedder: Embedder
    preprocessing: Preprocessing
    mesh: Any = None  # the step's device mesh (`training.mesh.make_mesh`); None: one device
    precompiling: "Precompile | None" = None  # `precompile_epoch`; joined before the loop
    # `hyperparameters` as float32 scalars: the step's numbers, passed at run time
    hyper: Any = None


class Steps(NamedTuple):
    """The step functions `build_setup` builds for one model graph."""

    graphdef: Any
    step_fn: Any
    epoch_fn: Any
    lower_tx: Any
    upper_tx: Any


def data_dir_of(cfg: FewShotConfig) -> Path:
    """`data.dir`, or the bundled synthetic few-shot set."""
    return Path(cfg.data.dir) if cfg.data.dir else bundled_synthetic_dir(cfg.data.num_classes)


def build_setup(
    cfg: FewShotConfig, workdir: Path, quiet: bool = False, mesh=None, precompile: bool = False
) -> Setup:
    """Resolves weights, loads and caches data, builds the partitioned model and step (over
    `mesh` when it has more than one device, docs/scale.md §2).

    With `precompile` (a training run), the epoch function compiles in a background thread while
    the image encoder computes the embeddings (`precompile_epoch`).
    """
    say = (lambda m: None) if quiet else log
    data_dir = data_dir_of(cfg)
    pool = list_samples(data_dir, "train")  # the folder structure first: fails fast
    shots = select_few_shot(pool, cfg.data.shots, cfg.data.seed)
    if cfg.train.bilevel:
        d1_samples, d2_samples = split_d1_d2(shots)
    else:  # SAMed: the lower level sees all shots; D2 (= all) only selects the checkpoint
        d1_samples, d2_samples = shots, shots
    if mesh is not None:
        check_batches_divide(cfg, len(d1_samples), len(d2_samples), mesh)
        mesh = mesh if mesh.devices.size > 1 else None  # one device: the plain step
    located = locate_sam(cfg)  # the model's config: the weights are read further down
    sam_cfg = located.target
    # Labels at the decoder's low resolution: 4G (64 for ViT at 256 px, 256 for LiteMedSAM).
    prep = Preprocessing(
        size=sam_cfg.image_size,
        low_res=4 * sam_cfg.grid_size,
        sam_pixel_norm=cfg.data.sam_pixel_norm,
        num_classes=cfg.data.num_classes,
    )
    d1, d2 = load_split(d1_samples, prep), load_split(d2_samples, prep)
    say(f"data: {data_dir} | {len(shots)} shots -> D1 {len(d1.stems)}, D2 {len(d2.stems)}")

    box_note = "box prompts: off (no boxes.file / boxes.detector)"
    box_file_path = cfg.boxes.file
    if cfg.boxes.detector:
        box_file_path = str(ensure_box_file(cfg, data_dir, workdir))
    if box_file_path:
        box_file = load_box_file(box_file_path)
        m, cut = cfg.boxes.max_per_image, set()
        for split in (d1, d2):
            cut.update(assign_boxes(split, box_file, box_file_path, sam_cfg.image_size, m))
        entries = [box_file["boxes"][s] for s in d1.stems + d2.stems]
        rate = float(np.mean([bool(e.get("fallback")) for e in entries]))
        box_note = f"box prompts: {box_file_path} (fallback rate {100 * rate:.1f}%)"
        if m > 1:  # docs/fewshot.md §6.4
            box_note += f"; up to {m} per image, {len(cut)} image(s) with more cut to {m}"
    say(box_note)

    iters = math.ceil(len(d1.stems) / cfg.train.batch_size)
    total = cfg.train.epochs * iters
    lower_lr, upper_lr, lower_b1 = schedules(cfg, total)
    hyper = {k: jnp.asarray(v, jnp.float32) for k, v in hyperparameters(cfg, total).items()}
    scfg = step_config(cfg)

    def functions(trainable: Trainable) -> Steps:
        step, lower_tx, upper_tx = build_step(
            trainable.graphdef, scfg, lower_lr, upper_lr, lower_b1
        )
        key = program_key(cfg, sam_cfg)
        return Steps(trainable.graphdef, *jit_steps(step, mesh, key), lower_tx, upper_tx)

    def initial_of(trainable: Trainable, fns: Steps) -> dict:
        return {
            "lower": trainable.lower,
            "prompt": trainable.prompt,
            "lower_opt": init_optimizer(fns.lower_tx, trainable.lower),
            "prompt_opt": init_optimizer(fns.upper_tx, trainable.prompt),
            "step": jnp.asarray(0, jnp.int32),
        }

    def setup_of(sam, weights, embedder, trainable, fns: Steps, initial) -> Setup:
        return Setup(
            cfg, sam_cfg, weights, fns.graphdef, trainable.frozen, initial, scfg, d1, d2,
            fns.lower_tx, fns.upper_tx, fns.step_fn, fns.epoch_fn, total, iters, box_note, sam,
            embedder, prep, mesh, hyper=hyper,
        )  # fmt: skip

    fns, precompiling = None, None
    if precompile and mesh is None:
        # The epoch compiles from the shapes of the model in a background thread, while the
        # weights load and the image encoder computes the embeddings (`precompile_epoch`).
        shapes = split_trainable(
            abstract_sam(sam_cfg, then=lambda sam: training_model(sam, cfg, sam_cfg))
        )
        fns = functions(shapes)
        initial = jax.eval_shape(lambda: initial_of(shapes, fns))
        precompiling = precompile_epoch(setup_of(None, "", None, shapes, fns, initial))
    try:
        sam, _, weights_key, weights = load_located(cfg, located)
        say(f"sam: {weights}")
        embedder = Embedder(sam.image_encoder, weights_key)
        trainable = split_trainable(training_model(sam, cfg, sam_cfg))
        say(
            f"trainable: lower {count_params(trainable.lower):,} | prompt "
            f"{count_params(trainable.prompt):,} | frozen {count_params(trainable.frozen):,}"
        )
        if fns is None or fns.graphdef != trainable.graphdef:
            if precompiling is not None:  # not the model the shapes foretold: its own step
                precompiling.cancel()
                precompiling = None
            fns = functions(trainable)
        elif precompiling is not None:
            precompiling.allow()  # the weights loaded: the epoch compiles for them
        setup = setup_of(sam, weights, embedder, trainable, fns, initial_of(trainable, fns))
        setup.precompiling = precompiling
        for split in (d1, d2):
            split.embedding = embedder.embed(split.image, prep.key())
    except BaseException:
        if precompiling is not None:
            precompiling.cancel()  # no compile left running when the error is reported
        raise
    stats = embedder.cache.stats
    say(f"embeddings: {stats.hits} cached, {stats.misses} computed ({embedder.cache.cache_dir})")
    return setup


def training_model(sam, cfg: FewShotConfig, sam_cfg: SamConfig) -> TrainingModel:
    """LoRA, the trainable partition and the optional box residual on `sam` (in place)."""
    apply_lora(sam, rank=cfg.lora.rank, alpha=cfg.lora.alpha, seed=cfg.seed)
    mark_trainable(sam, train_iou_head=cfg.lora.train_iou_head)
    residual = BoxResidual(sam_cfg.prompt_embed_dim) if cfg.boxes.residual else None
    return TrainingModel(PromptDecoder(sam), residual)


def precompile_epoch(setup: Setup) -> "Precompile | None":
    """Starts compiling the epoch function for a fresh run's first call (a full epoch, or
    `train.checkpoint_every` iterations) in a background thread; returns it, or None where the
    loop would not call it (ragged batches, a mesh).

    Called before the embeddings exist: their shape is known, and the tracing, lowering and
    XLA compilation (or persistent-cache load) of the epoch then overlap the image encoder. A
    compile of the same function and argument shapes is what the loop's first call finds in
    JAX's caches; a resumed run whose first call is shorter compiles that one itself.
    """
    if setup.mesh is not None:
        return None
    every, iters = setup.cfg.train.checkpoint_every, setup.iters_per_epoch
    length = min(every, iters) if every else iters
    g, c = setup.sam_cfg.grid_size, setup.sam_cfg.prompt_embed_dim

    def shaped(split: Split) -> Split:  # a placeholder with the embeddings' shape and dtype
        return dataclasses.replace(
            split, embedding=np.zeros((len(split.stems), g, g, c), np.float32)
        )

    def stacked_batches():
        batches = Batches.of(dataclasses.replace(setup, d1=shaped(setup.d1), d2=shaped(setup.d2)))
        return batches.d1, batches.d2

    d1, d2 = jax.eval_shape(stacked_batches)
    if d1 is None:
        return None
    idx = jax.ShapeDtypeStruct((length,), jnp.int32)

    def compile_epoch(precompile: "Precompile"):
        try:
            lowered = setup.epoch_fn.lower(
                setup.initial, setup.frozen, d1, d2, idx, idx, setup.hyper
            )
            precompile.decided.wait()
            if precompile.go:
                lowered.compile()
        except Exception:  # the loop's own call compiles and reports the error
            pass

    return Precompile(compile_epoch)


class Precompile:
    """`precompile_epoch`'s thread: it traces and lowers the epoch at once, then compiles it once
    `allow` says the weights loaded (`cancel`: they did not). A setup error (unreadable or
    corrupt weights) is then reported when the trace ends, not after an XLA compile of ~10 s on
    2 cores, which cannot be interrupted."""

    def __init__(self, target):
        self.decided, self.go = threading.Event(), False
        self.thread = threading.Thread(
            target=target, args=(self,), name="precompile-epoch", daemon=True
        )
        self.thread.start()

    def allow(self) -> None:
        self.go = True
        self.decided.set()

    def cancel(self) -> None:
        self.decided.set()
        self.thread.join()

    def join(self) -> None:
        self.allow()  # joined to be used: nothing stands in its way any more
        self.thread.join()


def finish_precompile(setup: Setup) -> None:
    """Waits for `precompile_epoch`'s thread, if any (before the loop, and before an error
    exits: the interpreter never shuts down under a running XLA compile)."""
    if setup.precompiling is not None:
        setup.precompiling.join()
        setup.precompiling = None


def jit_steps(step, mesh, key: str | None = None) -> tuple[Any, Any]:
    """(one iteration per call, a run of iterations per call) of the unjitted `step`; over a
    `mesh`, both return the state and metrics replicated (None: the single-device functions).
    On one device with the compilation cache on, the epoch function keeps its traced program
    under `key` (`utils.program_cache`, docs/fewshot.md §5.7)."""
    out = {} if mesh is None else meshlib.replicated_outputs(mesh)
    options = decoder_program_options()
    directory = program_cache.programs_dir()
    if mesh is None and key is not None and directory is not None:
        epoch = program_cache.CachedProgram("epoch", epoch_of(step), key, directory, options)
    else:
        epoch = make_epoch(step, mesh)
    return jax.jit(step, donate_argnums=0, compiler_options=options, **out), epoch


def program_key(cfg: FewShotConfig, sam_cfg: SamConfig) -> str:
    """What of a run's configuration may change its traced step: all of it but the numbers
    `Setup.hyper` passes at run time (`hyperparameters`), which a sweep then shares."""
    numbers = {f: 0 for f in ("lower_lr", "upper_lr", "power", "warmup_period", "epochs", "b1",
                              "b2", "eps", "weight_decay")}  # fmt: skip
    return repr((dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **numbers)),
                 sam_cfg))  # fmt: skip


def check_batches_divide(cfg: FewShotConfig, n1: int, n2: int, mesh) -> None:
    """Every D1 and D2 batch a run uses must split evenly over the mesh's devices
    (docs/scale.md §1): the full batches and the short last one of a split that `train.batch_size`
    does not divide.

    Raises:
        MeshError: naming `train.batch_size` and the batch that does not divide.
    """
    bs = cfg.train.batch_size
    splits = [("D1", n1, False), ("D2", n2, cfg.train.upper_batch == "first")]
    for name, n, first_only in splits:
        if n < bs:
            one = f"train.batch_size ({name}: one batch of its {n} images)"
            meshlib.check_divides(one, n, mesh)
            continue
        meshlib.check_divides("train.batch_size", bs, mesh)
        if n % bs and not first_only:
            short = f"train.batch_size ({name}: the last batch of its {n} images)"
            meshlib.check_divides(short, n % bs, mesh)


def ensure_box_file(cfg: FewShotConfig, data_dir: Path, workdir: Path) -> Path:
    """Computes (or reuses, keyed by detector and image hashes) the run's box file."""
    return detect_into(cfg, list_split_images(data_dir, "all"), workdir / "boxes.json")


def detect_into(cfg: FewShotConfig, paths: list[Path], out: Path) -> Path:
    """The box file `out` of `paths` with the run's detector settings (`boxes.*`)."""
    compute_box_file(
        cfg.boxes.detector,
        paths,
        out,
        conf=cfg.boxes.conf,
        iou=cfg.boxes.iou,
        classes=list(cfg.boxes.classes) if cfg.boxes.classes else None,
        fallback=cfg.boxes.fallback,
        policy="all" if cfg.boxes.max_per_image > 1 else "top1",  # every box: §6.4
    )
    return out


# ----------------------------------------------------------------------------- training


def train(
    cfg: FewShotConfig, workdir: str | os.PathLike, writer: JsonlWriter | None = None
) -> dict:
    """Runs (or resumes) a training run in `workdir`, on the `mesh.data` devices of every
    process (docs/scale.md); the other processes return process 0's summary.

    Returns:
        summary: best D2 Dice, steps, weights description, paths.
    """
    cfg = cfg.validate()  # also derives sam.num_classes from data.num_classes
    mesh = meshlib.make_mesh(cfg.mesh.data)  # before the workdir: a bad mesh.data leaves none
    run = Run(
        workdir,
        cfg.to_dict(),
        cfg.train.checkpoint_every_s,
        background_saves=True,
        defaults=type(cfg)().to_dict(),
    )
    workdir = run.workdir
    with run.setting_up():
        # A finished run (its summary written) compiles nothing.
        setup = build_setup(cfg, workdir, mesh=mesh, precompile=run.summary() is None)
    try:
        return _resume_and_train(cfg, setup, run, writer)
    finally:
        finish_precompile(setup)


def _resume_and_train(cfg: FewShotConfig, setup: Setup, run: Run, writer) -> dict:
    """`train` after its setup: restores a checkpoint if there is one, trains, finishes."""
    workdir = run.workdir
    state = clone_state(setup.initial)
    meta = {"step": 0, "epoch": 0, "best_dice": 0.0}
    restored = run.restore(setup.initial)
    if restored is not None:
        state, meta = restored
        log(f"resume: from step {meta['step']} (epoch {meta['epoch']}) in {workdir}")
    if writer is None:
        resumed = meta["step"] if restored is not None else None
        writer = run.metrics(resumed) if meshlib.is_main_process() else MemoryWriter()
    summary = run.summary()
    if int(meta["step"]) >= setup.total_steps and summary is not None:
        log(f"resume: the run in {workdir} is already complete ({meta['step']} steps)")
        return summary
    if setup.mesh is not None:
        state = meshlib.replicate(state, setup.mesh)
    with run.interruptible():
        state, step, best, meta = _train_loop(cfg, setup, run, writer, state, meta)
    return _finish(setup, run, writer, state, step, best, meta)


@dataclasses.dataclass(frozen=True)
class Batches:
    """The batch schedule of a run (docs/fewshot.md §5.3) and, when every batch it uses has the
    same shape, the two splits stacked on the device for `blo.make_epoch`.

    Iteration k (0-based) trains on D1 batch `k % iters_per_epoch` and D2 batch 0
    (`train.upper_batch=first`) or `k % n2_batches` (`cycle`); batch i of a split holds its rows
    i*B .. min((i+1)*B, n) - 1, so the last one is short when B does not divide n.
    """

    batch_size: int
    n1: int
    n2: int
    iters_per_epoch: int
    upper_first: bool
    d1: dict | None  # (n1 // B, B, ...) arrays, or None: ragged, one jitted step per iteration
    d2: dict | None

    @classmethod
    def of(cls, setup: Setup) -> "Batches":
        bs, n1, n2 = setup.cfg.train.batch_size, len(setup.d1.stems), len(setup.d2.stems)
        upper_first = setup.cfg.train.upper_batch == "first"
        plan = cls(bs, n1, n2, setup.iters_per_epoch, upper_first, None, None)
        d2_batches = 1 if upper_first else math.ceil(n2 / bs)
        # A short batch cannot be stacked with full ones: padding it would change the batch
        # means of the loss and of the calibration (docs/fewshot.md §6.3), so such a run keeps
        # the per-iteration path.
        ragged = n1 % bs or (d2_batches > 1 and n2 % bs)
        if ragged:
            return plan

        def stack(split: Split, count: int) -> dict:
            batches = [split.batch(plan.rows(i, split is setup.d1)) for i in range(count)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

        d1, d2 = stack(setup.d1, setup.iters_per_epoch), stack(setup.d2, d2_batches)
        if setup.mesh is not None:  # (n_batches, B, ...): each batch's images over the devices
            d1, d2 = meshlib.shard_batch((d1, d2), setup.mesh, axis=1)
        return dataclasses.replace(plan, d1=d1, d2=d2)

    @property
    def stacked(self) -> bool:
        return self.d1 is not None

    def rows(self, batch: int, d1: bool) -> np.ndarray:
        """The rows of batch `batch` of D1 (or D2)."""
        n = self.n1 if d1 else self.n2
        return np.arange(batch * self.batch_size, min((batch + 1) * self.batch_size, n))

    def indices(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(D1 batch, D2 batch) of iterations start .. stop - 1, as (T,) int32."""
        k = np.arange(start, stop)
        n2_batches = math.ceil(self.n2 / self.batch_size)
        j = np.zeros_like(k) if self.upper_first else k % n2_batches
        return (k % self.iters_per_epoch).astype(np.int32), j.astype(np.int32)


def run_iterations(
    setup: Setup, batches: Batches, state: dict, start: int, stop: int, frozen=None, hyper=None
):
    """Iterations start .. stop - 1 of one epoch: one `epoch_fn` call over the stacked batches,
    or (ragged batches) one `step_fn` call each. `frozen` and `hyper` are as the step takes them
    (replicated over a mesh; None: `setup.frozen`, `setup.hyper`).

    Returns:
        (state, metrics): metrics as host arrays (T,) per name, T = stop - start.
    """
    mesh = setup.mesh
    frozen = setup.frozen if frozen is None else frozen
    hyper = setup.hyper if hyper is None else hyper
    idx1, idx2 = batches.indices(start, stop)
    if batches.stacked:
        idx1, idx2 = jnp.asarray(idx1), jnp.asarray(idx2)
        if mesh is not None:
            idx1, idx2 = meshlib.replicate((idx1, idx2), mesh)
        state, metrics = setup.epoch_fn(state, frozen, batches.d1, batches.d2, idx1, idx2, hyper)
        return state, jax.device_get(metrics)
    rows = []
    for i, j in zip(idx1, idx2, strict=True):
        batch1 = setup.d1.batch(batches.rows(int(i), True))
        batch2 = setup.d2.batch(batches.rows(int(j), False))
        if mesh is not None:
            batch1, batch2 = meshlib.shard_batch((batch1, batch2), mesh)
        state, metrics = setup.step_fn(state, frozen, batch1, batch2, hyper)
        rows.append(metrics)
    return state, jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(rows))


def _train_loop(cfg: FewShotConfig, setup: Setup, run: Run, writer, state: dict, meta: dict):
    """Epochs from `meta["step"]` to the end; returns (state, step, best D2 Dice, meta).

    Each epoch is one `run_iterations` call (split at the multiples of `train.checkpoint_every`
    when set, and starting where a resumed run's checkpoint left off). Non-finite values, Ctrl-C
    and the saves act at those boundaries; the metrics of every iteration are written as before,
    `step_time_s` being the call's wall time over its iterations.
    """
    batches = Batches.of(setup)
    frozen, hyper = setup.frozen, setup.hyper
    if setup.mesh is not None:
        frozen, hyper = meshlib.replicate((frozen, hyper), setup.mesh)
    elif isinstance(setup.epoch_fn, program_cache.CachedProgram):
        # Its results are committed to the device: so are its arguments, from the first call on
        # (and the state D2's evaluation compiles for), or each first call would compile again.
        state, frozen, hyper = setup.epoch_fn.place((state, frozen, hyper))
        batches = dataclasses.replace(batches, d1=setup.epoch_fn.place(batches.d1),
                                      d2=setup.epoch_fn.place(batches.d2))  # fmt: skip
    d2_eval = dataclasses.replace(setup.d2.eval_data(), masks=None)  # the loop uses dice, iou
    try:
        if setup.precompiling is not None:  # the D2 evaluation compiles while the epoch does
            compile_evaluation(setup.graphdef, setup.step_cfg, state, setup.frozen, d2_eval)
    finally:
        finish_precompile(setup)
    iters = setup.iters_per_epoch
    every = cfg.train.checkpoint_every
    step = int(meta["step"])
    best = float(meta["best_dice"])
    while step < setup.total_steps:
        epoch = step // iters
        end = (epoch + 1) * iters
        bar = tqdm(
            total=iters,
            initial=step % iters,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            file=sys.stderr,
            leave=False,
            disable=None,
        )
        while step < end:
            stop = min(end, (step // every + 1) * every) if every else end
            t0 = time.perf_counter()
            state, stacked = run_iterations(setup, batches, state, step, stop, frozen, hyper)
            elapsed = (time.perf_counter() - t0) / (stop - step)
            for t in range(stop - step):
                metrics = {k: float(v[t]) for k, v in stacked.items()}
                guarded = {k: v for k, v in metrics.items() if k.endswith("loss")}
                guarded["hypergradient_norm"] = metrics["hypergradient_norm"]
                if not all(math.isfinite(v) for v in guarded.values()):
                    bar.close()  # the state after this call is never saved
                    run.check_finite(guarded, f"step {step}")  # raises, naming what can resume
                step += 1
                writer.write({"kind": "iteration", "step": step, "epoch": epoch, **metrics,
                              "step_time_s": elapsed})  # fmt: skip
            bar.set_postfix(loss=f"{metrics['lower_loss']:.4f}")
            bar.update(len(stacked["lower_loss"]))
            if step < end:  # a `checkpoint_every` boundary inside the epoch
                run.save("latest", state, {**meta, "step": step, "epoch": epoch})
                run.stop_if_requested(state, {**meta, "step": step, "epoch": epoch}, f"step {step}")
        # End of epoch: D2 Dice, best (strictly greater), latest.
        result = epoch_evaluation(setup, state, d2_eval)
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
            run.save_best(state, {**meta, "d2_dice": dice})  # written with the next `latest`
        writer.write({"kind": "epoch", "step": step, "epoch": epoch + 1, "d2_dice": dice,
                      "d2_iou": result["iou"], "best_d2_dice": best,
                      **per_class_of(result, "d2_")})  # fmt: skip
        run.save_latest(state, meta, force=step >= setup.total_steps)
        run.stop_if_requested(state, meta, f"step {step} (end of epoch {epoch + 1})")
    return state, step, best, meta


def _finish(setup: Setup, run: Run, writer, state: dict, step: int, best: float, meta: dict):
    """The final checkpoint, plots, samples and summary (a rerun after a kill redoes them); all
    but the checkpoints on process 0 alone, while the others wait."""
    cfg, workdir, frozen = setup.cfg, run.workdir, setup.frozen
    run.save("final", state, {**meta, "step": step})
    # No epoch beat 0: best is the final state. `best > 0` covers a `best` save still pending in
    # the background; process 0 decides for all, as every process takes part in a save.
    if not meshlib.agree(best > 0.0 or (workdir / "ckpt" / "best").exists()):
        run.save("best", state, {**meta, "step": step})
    if setup.mesh is not None:
        state = meshlib.to_host(state)  # the rest runs on process 0 alone
    if not meshlib.is_main_process():
        run.wait_for_saves()
        meshlib.sync("fewshot-finished")
        return run.summary() or {"workdir": str(workdir)}
    plot_curves(writer.records(), workdir / "plots" / "curves.png")
    preds = evaluate_predictions(setup, state)
    write_samples(setup.d2, preds, workdir / "samples", cfg.train.num_samples)
    d2 = dataclasses.replace(setup.d2.eval_data(), masks=None)  # the summary uses the Dice only
    final = evaluate_fewshot(setup.graphdef, setup.step_cfg, state, frozen, d2)
    summary = {
        "workdir": str(workdir),
        "weights": setup.weights,
        "boxes": setup.box_note,
        "steps": step,
        "best_d2_dice": best,
        "final_d2_dice": float(final["dice"]),
        **per_class_of(final, "final_d2_"),
    }
    run.wait_for_saves()  # `final` (written while the above ran) is on disk before the summary
    run.write_summary(summary)
    meshlib.sync("fewshot-finished")
    return summary


def epoch_evaluation(setup: Setup, state: dict, data) -> dict:
    """`evaluate_fewshot` of D2 at an epoch's end. Over a mesh it runs on process 0 from a host
    copy of the replicated state, and its Dice and IoU are process 0's on every process: one
    `best` decision for all of them (docs/scale.md §4)."""
    if setup.mesh is None:
        return evaluate_fewshot(setup.graphdef, setup.step_cfg, state, setup.frozen, data)
    result = {"dice": 0.0, "iou": 0.0}
    if meshlib.is_main_process():
        trainable = meshlib.to_host({k: state[k] for k in TRAINABLE})
        result = evaluate_fewshot(setup.graphdef, setup.step_cfg, trainable, setup.frozen, data)
    result["dice"], result["iou"] = meshlib.agree_values([result["dice"], result["iou"]])
    return result


def per_class_of(result: dict, prefix: str) -> dict:
    """`<prefix>dice_per_class` and `<prefix>iou_per_class` of a multi-class evaluation (class
    1..K, docs/fewshot.md §4.5); nothing for a binary one."""
    keys = ("dice_per_class", "iou_per_class")
    return {prefix + k: result[k] for k in keys if k in result}


def evaluate_predictions(setup: Setup, state: dict) -> np.ndarray:
    """Argmax predictions of the D2 images under `state`."""
    return predict_masks(setup.graphdef, setup.step_cfg, state, setup.frozen, setup.d2.eval_data())


TRAINABLE = ("lower", "prompt")


def load_run_state(workdir: str | os.PathLike, kind: str = "best") -> tuple[Setup, dict, dict]:
    """Rebuilds a run's setup from its config and restores checkpoint `kind`.

    Raises:
        TrainError: not a few-shot workdir, or no such checkpoint.
    """
    workdir = Path(workdir).absolute()
    cfg = FewShotConfig.from_dict(read_run_config(workdir))
    setup = build_setup(cfg, workdir, quiet=True)
    restored = restore_state(workdir, kind, setup.initial)
    if restored is None:
        raise TrainError(workdir / "ckpt" / kind, "no checkpoint")
    return setup, restored[0], restored[1]
