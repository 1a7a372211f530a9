"""Exported ONNX models on ONNX Runtime (CPU) beside the JAX model they come from.

    python -m bench export --model-type vit_b [--image-size 1024] [--repeats 3]
    python -m bench export --model-type tiny            # a seconds-long check of the pipeline

A random SAM of the chosen size is written as a converted SAM directory and exported with
`python -m weights_conversion export-onnx` (the official segment_anything modules traced by
torch.onnx). Timed, batch 1: the image encoder (jitted `image_encoder` vs `image_encoder.onnx`)
and one point prompt through the decoder (`SamPredictor.predict` vs `decoder.onnx` fed as
segment-anything's ONNX notebook feeds it; both upscale the logits to the image). The two also
agree to the export tests' tolerance here (`max_rel_diff`). Prints one JSON object, then the
table ("ours" = JAX, "reference" = ONNX Runtime).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
from flax import nnx

from amsam_jax.build_sam import MODEL_TYPES, SamConfig, build_sam
from amsam_jax.checkpoint import save_sam
from amsam_jax.predictor import SamPredictor
from bench.report import Row, load_snapshot, machine_state, print_report
from weights_conversion.export_onnx import DECODER, ENCODER, export_onnx


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench export",
        description="ONNX Runtime (CPU) latency of the exported encoder and decoder beside JAX.",
    )
    parser.add_argument("--model-type", default="vit_b", choices=[m for m in MODEL_TYPES
                        if m in ("vit_b", "vit_l", "vit_h", "tiny")])  # fmt: skip
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def time_calls(fn, repeats: int) -> dict:
    """Wall seconds per call (median/min/max) and process CPU seconds per call (all threads)."""
    fn()  # warm-up: compilation (JAX), session initialisation (ONNX Runtime)
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "median_cpu_s": statistics.median(cpu)}  # fmt: skip


def rel_diff(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "float32")
    before = load_snapshot()
    kw = {} if args.image_size is None else {"image_size": args.image_size}
    cfg = SamConfig.preset(args.model_type, **kw)
    sam = build_sam(cfg, seed=args.seed)
    s, g = cfg.image_size, cfg.grid_size
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        save_sam(sam, cfg, Path(tmp) / "sam", {"file": f"random seed {args.seed}"})
        start = time.perf_counter()
        export_onnx(Path(tmp) / "sam", Path(tmp) / "onnx")
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        encoder = ort.InferenceSession(str(Path(tmp) / "onnx" / ENCODER), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        decoder = ort.InferenceSession(str(Path(tmp) / "onnx" / DECODER), options,
                                       providers=["CPUExecutionProvider"])  # fmt: skip

    x = np.random.default_rng(args.seed).standard_normal((1, s, s, 3)).astype(np.float32)
    graphdef, state = nnx.split(sam.image_encoder)
    encode = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    jax_enc = time_calls(lambda: jax.block_until_ready(encode(state, jnp.asarray(x))), args.repeats)
    ort_enc = time_calls(lambda: encoder.run(None, {"image": x_nchw}), args.repeats)
    enc_diff = rel_diff(encoder.run(None, {"image": x_nchw})[0].transpose(0, 2, 3, 1),
                        encode(state, jnp.asarray(x)))  # fmt: skip

    h, w = (3 * s) // 4, s  # a landscape image: the crop to the unpadded size matters
    image = (np.random.default_rng(args.seed + 1).random((h, w, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    point = np.array([[0.4 * w, 0.6 * h]])
    coords = predictor.transform_coords(np.concatenate([point, [[0.0, 0.0]]]))
    feed = {
        "image_embeddings": np.ascontiguousarray(
            np.asarray(predictor.get_image_embedding()).transpose(0, 3, 1, 2)
        ),
        "point_coords": coords[None].astype(np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 4 * g, 4 * g), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([h, w], np.float32),
    }

    def jax_decode():
        return predictor.predict(point, np.array([1]), multimask_output=True, return_logits=True)

    jax_dec = time_calls(jax_decode, args.repeats)
    ort_dec = time_calls(lambda: decoder.run(None, feed), args.repeats)
    dec_diff = rel_diff(decoder.run(None, feed)[0][0, 1:], jax_decode()[0])

    result = {
        "model_type": args.model_type,
        "image_size": s,
        "repeats": args.repeats,
        "export_s": export_s,
        "encoder": {"jax": jax_enc, "onnxruntime": ort_enc, "max_rel_diff": enc_diff,
                    "jax_over_ort": jax_enc["median_s"] / ort_enc["median_s"]},
        "decoder_point": {"jax": jax_dec, "onnxruntime": ort_dec, "max_rel_diff": dec_diff,
                          "jax_over_ort": jax_dec["median_s"] / ort_dec["median_s"]},
        "versions": {"jax": jax.__version__, "onnxruntime": ort.__version__},
        "machine": machine_state(before),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    rows = [
        Row("image encoder", jax_enc["median_s"], ort_enc["median_s"]),
        Row("decoder, one point (upscaled)", jax_dec["median_s"], ort_dec["median_s"]),
    ]
    print_report(f"export {args.model_type} @ {s}: JAX (ours) vs ONNX Runtime CPU", rows, before)
    return 0
