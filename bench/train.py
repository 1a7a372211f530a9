"""Bi-level training benchmark: seconds per iteration per hypergradient mode, and a whole run.

    python -m bench train [--iterations 30] [--epochs 100] [--shots 8] [--no-run]
        [--modes exact,first_order,darts_fd] [--xla-cache] [--profile]

Prints one JSON object, then a readable table (`bench/report.py`) with the machine load:
- `iteration`: the jitted bi-level step (`blo.make_step`, as the trainer builds it) on a random
  ViT-B SAM at 256 px with one mask output (2 mask tokens), batch 1, random inputs shaped like
  cached embeddings (1, 16, 16, 256) and labels (1, 64, 64): compile time (first call minus a
  steady-state call) and median/min/max seconds per iteration, synchronised on the metrics;
  called as the trainer calls it, with the schedules' and optimisers' numbers at run time.
- `checkpoint_save_s`: one synchronous Orbax save of the trainable state
  (`training.state.save_state`); the trainer writes its saves in a background thread.
- `run`: a whole `fewshot.trainer.train` run (random ViT-B, bundled synthetic data, `data.shots`,
  `train.epochs`, `train.checkpoint_every=0`) in a fresh subprocess with an empty embedding cache
  and no persistent compilation cache: wall time including SAM construction, encoder compile and
  embedding, the epoch function's compile, per-epoch D2 evaluation and saves. Time is attributed
  by timers wrapped around the trainer's module-level functions (an epoch is one call, so the
  first epoch holds the compile). With `--xla-cache`, `run` is the same run with an empty
  persistent XLA cache (`cold`), again with the cache it filled (`warm`), with half the learning
  rates and weight decay and that cache (`sweep`: a sweep's next point, whose numbers reach the
  step at run time), and with the embedding cache the second run filled too (`rerun`: a user's
  next run on the same shots).
- `profile` (`--profile`): each piece of the step compiled alone with the trainer's XLA options,
  and for the steps the thread time per call by kind of XLA:CPU kernel (`kernel_classes`: YNNPACK
  kernels with and without a dot, other dots, XLA's own loops), from a `jax.profiler` trace.
- peak RSS of each process (`ru_maxrss`), targets and the reference PyTorch numbers.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Row, load_snapshot, machine_state, print_report

GIB = 1024**3
MODES = ("exact", "first_order", "darts_fd")
TARGETS = {
    "exact_s_per_iteration": 0.025,
    "run_s": 30.0,
    "warm_run_s": 15.0,
    "peak_rss_gib": 2.0,
}
# This benchmark before the epoch scan (issue 13), on a quiet 2-core CPU: per-iteration seconds
# and the whole 8-shot, 100-epoch run cold (8 s setup, 13 s compile, 20 s steps, 4 s evaluation).
BEFORE = {"exact_s": 0.047, "first_order_s": 0.025, "run_cold_s": 48.0}
# Official BLO-SAM (PyTorch) seconds per bi-level iteration, as quoted in the training issue.
REFERENCE = {
    "pytorch_unrolled_s": 3.79,
    "pytorch_first_order_s": 1.47,
    "pytorch_unrolled_cached_embeddings_s": 0.137,
    "pytorch_first_order_cached_embeddings_s": 0.046,
    "note": "official BLO-SAM; uncached numbers re-run the image encoder 5x per iteration",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench train",
        description="Bi-level step time per hypergradient mode and a whole few-shot run.",
    )
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations after compile")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--epochs", type=int, default=100, help="whole run: epochs")
    parser.add_argument("--shots", type=int, default=8, help="whole run: few-shot N")
    parser.add_argument("--no-run", action="store_true", help="skip the whole run")
    parser.add_argument("--no-steps", action="store_true", help="skip the per-iteration part")
    parser.add_argument(
        "--xla-cache",
        action="store_true",
        help="whole run with the persistent XLA compilation cache (as the train CLI)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time the step's pieces (forward, gradients, steps) with kernel and FLOP counts, "
        "and the steps' thread time by kind of kernel (a jax.profiler trace)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("run",), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-point", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_gib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def bench_config(epochs: int, shots: int, sweep_point: bool = False):
    """The am_sam recipe on a random ViT-B at 256 px and the bundled synthetic data;
    `sweep_point`: with half its learning rates and weight decay (the next point of a sweep)."""
    import dataclasses

    from amsam_jax.fewshot.recipes import am_sam

    cfg = am_sam()
    train = dataclasses.replace(cfg.train, epochs=epochs, checkpoint_every=0, num_samples=0)
    if sweep_point:
        train = dataclasses.replace(
            train, lower_lr=train.lower_lr / 2, upper_lr=train.upper_lr / 2,
            weight_decay=train.weight_decay / 2,
        )  # fmt: skip
    return dataclasses.replace(
        cfg,
        name="bench_train",
        sam=dataclasses.replace(cfg.sam, model_type="vit_b", download=False, checkpoint=None),
        data=dataclasses.replace(cfg.data, dir=None, shots=shots),
        train=train,
    )


def kernel_classes(compiled, call, calls: int = 5) -> dict:
    """Thread milliseconds per call by kind of XLA:CPU kernel, from a `jax.profiler` trace of
    `calls` calls, its events joined by name to the compiled module's instructions: YNNPACK
    kernels with a dot, YNNPACK kernels without one (elementwise, reductions), other dots, and
    XLA's own loop fusions and the rest."""
    import glob
    import gzip
    import re

    import jax

    text = compiled.as_text()
    bodies = dict(re.findall(r"\n%?([\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", text, re.S))
    kind = {}
    for name, rest in re.findall(r"%([\w.\-]+) = \S+ ((?:fusion|dot)\(.*)", text):
        callee = re.search(r"calls=%([\w.\-]+)", rest)
        if "kind=kCustom" in rest and callee:
            has_dot = " dot(" in bodies.get(callee.group(1), "")
            kind[name] = "YNNPACK, with a dot" if has_dot else "YNNPACK, no dot"
        elif rest.startswith("dot("):
            kind[name] = "other dots"
        else:
            kind[name] = "XLA loops and other"
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(calls):
            jax.block_until_ready(call())
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    out: dict[str, dict] = {}
    for event in events:
        k = kind.get(event.get("name")) if event.get("ph") == "X" else None
        if k is not None:
            row = out.setdefault(k, {"kernels": 0, "thread_ms": 0.0})
            row["kernels"] += 1
            row["thread_ms"] += event.get("dur", 0) / 1e3
    return {
        k: {"kernels": round(v["kernels"] / calls), "thread_ms": round(v["thread_ms"] / calls, 2)}
        for k, v in sorted(out.items())
    }


def profile_pieces(loss, step_of, trainable, batch1, batch2, iterations: int) -> dict:
    """Each piece of a bi-level step compiled alone, with the trainer's XLA options: its XLA kernel
    count (fusions and dots of the compiled entry computation), GFLOP (XLA's cost analysis) and
    median milliseconds, so the achieved GFLOP/s shows whether a piece is bound by arithmetic or
    by per-kernel cost; the steps also with `kernel_classes`."""
    import re

    import jax

    from amsam_jax.utils.runtime import decoder_program_options

    def piece(fn, *a, classes=False):
        compiled = jax.jit(fn, compiler_options=decoder_program_options()).lower(*a).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        text = compiled.as_text()
        entry = text[text.index("ENTRY") :]
        kernels = len(re.findall(r"= \S+ (?:fusion|dot|convolution|custom-call)\(", entry))
        for _ in range(3):
            jax.block_until_ready(compiled(*a))
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*a))
            times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        gflop = cost.get("flops", 0.0) / 1e9
        out = {"kernels": kernels, "gflop": round(gflop, 3), "median_ms": round(ms, 2),
               "gflop_per_s": round(gflop / (ms / 1e3), 1)}  # fmt: skip
        if classes:
            out["kernel_classes"] = kernel_classes(compiled, lambda: compiled(*a))
        return out

    args = (trainable.lower, trainable.prompt, trainable.frozen, batch1)
    out = {
        "forward (loss)": piece(loss, *args),
        "lower gradient": piece(jax.grad(loss, argnums=0), *args),
    }
    for mode, (step, state, hyper) in step_of.items():
        out[f"step {mode}"] = piece(step, state, trainable.frozen, batch1, batch2, hyper,
                                    classes=True)  # fmt: skip
    return out


def bench_steps(args: argparse.Namespace) -> dict:
    """Per-iteration time of every mode and one checkpoint save, in this process."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from amsam_jax.build_sam import SamConfig, build_sam
    from amsam_jax.fewshot.blo import (
        TrainingModel,
        build_step,
        make_loss_fn,
        make_step,
        split_trainable,
    )  # fmt: skip
    from amsam_jax.fewshot.lora import apply_lora, mark_trainable
    from amsam_jax.fewshot.trainer import hyperparameters, schedules, step_config
    from amsam_jax.training.prompt_decoder import PromptDecoder
    from amsam_jax.training.state import save_state

    cfg = bench_config(args.epochs, args.shots)
    sam = build_sam(SamConfig.vit_b(image_size=256, num_multimask_outputs=1), seed=args.seed)
    apply_lora(sam, rank=cfg.lora.rank, alpha=cfg.lora.alpha, seed=args.seed)
    mark_trainable(sam, train_iou_head=cfg.lora.train_iou_head)
    trainable = split_trainable(TrainingModel(PromptDecoder(sam), None))
    del sam  # the image encoder is not part of a step (cached embeddings)
    rng = np.random.default_rng(args.seed)

    def batch():
        return {
            "embedding": jnp.asarray(rng.standard_normal((1, 16, 16, 256), np.float32)),
            "label": jnp.asarray(rng.integers(0, 2, (1, 64, 64), np.int32)),
        }

    batch1, batch2 = batch(), batch()
    results, pieces = {}, {}
    state = None

    def fresh_state(lower_tx, upper_tx):
        return {
            "lower": jax.tree.map(lambda x: jnp.array(x, copy=True), trainable.lower),
            "prompt": jax.tree.map(lambda x: jnp.array(x, copy=True), trainable.prompt),
            "lower_opt": lower_tx.init(trainable.lower),
            "prompt_opt": upper_tx.init(trainable.prompt),
            "step": jnp.asarray(0, jnp.int32),
        }

    for mode in args.modes.split(","):
        mcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, hypergradient=mode))
        total = mcfg.train.epochs * 4
        lower_lr, upper_lr, b1 = schedules(mcfg, total)
        step_fn, lower_tx, upper_tx = make_step(
            trainable.graphdef, step_config(mcfg), lower_lr, upper_lr, b1
        )
        state = fresh_state(lower_tx, upper_tx)
        # As the trainer calls it: the schedules' and optimisers' numbers at run time.
        hyper = {k: jnp.asarray(v, jnp.float32) for k, v in hyperparameters(mcfg, total).items()}

        def call(state, step_fn=step_fn, hyper=hyper):
            t0 = time.perf_counter()
            state, metrics = step_fn(state, trainable.frozen, batch1, batch2, hyper)
            metrics = {k: float(v) for k, v in metrics.items()}  # what the trainer syncs on
            return state, metrics, time.perf_counter() - t0

        state, metrics, first = call(state)
        for _ in range(args.warmup):
            state, metrics, _ = call(state)
        times = []
        for _ in range(args.iterations):
            state, metrics, seconds = call(state)
            times.append(seconds)
        median = statistics.median(times)
        if args.profile:
            pieces[mode] = (build_step(trainable.graphdef, step_config(mcfg), lower_lr, upper_lr,
                                       b1)[0], fresh_state(lower_tx, upper_tx), hyper)  # fmt: skip
        results[mode] = {
            "median_s": round(median, 4),
            "min_s": round(min(times), 4),
            "max_s": round(max(times), 4),
            "compile_s": round(first - median, 2),
            "finite": all(np.isfinite(v) for v in metrics.values()),
        }
    saves = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(3):
            t0 = time.perf_counter()
            save_state(Path(tmp), "latest", state, {"step": i + 1, "epoch": 0})
            saves.append(time.perf_counter() - t0)
    out = {
        "iteration": results,
        "checkpoint_save_s": round(statistics.median(saves), 3),
        "steps_peak_rss_gib": round(peak_rss_gib(), 3),
    }
    if args.profile:
        loss = make_loss_fn(trainable.graphdef, step_config(cfg))
        out["profile"] = profile_pieces(loss, pieces, trainable, batch1, batch2, args.iterations)
    return out


def run_worker(args: argparse.Namespace) -> int:
    """The whole run (subprocess): fewshot.trainer.train with timers around its stages."""
    import jax

    from amsam_jax.fewshot import trainer
    from amsam_jax.training import run as run_dir

    if args.xla_cache:
        from amsam_jax.utils.runtime import enable_compilation_cache

        enable_compilation_cache()
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
                calls[name] = calls.get(name, 0) + 1

        return wrapper

    names = ("build_setup", "compile_evaluation", "finish_precompile", "evaluate_fewshot",
             "evaluate_predictions", "run_iterations")  # fmt: skip
    for name in names:
        setattr(trainer, name, timed(name, getattr(trainer, name)))
    run_dir.save_state = timed("save_state", run_dir.save_state)  # in the saver thread
    cfg = bench_config(args.epochs, args.shots, args.sweep_point)
    t0 = time.perf_counter()
    summary = trainer.train(cfg, args.workdir)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in open(Path(args.workdir) / "metrics.jsonl")]
    iterations = [r for r in records if r["kind"] == "iteration"]
    first = sum(r["step_time_s"] for r in iterations if r["epoch"] == 0)
    later = [r["step_time_s"] for r in iterations if r["epoch"] > 0]
    median = statistics.median(later) if later else 0.0
    loop = spent.get("run_iterations", 0.0)
    accounted = sum(v for k, v in spent.items() if k != "save_state")
    out = {
        "wall_s": round(wall, 2),
        "iterations": len(iterations),
        "best_d2_dice": round(summary["best_d2_dice"], 2),
        "breakdown_s": {
            "setup (SAM build, data, encoder compile + embeddings)": round(
                spent.get("build_setup", 0.0), 2
            ),
            "compiles left after setup (the epoch's thread, D2's evaluation)": round(
                spent.get("finish_precompile", 0.0) + spent.get("compile_evaluation", 0.0), 2
            ),
            "first epoch (what is left of its compile + its iterations)": round(first, 2),
            "other epochs": round(loop - first, 2),
            "per-epoch D2 evaluation (+ final)": round(spent.get("evaluate_fewshot", 0.0), 2),
            "sample predictions": round(spent.get("evaluate_predictions", 0.0), 2),
            "rest (loop, metrics, saves' host copies, curves)": round(wall - accounted, 2),
        },
        "checkpoint_saves_background_s": round(spent.get("save_state", 0.0), 2),
        "calls": calls,
        "step_median_s": round(median, 4),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "devices": str(jax.devices()),
    }
    print(json.dumps(out))
    return 0


def bench_run(
    args: argparse.Namespace,
    xla_cache: Path | None,
    embeddings: Path | None = None,
    sweep_point: bool = False,
) -> dict:
    """Runs the whole-run worker in a fresh process with the embedding cache `embeddings` (None:
    an empty one), of `bench_config(..., sweep_point)`."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("AMSAM_SAM", "AMSAM_XLA_CACHE")}
        env["AMSAM_CACHE"] = str(embeddings or Path(tmp) / "embeddings")
        if xla_cache is not None:
            env["AMSAM_XLA_CACHE"] = str(xla_cache)
        cmd = [
            sys.executable, "-m", "bench", "train", "--worker", "run",
            "--workdir", str(Path(tmp) / "run"), "--epochs", str(args.epochs),
            "--shots", str(args.shots),
        ] + (["--xla-cache"] if xla_cache is not None else []) + (
            ["--sweep-point"] if sweep_point else [])  # fmt: skip
        # cwd = tmp: no `checkpoints/sam_vit_b` is picked up, the run uses random ViT-B weights.
        # bench/ itself must stay importable from there.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"whole-run worker failed: {tail[0]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def report_rows(out: dict) -> list[Row]:
    """The table: seconds per iteration per mode against PyTorch BLO-SAM with cached embeddings
    where it has the mode, and the whole run (warm against cold, both measured here). `BEFORE` was
    measured on a quiet machine, so it is named in the row, never divided by a loaded number."""
    rows = []
    references = {
        "exact": (f"exact s/iteration (was {BEFORE['exact_s']} s quiet)", None),
        "first_order": (
            "first_order s/iteration (ref: PyTorch)",
            REFERENCE["pytorch_first_order_cached_embeddings_s"],
        ),
        "darts_fd": (
            "darts_fd s/iteration (ref: PyTorch unrolled)",
            REFERENCE["pytorch_unrolled_cached_embeddings_s"],
        ),
    }
    for mode, result in out.get("iteration", {}).items():
        what, ref = references[mode]
        rows.append(Row(what, result["median_s"], ref))
    for piece, p in out.get("profile", {}).items():
        what = f"  {piece}: {p['kernels']} kernels, {p['gflop']} GFLOP, {p['gflop_per_s']} GFLOP/s"
        rows.append(Row(what, p["median_ms"] / 1e3))
        for kind, c in p.get("kernel_classes", {}).items():
            what = f"    {kind}: {c['kernels']} kernels (thread time)"
            rows.append(Row(what, c["thread_ms"] / 1e3))
    if "checkpoint_save_s" in out:
        rows.append(Row("one checkpoint save (off the loop)", out["checkpoint_save_s"]))
    run = out.get("run", {})
    cold = run.get("cold", run if "wall_s" in run else None)
    if cold:
        rss = int(cold["peak_rss_gib"] * GIB)
        what = f"whole run, cold (was {BEFORE['run_cold_s']:.0f} s quiet)"
        rows.append(Row(what, cold["wall_s"], ours_rss=rss))
        rows.append(Row("  in-run s/iteration, epochs 2+", cold["step_median_s"]))
    if "warm" in run:
        warm = run["warm"]
        rows.append(Row("whole run, warm XLA cache (ref: cold)", warm["wall_s"], cold["wall_s"],
                        ours_rss=int(warm["peak_rss_gib"] * GIB)))  # fmt: skip
    if "sweep" in run:
        sweep = run["sweep"]
        rows.append(Row("  another lr and weight decay, same XLA cache (ref: cold)",
                        sweep["wall_s"], cold["wall_s"],
                        ours_rss=int(sweep["peak_rss_gib"] * GIB)))  # fmt: skip
    if "rerun" in run:
        rerun = run["rerun"]
        rows.append(Row("  rerun, embeddings cached too (ref: cold)", rerun["wall_s"],
                        cold["wall_s"], ours_rss=int(rerun["peak_rss_gib"] * GIB)))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "run":
        return run_worker(args)
    before = load_snapshot()
    out = {
        "model": "vit_b random, 256 px, 1 mask output (2 mask tokens), LoRA r=4 on the decoder",
        "batch": {"embedding": [1, 16, 16, 256], "label": [1, 64, 64]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if not args.no_steps:
        out.update(bench_steps(args))
    if not args.no_run:
        config = (
            f"am_sam recipe, random vit_b, bundled synthetic, shots={args.shots}, "
            f"epochs={args.epochs}, checkpoint_every=0, cold embedding cache"
        )
        if args.xla_cache:
            with tempfile.TemporaryDirectory() as xla, tempfile.TemporaryDirectory() as emb:
                cold = bench_run(args, Path(xla))
                warm = bench_run(args, Path(xla), Path(emb))  # fills the embedding cache
                sweep = bench_run(args, Path(xla), sweep_point=True)  # cold embeddings
                rerun = bench_run(args, Path(xla), Path(emb))
            out["run"] = {"config": config + ", persistent XLA cache: empty, then filled; "
                          "sweep: half the learning rates and weight decay, the cold run's "
                          "XLA cache; rerun: both caches filled", "cold": cold, "warm": warm,
                          "sweep": sweep, "rerun": rerun}  # fmt: skip
        else:
            out["run"] = {"config": config + ", no persistent XLA cache",
                          **bench_run(args, None)}  # fmt: skip
    exact = out.get("iteration", {}).get("exact", {}).get("median_s")
    run = out.get("run", {})
    cold = run.get("cold", run if "wall_s" in run else None)
    warm, rerun = run.get("warm"), run.get("rerun")
    rss = [out.get("steps_peak_rss_gib")] + [r["peak_rss_gib"] for r in (cold, warm, rerun) if r]
    rss = [v for v in rss if v]
    out["targets"] = {
        **TARGETS,
        "exact_met": None if exact is None else exact <= TARGETS["exact_s_per_iteration"],
        "run_met": None if not cold else cold["wall_s"] <= TARGETS["run_s"],
        "warm_run_met": None if not warm else warm["wall_s"] <= TARGETS["warm_run_s"],
        "rerun_met": None if not rerun else rerun["wall_s"] <= TARGETS["warm_run_s"],
        "rss_met": None if not rss else max(rss) <= TARGETS["peak_rss_gib"],
    }
    out["reference"] = REFERENCE
    out["before"] = BEFORE
    out["machine_state"] = machine_state(before)
    print(json.dumps(out, indent=2))
    print_report("few-shot training (bench train)", report_rows(out), before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
