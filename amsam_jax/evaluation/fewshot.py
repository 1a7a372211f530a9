"""Few-shot evaluation (docs/fewshot.md §4.4): pure functions of the model, its trainable state
and a dataset of cached embeddings; one jitted call over a chunk of images (each at batch size 1,
as the reference), host accumulation."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.evaluation.metrics import dice_per_class, iou_per_class, upsample_nearest
from amsam_jax.fewshot.blo import StepConfig, forward

# Images per jitted call: a set up to this size is one call; a larger one goes in chunks of this
# size, the last padded (each image is its own batch of 1, so padding changes no other result).
CHUNK = 64


@partial(jax.jit, static_argnums=(0, 1))
def _predict(graphdef, cfg: StepConfig, lower, prompt, frozen, embeddings, boxes):
    """Logits (N, n, L, L) and argmax (N, L, L) of N images, one batch-1 forward each."""
    model = nnx.merge(graphdef, lower, prompt, frozen)

    def one(image):
        embedding, box = image
        box = None if box is None else box[None]
        logits = forward(model.decoder, embedding[None], box, cfg, model.box_residual)
        return logits[0], jnp.argmax(logits[0], axis=0)  # first maximum: ties -> background

    return jax.lax.map(one, (embeddings, boxes))


def _predictions(graphdef, cfg: StepConfig, state: dict, frozen, data: "EvalData"):
    """(argmax predictions (N, L, L) on the host, number of classes) of every image of `data`."""
    n = len(data.stems)
    if n == 0:
        raise ValueError("evaluate_fewshot: empty dataset")
    size = min(n, CHUNK)
    preds, num_classes = [], None
    for start in range(0, n, size):
        rows = np.arange(start, start + size) % n  # the last chunk padded with the first images
        boxes = None if data.boxes is None else jnp.asarray(data.boxes[rows])
        logits, pred = _predict(
            graphdef, cfg, state["lower"], state["prompt"], frozen,
            jnp.asarray(data.embedding[rows]), boxes,
        )  # fmt: skip
        num_classes = logits.shape[1]
        preds.append(np.asarray(pred)[: n - start])
    return np.concatenate(preds), num_classes


@dataclasses.dataclass(frozen=True)
class EvalData:
    """What `evaluate` needs per image: cached embedding, low-res label, optional box and mask."""

    embedding: np.ndarray  # (N, G, G, C)
    label_low: np.ndarray  # (N, L, L) int
    stems: tuple[str, ...]
    boxes: np.ndarray | None = None  # (N, 4) model frame
    masks: tuple[np.ndarray, ...] | None = None  # original-resolution bool masks


def evaluate_fewshot(graphdef, cfg: StepConfig, state: dict, frozen, data: EvalData) -> dict:
    """Dice and IoU (×100, mean over images; batch size 1 as the reference) on `data`.

    Args:
        graphdef: graph definition of the training model.
        cfg: step settings (calibration).
        state: {"lower": ..., "prompt": ...} trainable state.
        frozen: frozen state.
        data: embeddings and labels.

    Returns:
        {"dice", "iou", "dice_original" (if masks), "per_image": [{stem, dice, iou, ...}]}.
    """
    preds, num_classes = _predictions(graphdef, cfg, state, frozen, data)
    per_image = []
    for i, stem in enumerate(data.stems):
        pred = preds[i]
        target = data.label_low[i]
        row = {
            "stem": stem,
            "dice": 100.0 * float(dice_per_class(pred, target, num_classes).mean()),
            "iou": 100.0 * float(iou_per_class(pred, target, num_classes).mean()),
        }
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
    result["per_image"] = per_image
    return result


def predict_masks(graphdef, cfg: StepConfig, state: dict, frozen, data: EvalData) -> np.ndarray:
    """Argmax predictions (N, L, L) for every image of `data`."""
    return _predictions(graphdef, cfg, state, frozen, data)[0]
