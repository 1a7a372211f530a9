"""Scale-out benchmark: the data-parallel SUM and few-shot (bi-level, exact hypergradient) steps
and the sharded image encoder on 1, 2 and 4 simulated CPU devices (docs/scale.md §6).

    python -m bench scale [--devices 1 2 4] [--model tiny] [--size 256] [--images 4]
        [--masks 8] [--iterations 5]

Each device count runs in its own subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count
=N`, on the same global batch (SUM: `--images` images x `--masks` masks, few-shot: `--images` D1 and
`--images` D2 images, split over the devices), and reports seconds per step and images per second
for the steps and for the encoder (one image per
device per call). Simulated devices share this machine's cores: on 2 cores the numbers show the
overhead of the sharded program (partitioning, the all-reduce), not a speed-up; real speed-ups
need real devices (GPUs, a TPU slice) or several hosts.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from bench.report import Row, load_snapshot, machine_state, print_report


def fewshot_step_s(args, mesh) -> tuple[float, float]:
    """(median seconds per call, first call's seconds) of the few-shot step on `--images`
    D1 and D2 images, on `mesh` (None: one device)."""
    import jax
    import numpy as np

    from amsam_jax.build_sam import SamConfig, build_sam
    from amsam_jax.fewshot.blo import StepConfig, TrainingModel, build_step, split_trainable
    from amsam_jax.fewshot.config import FewShotConfig
    from amsam_jax.fewshot.lora import apply_lora, mark_trainable
    from amsam_jax.fewshot.trainer import jit_steps, schedules
    from amsam_jax.training import mesh as meshlib
    from amsam_jax.training.prompt_decoder import PromptDecoder

    cfg = SamConfig.preset(args.model, image_size=args.size, num_multimask_outputs=1)
    sam = build_sam(cfg, seed=0)
    apply_lora(sam, rank=4, seed=1)
    mark_trainable(sam)
    model = split_trainable(TrainingModel(PromptDecoder(sam), None))
    lower_lr, upper_lr, b1 = schedules(FewShotConfig(), 1000)
    raw, lower_tx, upper_tx = build_step(model.graphdef, StepConfig(), lower_lr, upper_lr, b1)
    step = jit_steps(raw, mesh)[0]
    rng = np.random.default_rng(1)
    g, low = cfg.grid_size, 4 * cfg.grid_size
    batches = [
        {
            "embedding": rng.standard_normal((args.images, g, g, cfg.prompt_embed_dim)),
            "label": (rng.random((args.images, low, low)) < 0.3).astype(np.int32),
            "box": np.tile(np.float32([8, 8, args.size - 8, args.size - 8]), (args.images, 1)),
        }
        for _ in range(2)
    ]
    batches = [{k: v.astype(np.float32) if k == "embedding" else v for k, v in b.items()}
               for b in batches]  # fmt: skip
    state = {"lower": model.lower, "prompt": model.prompt, "step": np.int32(0),
             "lower_opt": lower_tx.init(model.lower),
             "prompt_opt": upper_tx.init(model.prompt)}  # fmt: skip
    frozen = model.frozen
    if mesh is not None:
        state, frozen = meshlib.replicate((state, frozen), mesh)
        batches = meshlib.shard_batch(batches, mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, *batches)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, *batches)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), first


def worker(args) -> dict:
    import jax
    import numpy as np

    from amsam_jax.build_sam import SamConfig, build_sam
    from amsam_jax.sum.config import SumTrain
    from amsam_jax.sum.data import Entry, Shapes, make_batch
    from amsam_jax.sum.step import SumStepConfig, make_optimizers, make_sum_step, split_sum_model
    from amsam_jax.training import mesh as meshlib
    from amsam_jax.training.embedder import Embedder

    n = jax.device_count()
    mesh = meshlib.make_mesh(n)
    cfg = SamConfig.preset(args.model, image_size=args.size)
    sam = build_sam(cfg, seed=0)
    t = split_sum_model(sam)
    params_tx, task_tx = make_optimizers(SumTrain(), 1000)
    scfg = SumStepConfig(size=args.size, num_point_rounds=2, num_mask_only_rounds=1)
    step = make_sum_step(t.graphdef, scfg, params_tx, task_tx, mesh if n > 1 else None)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: args.size, : args.size]
    entries = []
    for i in range(args.images):
        r = np.hypot(yy - args.size / 2, xx - args.size / 2 - 4 * i)
        prob = np.stack([255 / (1 + np.exp((r - 10 - 6 * j) / 3)) for j in range(args.masks)])
        image = np.zeros((args.size, args.size, 3), np.uint8)
        entries.append(Entry(f"b{i}", image, prob.round().astype(np.uint8), 0, None, None, None))
    emb = rng.standard_normal((args.images, cfg.grid_size, cfg.grid_size, cfg.prompt_embed_dim))
    low = 4 * cfg.grid_size
    batch = make_batch(entries, emb.astype(np.float32), Shapes(args.images, args.masks,
                       args.size, low), rng)  # fmt: skip
    state = {"params": t.params, "task": t.task, "params_opt": params_tx.init(t.params),
             "task_opt": task_tx.init(t.task), "step": np.int32(0)}  # fmt: skip
    frozen = t.frozen
    if n > 1:
        state, frozen = meshlib.replicate((state, frozen), mesh)
        batch = meshlib.shard_batch(batch, mesh, replicate_keys=("embedding",))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, batch, key, False)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, batch, key, False)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    fewshot_s, fewshot_first_s = fewshot_step_s(args, mesh if n > 1 else None)
    embedder = Embedder(sam.image_encoder, None)
    images = rng.standard_normal((2 * n, args.size, args.size, 3)).astype(np.float32)
    embedder.embed(images, "bench")  # compile
    t0 = time.perf_counter()
    for _ in range(args.iterations):
        embedder.embed(images, "bench")
    encode_s = (time.perf_counter() - t0) / args.iterations
    return {
        "devices": n,
        "step_s": step_s,
        "step_images_per_s": args.images / step_s,
        "step_first_call_s": compile_s,
        "fewshot_step_s": fewshot_s,
        "fewshot_images_per_s": 2 * args.images / fewshot_s,
        "fewshot_first_call_s": fewshot_first_s,
        "encode_images_per_s": len(images) / encode_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    before = load_snapshot()
    results = []
    for n in args.devices:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
               "JAX_PLATFORMS": "cpu"}  # fmt: skip
        cmd = [sys.executable, "-m", "bench.scale", "--worker", "--model", args.model, "--size",
               str(args.size), "--images", str(args.images), "--masks", str(args.masks),
               "--iterations", str(args.iterations)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one = results[0]
    out = {
        "bench": "scale",
        "model": args.model,
        "size": args.size,
        "global_batch": {"images": args.images, "masks_per_image": args.masks},
        "results": results,
        "machine": machine_state(before),
        "note": "simulated devices share the machine's cores: overhead, not speed-up",
    }
    print(json.dumps(out, indent=2))
    rows = []
    for r in results:
        # `reference` is the 1-device run: the speed-up column is 1-device time / N-device time.
        rows.append(Row(f"SUM step, {r['devices']} devices", r["step_s"], one["step_s"]))
        rows.append(Row(f"  images/s, {r['devices']} devices", r["step_images_per_s"],
                        unit="img/s"))  # fmt: skip
        rows.append(Row(f"few-shot step, {r['devices']} devices", r["fewshot_step_s"],
                        one["fewshot_step_s"]))  # fmt: skip
        rows.append(Row(f"encoder images/s, {r['devices']} devices", r["encode_images_per_s"],
                        unit="img/s"))  # fmt: skip
    print_report(f"scale-out ({args.model} @ {args.size}; reference = 1 device)", rows, before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
