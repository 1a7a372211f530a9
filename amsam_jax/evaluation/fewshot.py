"""Few-shot evaluation (docs/fewshot.md §4.4): pure functions of the model, its trainable state
and a dataset of cached embeddings; one cached jitted call per image, host accumulation."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.evaluation.metrics import dice_per_class, iou_per_class, upsample_nearest
from amsam_jax.fewshot.blo import StepConfig, forward


@partial(jax.jit, static_argnums=(0, 1))
def _predict(graphdef, cfg: StepConfig, lower, prompt, frozen, embedding, box):
    model = nnx.merge(graphdef, lower, prompt, frozen)
    logits = forward(model.decoder, embedding, box, cfg, model.box_residual)
    return logits, jnp.argmax(logits, axis=1)  # argmax takes the first maximum: ties -> background


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
    num_classes = None
    per_image = []
    for i, stem in enumerate(data.stems):
        box = None if data.boxes is None else jnp.asarray(data.boxes[i : i + 1])
        logits, pred = _predict(
            graphdef, cfg, state["lower"], state["prompt"], frozen, data.embedding[i : i + 1], box
        )
        num_classes = logits.shape[1]
        pred = np.asarray(pred[0])
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
    if not per_image:
        raise ValueError("evaluate_fewshot: empty dataset")
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
    preds = []
    for i in range(len(data.stems)):
        box = None if data.boxes is None else jnp.asarray(data.boxes[i : i + 1])
        _, pred = _predict(
            graphdef, cfg, state["lower"], state["prompt"], frozen, data.embedding[i : i + 1], box
        )
        preds.append(np.asarray(pred[0]))
    return np.stack(preds)
