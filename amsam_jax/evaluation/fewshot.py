"""Few-shot evaluation (docs/fewshot.md §4.4): pure functions of the model, its trainable state
and a dataset of cached embeddings; one jitted call over a chunk of images (each at batch size 1,
as the reference), host accumulation."""

import dataclasses
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.evaluation.metrics import dice_per_class, iou_per_class, upsample_nearest
from amsam_jax.fewshot.blo import StepConfig, forward
from amsam_jax.utils.runtime import decoder_program_options

# Images per jitted call: a set up to this size is one call; a larger one goes in chunks of this
# size, the last padded (each image is its own batch of 1, so padding changes no other result).
CHUNK = 64
# Images per vmapped forward inside a call: each is still its own batch of 1 (the forward is
# per image). bench train's D2 of 4 images: 12 ms per evaluation vmapped, 15 ms one at a time.
MAP_BATCH = 8


def _predict(graphdef, cfg: StepConfig, lower, prompt, frozen, embeddings, boxes, box_valid=None):
    """Logits (N, n, L, L) and argmax (N, L, L) of N images, one batch-1 forward each, vmapped
    `MAP_BATCH` at a time (with (N, M, 4) boxes and (N, M) `box_valid`, the image's M boxes
    merged, docs/fewshot.md §6.4)."""
    model = nnx.merge(graphdef, lower, prompt, frozen)

    def one(image):
        embedding, box, valid = image
        box = None if box is None else box[None]
        valid = None if valid is None else valid[None]
        logits = forward(model.decoder, embedding[None], box, cfg, model.box_residual, valid)
        return logits[0], jnp.argmax(logits[0], axis=0)  # first maximum: ties -> background

    return jax.lax.map(one, (embeddings, boxes, box_valid), batch_size=MAP_BATCH)


@cache
def _predict_jit():
    """`_predict` jitted on first use (its XLA options ask for the backend)."""
    return jax.jit(_predict, static_argnums=(0, 1), compiler_options=decoder_program_options())


def _chunks(graphdef, cfg: StepConfig, state: dict, frozen, data: "EvalData"):
    """(start, arguments of `_predict_jit()`) of each chunk of `data`: up to `CHUNK` images, the
    last padded with the first ones."""
    n = len(data.stems)
    if n == 0:
        raise ValueError("evaluate_fewshot: empty dataset")
    size = min(n, CHUNK)
    for start in range(0, n, size):
        rows = np.arange(start, start + size) % n
        boxes = None if data.boxes is None else jnp.asarray(data.boxes[rows])
        valid = None if data.box_valid is None else jnp.asarray(data.box_valid[rows])
        args = (graphdef, cfg, state["lower"], state["prompt"], frozen,
                jnp.asarray(data.embedding[rows]), boxes, valid)  # fmt: skip
        yield start, args


def _predictions(graphdef, cfg: StepConfig, state: dict, frozen, data: "EvalData"):
    """(argmax predictions (N, L, L) on the host, number of classes) of every image of `data`."""
    n = len(data.stems)
    preds, num_classes = [], None
    for start, args in _chunks(graphdef, cfg, state, frozen, data):
        logits, pred = _predict_jit()(*args)
        num_classes = logits.shape[1]
        preds.append(np.asarray(pred)[: n - start])
    return np.concatenate(preds), num_classes


def compile_evaluation(graphdef, cfg: StepConfig, state: dict, frozen, data: "EvalData") -> None:
    """Compiles what `evaluate_fewshot` of `data` will run without running it (every chunk has
    the same size, so one program): a trainer calls it while it waits for its epoch's compile,
    so the first epoch's evaluation finds the program compiled. The arguments are those of
    `evaluate_fewshot`."""
    _, args = next(_chunks(graphdef, cfg, state, frozen, data))
    _predict_jit().lower(*args).compile()


@dataclasses.dataclass(frozen=True)
class EvalData:
    """What `evaluate` needs per image: cached embedding, low-res label, optional box and mask."""

    embedding: np.ndarray  # (N, G, G, C)
    label_low: np.ndarray  # (N, L, L) int
    stems: tuple[str, ...]
    boxes: np.ndarray | None = None  # (N, 4) model frame; (N, M, 4) with box_valid
    masks: tuple[np.ndarray, ...] | None = None  # original-resolution bool masks
    box_valid: np.ndarray | None = None  # (N, M) bool: real boxes (docs/fewshot.md §6.4)


def evaluate_fewshot(graphdef, cfg: StepConfig, state: dict, frozen, data: EvalData) -> dict:
    """Dice and IoU (×100, mean over images; batch size 1 as the reference) on `data`.

    Args:
        graphdef: graph definition of the training model.
        cfg: step settings (calibration).
        state: {"lower": ..., "prompt": ...} trainable state.
        frozen: frozen state.
        data: embeddings and labels.

    Returns:
        {"dice", "iou", "dice_original" (if masks), "per_image": [{stem, dice, iou, ...}]}; with
        K > 1 foreground classes also "dice_per_class" and "iou_per_class" (K values, class 1
        first: the mean over images of each class's score, so "dice" is their mean;
        docs/fewshot.md §4.5), and the same two lists in each per-image row.
    """
    preds, num_classes = _predictions(graphdef, cfg, state, frozen, data)
    per_image = []
    for i, stem in enumerate(data.stems):
        pred = preds[i]
        target = data.label_low[i]
        dice_c = dice_per_class(pred, target, num_classes)
        iou_c = iou_per_class(pred, target, num_classes)
        row = {
            "stem": stem,
            "dice": 100.0 * float(dice_c.mean()),
            "iou": 100.0 * float(iou_c.mean()),
        }
        if num_classes > 2:
            row["dice_per_class"] = [100.0 * float(v) for v in dice_c]
            row["iou_per_class"] = [100.0 * float(v) for v in iou_c]
        if data.masks is not None:
            mask = data.masks[i]
            full = upsample_nearest(pred, mask.shape)
            row["dice_original"] = 100.0 * float(
                dice_per_class(full, mask.astype(np.int64), num_classes).mean()
            )
        per_image.append(row)
    result = {
        "dice": float(np.mean([r["dice"] for r in per_image])),
        "iou": float(np.mean([r["iou"] for r in per_image])),
    }
    if data.masks is not None:
        result["dice_original"] = float(np.mean([r["dice_original"] for r in per_image]))
    if num_classes > 2:
        for key in ("dice_per_class", "iou_per_class"):
            result[key] = [float(v) for v in np.mean([r[key] for r in per_image], axis=0)]
    result["per_image"] = per_image
    return result


def predict_masks(graphdef, cfg: StepConfig, state: dict, frozen, data: EvalData) -> np.ndarray:
    """Argmax predictions (N, L, L) for every image of `data`."""
    return _predictions(graphdef, cfg, state, frozen, data)[0]
