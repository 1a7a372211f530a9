"""Evaluate a training run's checkpoint on a data split: `evaluate_workdir` (used by the CLI).

The pure core is `amsam_jax.evaluation.evaluate`; this module only gathers its inputs from a
workdir: the run's config and SAM (`trainer.load_run_state`), the split's embeddings through the
shared `EmbeddingCache` (same weights key as training), and the run's box prompts. It lives apart
from `amsam_jax/evaluate.py` (the CLI) so that `amsam_jax/__init__.py` can export
`evaluate_workdir` without importing the module that `python -m amsam_jax.evaluate` runs.
"""

import json
import os
from pathlib import Path

import numpy as np

OVERLAY_DIR = "eval_{split}"
RESULT_FILE = "eval_{split}.json"
BOX_FILE = "eval_{split}_boxes.json"


class EvaluateError(Exception):
    """A workdir, checkpoint or data folder that cannot be evaluated; one line."""


def evaluate_workdir(
    workdir: str | os.PathLike,
    checkpoint: str = "best",
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    overlays: int | None = None,
    quiet: bool = True,
) -> dict:
    """Evaluates checkpoint `checkpoint` of the run in `workdir` on `data_dir/split`.

    Writes `workdir/eval_<split>.json` (the returned dict) and overlays
    `workdir/eval_<split>/<stem>.png` (image | ground truth | prediction at the model input
    resolution, as the run's `samples/`).

    Args:
        workdir: a training workdir (holds config.json and ckpt/).
        checkpoint: "best", "final" or "latest".
        data_dir: folder-format data; None: the run's `data.dir` (the bundled synthetic set if the
            run used it).
        split: split folder under `data_dir`.
        overlays: how many overlays to write (None: one per image, 0: none).
        quiet: do not log the setup (weights, data, cache) to stderr.

    Returns:
        {"dice", "iou", "dice_original", "per_image": [{stem, dice, iou, dice_original}],
        "checkpoint", "checkpoint_step", "split", "data_dir", "weights", "boxes", "workdir"}.
        Scores are ×100, spec §4.4 (64×64 argmax vs the 64×64 label; `dice_original` at the
        original mask resolution).

    Raises:
        EvaluateError, TrainError, DataError, BoxError: one-line problems with the inputs.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from amsam_jax import data as data_lib
    from amsam_jax import reporting
    from amsam_jax.cache import EmbeddingCache
    from amsam_jax.configs import TrainConfig
    from amsam_jax.evaluation import evaluate, predict_masks
    from amsam_jax.trainer import CHECKPOINT_KINDS, load_run_state, load_split, log, resolve_sam

    workdir = Path(workdir).absolute()
    if not workdir.is_dir():
        raise EvaluateError(f"{workdir}: no such workdir")
    if checkpoint not in CHECKPOINT_KINDS:
        raise EvaluateError(f"checkpoint {checkpoint!r}: expected one of {CHECKPOINT_KINDS}")
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise EvaluateError(f"{workdir}: no config.json (not a training workdir)")
    if not (workdir / "ckpt" / checkpoint).is_dir():
        raise EvaluateError(f"{workdir / 'ckpt' / checkpoint}: no checkpoint")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    if data_dir is None:
        data_dir = Path(cfg.data.dir) if cfg.data.dir else data_lib.bundled_synthetic_dir()
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise EvaluateError(f"{data_dir}: no such data folder")
    # Listing first: a bad split fails before SAM is loaded.
    samples = data_lib.list_samples(data_dir, split)

    setup, state, meta = load_run_state(workdir, checkpoint)
    # The cache key of the run's encoder weights (build_setup does not keep it).
    _, _, weights_key, _ = resolve_sam(setup.cfg)
    prep = data_lib.Preprocessing(
        size=setup.sam_cfg.image_size, sam_pixel_norm=setup.cfg.data.sam_pixel_norm
    )
    test = load_split(samples, prep)
    enc_graphdef, enc_state = nnx.split(setup.sam.image_encoder)
    encoder = jax.jit(lambda s, x: nnx.merge(enc_graphdef, s)(x))
    cache = EmbeddingCache()
    test.embedding = cache.get_or_compute(
        test.image,
        lambda x: np.asarray(encoder(enc_state, jnp.asarray(x))),
        weights_key,
        prep.key(),
    )
    if not quiet:
        log(f"embeddings: {cache.stats.hits} cached, {cache.stats.misses} computed")
    box_note = "box prompts: off"
    box_path = _box_file(setup.cfg, workdir, data_dir, split)
    if box_path is not None:
        from amsam_jax.boxes import load_box_file
        from amsam_jax.trainer import boxes_for

        test.boxes = boxes_for(test, load_box_file(box_path), str(box_path), prep.size)
        box_note = f"box prompts: {box_path}"

    data = test.eval_data()
    result = evaluate(setup.graphdef, setup.step_cfg, state, setup.frozen, data)
    result.update(
        checkpoint=checkpoint,
        checkpoint_step=int(meta["step"]),
        split=split,
        data_dir=str(data_dir),
        weights=setup.weights,
        boxes=box_note,
        workdir=str(workdir),
    )
    count = len(test.stems) if overlays is None else overlays
    if count > 0:
        preds = predict_masks(setup.graphdef, setup.step_cfg, state, setup.frozen, data)
        reporting.write_samples(
            test, preds, workdir / OVERLAY_DIR.format(split=split), min(count, len(test.stems))
        )
    out = workdir / RESULT_FILE.format(split=split)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    return result


def _box_file(cfg, workdir: Path, data_dir: Path, split: str) -> Path | None:
    """The box file holding the evaluated images' boxes, or None when the run used no boxes.

    A run with `boxes.file` reuses that file (an image missing from it is an error); a run with
    `boxes.detector` detects the evaluated images with the run's settings into
    `workdir/eval_<split>_boxes.json` (entries are reused by image hash on the next call).
    """
    if cfg.boxes.detector:
        from amsam_jax.boxes import compute_box_file
        from amsam_jax.data import list_image_files

        out = workdir / BOX_FILE.format(split=split)
        compute_box_file(
            cfg.boxes.detector,
            list_image_files(data_dir / split / "images"),
            out,
            conf=cfg.boxes.conf,
            iou=cfg.boxes.iou,
            classes=list(cfg.boxes.classes) if cfg.boxes.classes else None,
            fallback=cfg.boxes.fallback,
        )
        return out
    if cfg.boxes.file:
        return Path(cfg.boxes.file)
    return None
