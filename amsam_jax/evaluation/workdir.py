"""Evaluate a few-shot run's checkpoint on a data split: `evaluate_workdir` (the CLI's core).

The pure core is `evaluation.fewshot.evaluate_fewshot`; this module gathers its inputs from a
workdir: the run's config, SAM and trainable state (`fewshot.trainer.load_run_state`), the split's
embeddings through the run's embedder and cache, and the run's box prompts.
"""

import json
import os
from pathlib import Path

from amsam_jax.boxes.box_file import load_box_file
from amsam_jax.data.folder import list_samples
from amsam_jax.evaluation import EvaluateError
from amsam_jax.evaluation.fewshot import evaluate_fewshot, predict_masks
from amsam_jax.evaluation.plots import write_samples
from amsam_jax.fewshot.config import FewShotConfig
from amsam_jax.fewshot.preprocessing import assign_boxes, load_split
from amsam_jax.fewshot.trainer import CHECKPOINT_KINDS, data_dir_of, detect_into, load_run_state
from amsam_jax.training.run import log, read_run_config
from amsam_jax.utils.image import list_images
from amsam_jax.utils.io import atomic_outputs, check_output_file, check_output_folder

OVERLAY_DIR = "eval_{split}"
RESULT_FILE = "eval_{split}.json"
BOX_FILE = "eval_{split}_boxes.json"


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
    resolution, as the run's `samples/`), together: both or neither (an overlay folder of an
    earlier evaluation is replaced as a whole).

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
        Scores are ×100, docs/fewshot.md §4.4 (64×64 argmax vs the 64×64 label;
        `dice_original` at the original mask resolution).

    Raises:
        AmsamError: one-line problems with the inputs (EvaluateError, TrainError, DataError, ...).
    """
    workdir = Path(workdir).absolute()
    if not workdir.exists():
        raise EvaluateError(f"{workdir}: no such workdir")
    if not workdir.is_dir():
        raise EvaluateError(workdir, "not a folder (expected a training workdir)")
    if checkpoint not in CHECKPOINT_KINDS:
        raise EvaluateError(f"checkpoint {checkpoint!r}: expected one of {CHECKPOINT_KINDS}")
    if overlays is not None and overlays < 0:
        raise EvaluateError("overlays", f"must be >= 0 (0: none), got {overlays}")
    result_path = check_output_file(workdir / RESULT_FILE.format(split=split))
    overlay_dir = workdir / OVERLAY_DIR.format(split=split)
    if overlays != 0:
        check_output_folder(overlay_dir)
    cfg = FewShotConfig.from_dict(read_run_config(workdir))
    if not (workdir / "ckpt" / checkpoint).is_dir():
        raise EvaluateError(f"{workdir / 'ckpt' / checkpoint}: no checkpoint")
    data_dir = Path(data_dir if data_dir is not None else data_dir_of(cfg)).absolute()
    if not data_dir.is_dir():
        raise EvaluateError(f"{data_dir}: no such data folder")
    # Listing first: a bad split fails before SAM is loaded.
    samples = list_samples(data_dir, split)

    setup, state, meta = load_run_state(workdir, checkpoint)  # its metadata checked there
    test = load_split(samples, setup.preprocessing)
    test.embedding = setup.embedder.embed(test.image, setup.preprocessing.key())
    if not quiet:
        stats = setup.embedder.cache.stats
        log(f"embeddings: {stats.hits} cached, {stats.misses} computed")
    box_note = "box prompts: off"
    box_path = _box_file(setup.cfg, workdir, data_dir, split)
    if box_path is not None:
        assign_boxes(
            test, load_box_file(box_path), str(box_path), setup.preprocessing.size,
            setup.cfg.boxes.max_per_image,
        )  # fmt: skip
        box_note = f"box prompts: {box_path}"

    data = test.eval_data()
    result = evaluate_fewshot(setup.graphdef, setup.step_cfg, state, setup.frozen, data)
    result.update(
        checkpoint=checkpoint,
        checkpoint_step=meta["step"],
        split=split,
        data_dir=str(data_dir),
        weights=setup.weights,
        boxes=box_note,
        workdir=str(workdir),
    )
    count = len(test.stems) if overlays is None else overlays
    preds = None
    if count > 0:
        preds = predict_masks(setup.graphdef, setup.step_cfg, state, setup.frozen, data)
    with atomic_outputs() as outputs:
        if preds is not None:
            write_samples(test, preds, outputs.folder(overlay_dir), min(count, len(test.stems)))
        outputs.file(result_path, json.dumps(result, indent=2) + "\n")
    return result


def _box_file(cfg: FewShotConfig, workdir: Path, data_dir: Path, split: str) -> Path | None:
    """The box file holding the evaluated images' boxes, or None when the run used no boxes.

    A run with `boxes.file` reuses that file (an image missing from it is an error); a run with
    `boxes.detector` detects the evaluated images with the run's settings into
    `workdir/eval_<split>_boxes.json` (entries are reused by image hash on the next call).
    """
    if cfg.boxes.detector:
        paths = list_images(data_dir / split / "images")
        return detect_into(cfg, paths, workdir / BOX_FILE.format(split=split))
    if cfg.boxes.file:
        return Path(cfg.boxes.file)
    return None
