"""Automatic-mask-generator benchmark: ours vs the official SamAutomaticMaskGenerator.

    python -m bench amg [--points-per-side 32] [--image-size 1024] [--model vit_b]
        [--repeats 1] [--pred-iou-thresh 0.88] [--stability-score-thresh 0.95]

Both run the same random weights (the official model's PyTorch-default init, converted with
weights_conversion) on the same synthetic image whose long side is `--image-size`, with the
official AMG defaults. Each framework runs in its own subprocess, so each peak RSS is its own;
torch is imported only in the torch worker. Our first `generate` includes the XLA compiles: it is
reported as `first_call_s`, and `compile_s` = first call − median of the timed repeats.

Both sides report a per-stage breakdown (`stages`): ours from `SamAutomaticMaskGenerator.timings`
(encoder, decoder batches, upsampling + stability/boxes of the candidates, host transfer, the
kept masks at full size, NMS and records; `compile_s` per stage = first call − timed call), the
official one by timing its `set_image`, mask decoder and `postprocess_masks` calls (the rest:
filtering, RLE, NMS). The readable table (bench/report.py) follows the JSON.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from bench.encoder import peak_rss_gib, time_calls
from bench.report import Row, load_snapshot, machine_state, print_report

# Ours (SamAutomaticMaskGenerator.timings) next to the official stage it corresponds to.
STAGES = (
    ("encoder", "encoder_s", "encoder_s"),
    ("decoder batches", "decoder_s", "decoder_s"),
    ("upsample + stability/boxes", "upsample_score_s", "postprocess_masks_s"),
    ("host transfer + filters", "host_transfer_s", None),
    ("kept masks at full size", "final_masks_s", None),
    ("NMS, RLE, records", "postprocess_s", "rest_s"),
)


def _timed(stages: dict, key: str, fn):
    """`fn` wrapped to add its wall seconds to `stages[key]`."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[key] += time.perf_counter() - start

    return wrapper


def make_image(image_size: int):
    """A deterministic uint8 (3/4 · S, S, 3) image with shapes, gradients and noise."""
    import numpy as np

    h, w = image_size * 3 // 4, image_size
    yy, xx = np.mgrid[:h, :w] / image_size
    img = np.stack([255 * xx, 255 * yy, 128 + 100 * np.sin(20 * xx * yy)], axis=-1)
    img[((xx - 0.3) ** 2 + (yy - 0.35) ** 2) < 0.02] = [230, 40, 40]
    img[int(0.4 * h) : int(0.7 * h), int(0.55 * w) : int(0.9 * w)] = [40, 200, 60]
    img = img + np.random.default_rng(0).normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _official_arch(cfg) -> dict:
    """segment_anything/build_sam.py::_build_sam arguments of `cfg`."""
    return {
        "encoder_embed_dim": cfg.encoder_embed_dim,
        "encoder_depth": cfg.encoder_depth,
        "encoder_num_heads": cfg.encoder_num_heads,
        "encoder_global_attn_indexes": list(cfg.encoder_global_attn_indexes),
    }


def _settings(args: argparse.Namespace) -> dict:
    """The generator settings both sides get (the official defaults unless overridden)."""
    return {
        "points_per_side": args.points_per_side,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
    }


def run_torch(args: argparse.Namespace) -> dict:
    """Builds the official SAM (PyTorch-default init), saves its weights, times its AMG."""
    import numpy as np
    import torch
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.build_sam import _build_sam

    arch = json.loads(args.arch)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    sam = _build_sam(**arch, checkpoint=None).eval()
    build_s = time.perf_counter() - start
    np.savez(args.weights, **{k: v.numpy() for k, v in sam.state_dict().items()})
    generator = SamAutomaticMaskGenerator(sam, **_settings(args))
    stages = dict.fromkeys(("encoder_s", "decoder_s", "postprocess_masks_s"), 0.0)
    predictor = generator.predictor
    predictor.set_image = _timed(stages, "encoder_s", predictor.set_image)
    sam.mask_decoder.forward = _timed(stages, "decoder_s", sam.mask_decoder.forward)
    sam.postprocess_masks = _timed(stages, "postprocess_masks_s", sam.postprocess_masks)
    image = make_image(args.image_size)
    n_masks = []

    def call():
        for key in stages:
            stages[key] = 0.0
        start = time.perf_counter()
        n_masks.append(len(generator.generate(image)))
        stages["total_s"] = time.perf_counter() - start

    timing = time_calls(call, args.repeats)
    stages["rest_s"] = stages["total_s"] - sum(
        stages[k] for k in ("encoder_s", "decoder_s", "postprocess_masks_s")
    )
    return {
        **timing,
        "stages": stages,
        "build_s": build_s,
        "n_masks": n_masks[-1],
        "peak_rss_gib": peak_rss_gib(),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


def run_jax(args: argparse.Namespace) -> dict:
    """Loads the torch worker's weights into amsam_jax, times our AMG."""
    import jax
    import numpy as np
    from flax import nnx

    from amsam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
    from amsam_jax.build_sam import SamConfig, abstract_sam
    from amsam_jax.conversion.convert_sam import convert_state_dict

    cfg = SamConfig.preset(args.model)
    start = time.perf_counter()
    with np.load(args.weights) as f:
        sd = {k: f[k].astype(np.float32) for k in f.files}
    nested, _ = convert_state_dict(sd, cfg)
    del sd
    graphdef, state = nnx.split(abstract_sam(cfg))
    nnx.replace_by_pure_dict(state, nested)
    model = nnx.merge(graphdef, state)
    build_s = time.perf_counter() - start
    generator = SamAutomaticMaskGenerator(model, **_settings(args))
    image = make_image(args.image_size)
    start = time.perf_counter()
    generator.generate(image)
    first_call_s = time.perf_counter() - start
    first_stages = dict(generator.timings)
    n_masks = []

    def call():
        n_masks.append(len(generator.generate(image)))

    timing = time_calls(call, args.repeats)
    stages = dict(generator.timings)  # the last timed call
    return {
        **timing,
        "stages": stages,
        "stage_compile_s": {k: max(0.0, first_stages[k] - stages[k]) for k in stages},
        "first_call_s": first_call_s,
        "compile_s": max(0.0, first_call_s - timing["median_s"]),
        "build_s": build_s,
        "n_masks": n_masks[-1],
        "peak_rss_gib": peak_rss_gib(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }


def _worker(kind: str, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.amg", *argv, "--worker", kind]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    points_per_side: int = 32,
    image_size: int = 1024,
    model: str = "vit_b",
    repeats: int = 1,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
) -> dict:
    """Seconds per image of our AMG and the official one on the same weights and image.

    Args:
        points_per_side: AMG grid (the official default 32 gives 1024 prompts).
        image_size: long side of the synthetic image (the model input stays the model's size).
        model: "vit_b", "vit_l", "vit_h" (official sizes; "tiny" is not an official build).
        repeats: timed `generate` calls per framework (after our compile call).
        pred_iou_thresh, stability_score_thresh: the generator's filters. Random weights keep
            no candidate at the defaults (every mask is dropped by the IoU filter, so nothing is
            upsampled on our side); 0 and 0 send every candidate through the upsampling.

    Returns:
        the results dict (also printed as JSON).
    """
    from amsam_jax.build_sam import SamConfig

    before = load_snapshot()
    cfg = SamConfig.preset(model)
    with tempfile.TemporaryDirectory(prefix="amsam_bench_amg_") as tmp:
        weights = os.path.join(tmp, "weights.npz")
        argv = [
            "--points-per-side", str(points_per_side), "--image-size", str(image_size),
            "--model", model, "--repeats", str(repeats), "--weights", weights,
            "--pred-iou-thresh", str(pred_iou_thresh),
            "--stability-score-thresh", str(stability_score_thresh),
            "--arch", json.dumps(_official_arch(cfg)),
        ]  # fmt: skip
        result = {
            "benchmark": "amg",
            "model": model,
            "image_hw": list(make_image(image_size).shape[:2]),
            "points_per_side": points_per_side,
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "repeats": repeats,
            "weights": "random (PyTorch-default init), identical in both",
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_1min_before": os.getloadavg()[0],
            },
        }
        result["torch"] = _worker("torch", argv)  # writes the weights the JAX worker loads
        result["jax"] = _worker("jax", argv)
    result["torch_over_jax"] = result["torch"]["median_s"] / result["jax"]["median_s"]
    result["machine"]["loadavg_1min_after"] = os.getloadavg()[0]
    result["machine_state"] = machine_state(before)
    print(json.dumps(result, indent=2))
    ours, ref = result["jax"], result["torch"]
    rows = [
        Row(name, ours["stages"][key], None if ref_key is None else ref["stages"][ref_key])
        for name, key, ref_key in STAGES
    ]
    rows += [
        Row("compile (first call - timed)", ours["compile_s"]),
        Row(
            "generate, per image",
            ours["median_s"],
            ref["median_s"],
            int(ours["peak_rss_gib"] * 2**30),
            int(ref["peak_rss_gib"] * 2**30),
        ),
    ]
    h, w = result["image_hw"]
    print_report(f"AMG {model} {points_per_side}x{points_per_side} points @ {h}x{w}", rows, before)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.amg",
        description="AMG seconds per image and peak RSS: amsam_jax vs official PyTorch.",
    )
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps((run_torch if args.worker == "torch" else run_jax)(args)))
        return 0
    run(
        args.points_per_side,
        args.image_size,
        args.model,
        args.repeats,
        args.pred_iou_thresh,
        args.stability_score_thresh,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
