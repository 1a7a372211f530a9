"""Runs in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4`:
`python tests/scale/devices_worker.py OUT_DIR` (tests/scale/test_devices.py compares the results).

Writes OUT_DIR/steps.npz (the SUM and few-shot trainable states after a few steps on one device
and on the 4-device mesh, and the final state of a few-shot training run on each),
OUT_DIR/fewshot_error.txt (the few-shot trainer's refusal of a batch that does not divide),
OUT_DIR/cache_1 and OUT_DIR/cache_4 (one embedding cache filled by a 1-device and by a 4-device
`Embedder`), and OUT_DIR/labels (AMG pseudo-labels of a small folder).
"""

import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

from scale_checkpoints import final_leaves  # noqa: E402

from amsam_jax.build_sam import SamConfig, build_sam  # noqa: E402
from amsam_jax.data.synthetic import bundled_synthetic_dir  # noqa: E402
from amsam_jax.fewshot.blo import StepConfig, TrainingModel, make_step, split_trainable  # noqa: E402
from amsam_jax.fewshot.config import FewShotConfig  # noqa: E402
from amsam_jax.fewshot.lora import apply_lora, mark_trainable  # noqa: E402
from amsam_jax.fewshot.recipes import am_sam  # noqa: E402
from amsam_jax.fewshot.trainer import schedules, train  # noqa: E402
from amsam_jax.sum.data import Entry, Shapes, make_batch  # noqa: E402
from amsam_jax.sum.pseudo_labels import label_folder  # noqa: E402
from amsam_jax.sum.recipes import sum_recipe  # noqa: E402
from amsam_jax.sum.step import make_optimizers, make_sum_step, split_sum_model  # noqa: E402
from amsam_jax.sum.trainer import step_config  # noqa: E402
from amsam_jax.training import mesh as meshlib  # noqa: E402
from amsam_jax.training.embedder import Embedder, EmbeddingCache  # noqa: E402
from amsam_jax.training.prompt_decoder import PromptDecoder  # noqa: E402

STEPS = 2
SUM_CFG = SamConfig.tiny()
FEWSHOT_CFG = SamConfig.tiny(num_multimask_outputs=1)


def sum_batches() -> list[dict]:
    """Two images x 4 masks (M = 8) per step, discs of a few radii, task 1."""
    rng = np.random.default_rng(0)
    s, low = SUM_CFG.image_size, 4 * SUM_CFG.grid_size
    out = []
    for _ in range(STEPS):
        entries = []
        for i in range(2):
            h, w = (120, 200) if i % 2 else (200, 150)
            yy, xx = np.mgrid[:h, :w]
            r = np.hypot(yy - h / 2, xx - w / 2)
            prob = np.stack([255 / (1 + np.exp((r - 20 - 8 * j) / 3)) for j in range(3)])
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            prob = prob.round().astype(np.uint8)
            entries.append(Entry(f"img{i}", image, prob, 1, None, None, None))
        emb = rng.standard_normal((2, SUM_CFG.grid_size, SUM_CFG.grid_size, 32)).astype(np.float32)
        out.append(make_batch(entries, emb, Shapes(2, 4, s, low), rng))
    return out


def run_sum(mesh) -> list[np.ndarray]:
    """The smoke recipe's step cut to its first round (a small compile); its sampling, losses and
    optimisers as in training."""
    cfg = sum_recipe("smoke")
    t = split_sum_model(build_sam(SUM_CFG, seed=1))
    params_tx, task_tx = make_optimizers(cfg.train, 2 * cfg.train.steps)
    scfg = dataclasses.replace(step_config(cfg), num_point_rounds=1, num_mask_only_rounds=0)
    step = make_sum_step(t.graphdef, scfg, params_tx, task_tx, mesh)
    state = {
        "params": t.params,
        "task": t.task,
        "params_opt": params_tx.init(t.params),
        "task_opt": task_tx.init(t.task),
        "step": np.int32(0),
    }
    state, frozen = meshlib.replicate((state, t.frozen), mesh)
    for i, batch in enumerate(sum_batches()):
        batch = meshlib.shard_batch(batch, mesh, replicate_keys=("embedding",))
        state, _ = step(state, frozen, batch, jax.random.key(i), False)
    return [np.asarray(x) for x in jax.tree.leaves(meshlib.to_host(state))]


def fewshot_batches(seed: int) -> list[dict]:
    """Batches of 4 images: embedding (4, G, G, C), disc labels (4, 4G, 4G)."""
    rng = np.random.default_rng(seed)
    g, c = FEWSHOT_CFG.grid_size, FEWSHOT_CFG.prompt_embed_dim
    yy, xx = np.mgrid[: 4 * g, : 4 * g]
    out = []
    for _ in range(STEPS):
        cy, cx, r = rng.uniform(16, 48, 4), rng.uniform(16, 48, 4), rng.uniform(8, 20, 4)
        cy, cx, r = cy[:, None, None], cx[:, None, None], r[:, None, None]
        label = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        emb = rng.standard_normal((4, g, g, c)).astype(np.float32)
        out.append({"embedding": emb, "label": label.astype(np.int32)})
    return out


def run_fewshot(mesh) -> list[np.ndarray]:
    """`fewshot.blo.make_step`'s jitted step, called with sharded batches and replicated state."""
    sam = build_sam(FEWSHOT_CFG, seed=0)
    apply_lora(sam, rank=4, seed=1)
    mark_trainable(sam)
    model = split_trainable(TrainingModel(PromptDecoder(sam), None))
    lower_lr, upper_lr, b1 = schedules(FewShotConfig(), 200)
    step, lower_tx, upper_tx = make_step(model.graphdef, StepConfig(), lower_lr, upper_lr, b1)
    state = {
        "lower": model.lower,
        "prompt": model.prompt,
        "lower_opt": lower_tx.init(model.lower),
        "prompt_opt": upper_tx.init(model.prompt),
        "step": np.int32(0),
    }
    state, frozen = meshlib.replicate((state, model.frozen), mesh)
    for b1_, b2_ in zip(fewshot_batches(0), fewshot_batches(1), strict=True):
        b1_, b2_ = meshlib.shard_batch(b1_, mesh), meshlib.shard_batch(b2_, mesh)
        state, _ = step(state, frozen, b1_, b2_)
    return [np.asarray(x) for x in jax.tree.leaves(meshlib.to_host(state))]


def fewshot_run(out: Path, devices: int, batch_size: int = 4) -> Path:
    """The am_sam smoke recipe on 8 shots (D1 and D2 of 4 images) for 2 epochs of one step."""
    cfg = am_sam("smoke")
    t = dataclasses.replace(
        cfg.train, epochs=2, batch_size=batch_size, checkpoint_every_s=0, num_samples=0
    )
    cfg = dataclasses.replace(
        cfg, train=t, data=dataclasses.replace(cfg.data, shots=8),
        mesh=dataclasses.replace(cfg.mesh, data=devices),
    )  # fmt: skip
    workdir = out / f"fewshot_run_{devices}_{batch_size}"
    train(cfg, workdir)
    return workdir


def fill_cache(folder: Path, devices: int) -> None:
    sam = build_sam(SUM_CFG, seed=2)
    embedder = Embedder(sam.image_encoder, "tiny-seed-2", EmbeddingCache(folder), devices=devices)
    images = np.random.default_rng(5).standard_normal((6, 256, 256, 3)).astype(np.float32)
    embedder.embed(images, "random-6")


def main(out: Path) -> None:
    assert jax.device_count() == 4, jax.devices()
    os.environ["AMSAM_CACHE"] = str(out / "embeddings")  # the trainer runs' embedding cache
    arrays = {}
    for name, run in (("sum", run_sum), ("fewshot", run_fewshot)):
        for n in (1, 4):
            t0 = time.perf_counter()
            for i, leaf in enumerate(run(meshlib.make_mesh(n))):
                arrays[f"{name}_{n}_{i}"] = leaf
            print(f"{name} on {n} devices: {time.perf_counter() - t0:.1f} s", flush=True)
    for n in (1, 4):
        t0 = time.perf_counter()
        for i, leaf in enumerate(final_leaves(fewshot_run(out, n))):
            arrays[f"trainer_{n}_{i}"] = leaf
        print(f"few-shot trainer on {n} devices: {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        fewshot_run(out, 4, batch_size=2)
    except meshlib.MeshError as e:
        (out / "fewshot_error.txt").write_text(str(e))
    np.savez(out / "steps.npz", **arrays)
    fill_cache(out / "cache_1", 1)
    fill_cache(out / "cache_4", 4)
    images = bundled_synthetic_dir() / "test" / "images"
    label_folder(build_sam(SUM_CFG, seed=0), images, out / "labels", 4, say=lambda m: None,
                 pred_iou_thresh=0.0, stability_score_thresh=0.0)  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
