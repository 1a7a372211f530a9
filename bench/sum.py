"""SUM benchmark: seconds per interactive training step and automatic-mask-generator seconds
per image (ours and the official PyTorch AMG on the same random weights).

    python -m bench sum [--iterations 3] [--masks 16] [--points-per-side 32]
        [--skip-amg] [--skip-step]

Step: ViT-B prompt encoder + mask decoder at 1024 px with a cached (random) image embedding,
8 point rounds + 2 mask-only rounds, one image with `--masks` masks (U from random refined
maps), for both round-1 prompt kinds. The step runs in this process (peak RSS is the step's);
the AMG comparison runs each framework in its own subprocess (`bench.amg`).
"""

import argparse
import json
import os
import platform
import sys
import time

from bench.encoder import peak_rss_gib, time_calls


def step_bench(iterations: int, masks: int, model: str = "vit_b", size: int = 1024) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from amsam_jax.build_sam import SamConfig, build_sam
    from amsam_jax.sum.config import SumTrain
    from amsam_jax.sum.data import Entry, Shapes, make_batch
    from amsam_jax.sum.step import SumStepConfig, make_optimizers, make_sum_step, split_sum_model

    cfg = SamConfig.preset(model, image_size=size)
    sam = build_sam(cfg, seed=0)
    t = split_sum_model(sam)
    train = SumTrain()
    params_tx, task_tx = make_optimizers(train, 1000)
    scfg = SumStepConfig(size=size, num_point_rounds=train.num_point_rounds,
                         num_mask_only_rounds=train.num_mask_only_rounds)  # fmt: skip
    step = make_sum_step(t.graphdef, scfg, params_tx, task_tx)
    rng = np.random.default_rng(0)
    h, w = 768, 1024
    yy, xx = np.mgrid[:h, :w]
    prob = np.stack(
        [
            255 / (1 + np.exp((np.hypot(yy - rng.uniform(100, 600), xx - rng.uniform(100, 900))
                               - rng.uniform(40, 200)) / 4))
            for _ in range(masks)
        ]
    ).round().astype(np.uint8)  # fmt: skip
    low = 4 * cfg.grid_size
    entry = Entry(
        "bench",
        np.zeros((h, w, 3), np.uint8),
        prob,
        0,
        rng.integers(0, 256, (masks, low, low), dtype=np.uint8),
        np.ones(masks, bool),
    )
    emb = rng.standard_normal((1, cfg.grid_size, cfg.grid_size, cfg.prompt_embed_dim))
    batch = make_batch([entry], emb.astype(np.float32), Shapes(1, masks, size, low), rng)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    state = {
        "params": t.params, "task": t.task, "params_opt": params_tx.init(t.params),
        "task_opt": task_tx.init(t.task), "step": jnp.asarray(0, jnp.int32),
    }  # fmt: skip
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    out = {}
    for first_is_box in (False, True):
        name = "box_first" if first_is_box else "point_first"
        holder = {"state": state, "i": 0}

        def call(first_is_box=first_is_box, holder=holder):
            holder["state"], m = step(holder["state"], t.frozen, batch,
                                      jax.random.key(holder["i"]), first_is_box)  # fmt: skip
            holder["i"] += 1
            jax.block_until_ready(m["loss"])

        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        timed = time_calls(call, iterations)
        state = holder["state"]
        out[name] = {"first_call_s": first, "compile_s": first - timed["median_s"], **timed}
    out["peak_rss_gib"] = peak_rss_gib()
    out["setup"] = {"model": model, "size": size, "images": 1, "masks_per_image": masks,
                    "rounds": "8 point + 2 mask-only", "embedding": "cached (random)"}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sum", description=__doc__)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--amg-repeats", type=int, default=1)
    parser.add_argument("--skip-amg", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args(argv)
    result = {
        "benchmark": "sum",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1min_before": os.getloadavg()[0],
        },  # fmt: skip
    }
    if not args.skip_step:
        result["step"] = step_bench(args.iterations, args.masks, args.model)
        print(json.dumps({"step": result["step"]}, indent=2), flush=True)
    if not args.skip_amg:
        from bench import amg

        result["amg"] = amg.run(args.points_per_side, 1024, args.model, args.amg_repeats)
    result["machine"]["loadavg_1min_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
