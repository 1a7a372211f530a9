"""Run artefacts: loss/Dice curves and image / ground truth / prediction overlays."""

from pathlib import Path

import numpy as np
from PIL import Image


def plot_curves(records: list[dict], path: Path) -> None:
    """plots/curves.png: lower/upper loss per iteration and D2 Dice per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r for r in records if r.get("kind") == "iteration"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if its:
        steps = [r["step"] for r in its]
        ax1.plot(steps, [r["lower_loss"] for r in its], label="lower (D1)")
        ax1.plot(steps, [r["upper_loss"] for r in its], label="upper (D2)")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss")
    ax1.legend()
    if epochs:
        ax2.plot([r["epoch"] for r in epochs], [r["d2_dice"] for r in epochs], marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("D2 Dice (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 64, 64)) -> np.ndarray:
    """uint8 image with `mask` tinted (image in [0, 1] or 0..255 floats, or uint8)."""
    img = np.asarray(image, np.float32)
    if img.max() <= 1.5:
        img = img * 255.0
    img = np.clip(img, 0, 255)
    out = img.copy()
    out[mask] = 0.5 * img[mask] + 0.5 * np.asarray(color, np.float32)
    return out.round().astype(np.uint8)


def write_samples(split, preds: np.ndarray, out_dir: Path, count: int) -> list[Path]:
    """samples/<stem>.png: image | ground truth | prediction, at the model input resolution."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stem in enumerate(split.stems[:count]):
        image = split.image[i]
        size = image.shape[0]
        scale = size // preds.shape[-1]
        pred = np.kron(preds[i], np.ones((scale, scale), preds.dtype)) > 0
        gt = np.kron(split.label_low[i], np.ones((scale, scale), split.label_low.dtype)) > 0
        panel = np.concatenate(
            [overlay(image, np.zeros_like(gt)), overlay(image, gt, (64, 255, 64)),
             overlay(image, pred)], axis=1
        )  # fmt: skip
        path = out_dir / f"{stem}.png"
        Image.fromarray(panel).save(path)
        paths.append(path)
    return paths
