"""Run artefacts as images: loss and metric curves, and mask overlays.

Matplotlib is used through its object-oriented `Figure` API (no pyplot, no global backend), so
plotting never depends on a display or on process-wide state. Files are encoded in memory and
written atomically (`utils.io`): an extension no writer knows is refused before anything is
written, and a failed write leaves no file.
"""

import io
import os
from pathlib import Path

import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from amsam_jax.utils.errors import first_line
from amsam_jax.utils.io import WriteError, atomic_write, ensure_folder

MASK_COLORS = ((30, 144, 255), (255, 140, 0), (50, 205, 50), (220, 20, 60))
# Multi-class overlays: class j >= 1 is tinted CLASS_COLORS[(j - 1) % 8], in the ground truth and
# the prediction alike (binary runs keep green ground truth and red prediction).
CLASS_COLORS = (
    (220, 20, 60), (50, 205, 50), (30, 144, 255), (255, 215, 0),
    (255, 0, 255), (0, 206, 209), (255, 140, 0), (148, 103, 189),
)  # fmt: skip
COMMON_IMAGE_SUFFIXES = ".png, .jpg, .tif, .bmp, .webp"


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format that writes `path`, from its extension (".png" -> "PNG").

    Raises:
        WriteError: an extension Pillow cannot write (or none).
    """
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise WriteError(
            path, f"unknown image extension {suffix or '(none)'!r}; use {COMMON_IMAGE_SUFFIXES}"
        )
    return fmt


def encode_image(image: Image.Image, path: str | os.PathLike) -> bytes:
    """`image` encoded in the format of `path`'s extension (see `image_format`).

    Raises:
        WriteError: an unknown extension, or a format that cannot hold this image (WebP sides
            are at most 16383 pixels, ...).
    """
    fmt = image_format(path)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError) as e:
        w, h = image.size
        raise WriteError(path, f"cannot write a {w}x{h} image as {fmt} ({first_line(e)})") from None
    return buffer.getvalue()


def figure_format(path: str | os.PathLike) -> str:
    """The Matplotlib format that writes `path`, from its extension (".png" -> "png").

    Raises:
        WriteError: an extension Matplotlib cannot write (or none).
    """
    fmt = Path(path).suffix.lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise WriteError(
            path,
            f"unknown plot extension {Path(path).suffix or '(none)'!r}; use "
            + ", ".join(f".{k}" for k in ("png", "pdf", "svg", "jpg")),
        )
    return fmt


def figure_bytes(fig: Figure, path: str | os.PathLike) -> bytes:
    """`fig` laid out and encoded in the format of `path`'s extension, at 100 dpi."""
    fmt = figure_format(path)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format=fmt, dpi=100)
    return buffer.getvalue()


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    data = figure_bytes(fig, path)
    ensure_folder(path.parent)
    atomic_write(path, data)


def plot_curves(records: list[dict], path: Path) -> None:
    """plots/curves.png of a few-shot run: lower/upper loss per iteration, D2 Dice per epoch."""
    its = [r for r in records if r.get("kind") == "iteration"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig = Figure(figsize=(10, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    if its:
        steps = [r["step"] for r in its]
        ax1.plot(steps, [r["lower_loss"] for r in its], label="lower (D1)")
        ax1.plot(steps, [r["upper_loss"] for r in its], label="upper (D2)")
        ax1.legend()
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss")
    if epochs:
        ax2.plot([r["epoch"] for r in epochs], [r["d2_dice"] for r in epochs], marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("D2 Dice (%)")
    _save(fig, path)


def plot_sum_curves(records: list[dict], path: Path) -> None:
    """plots/curves.png of a SUM run: the human and pseudo-label losses per iteration."""
    its = [r for r in records if r.get("kind") == "iteration"]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name in ("human", "pseudo", "joint"):
        pts = [(r["step"], r[f"{name}_loss"]) for r in its if f"{name}_loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (mean over rounds)")
    if its:
        ax.legend()
    _save(fig, path)


def plot_metric_vs_clicks(summary: dict, path: Path) -> None:
    """A PNG of mIoU and mBIoU (%) against the number of clicks (`interactive.summarize`)."""
    _save(metric_vs_clicks_figure(summary), path)


def metric_vs_clicks_figure(summary: dict) -> Figure:
    """The figure of `plot_metric_vs_clicks`."""
    clicks = np.arange(1, len(summary["miou"]) + 1)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(clicks, summary["miou"], marker="o", label="mIoU")
    ax.plot(clicks, summary["mbiou"], marker="s", label="mBIoU")
    ax.set_xlabel("clicks")
    ax.set_ylabel("%")
    ax.set_xticks(clicks)
    ax.legend()
    return fig


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 64, 64)) -> np.ndarray:
    """uint8 image with `mask` tinted (image in [0, 1] or 0..255 floats, or uint8)."""
    img = np.asarray(image, np.float32)
    if img.max() <= 1.5:
        img = img * 255.0
    img = np.clip(img, 0, 255)
    out = img.copy()
    out[mask] = 0.5 * img[mask] + 0.5 * np.asarray(color, np.float32)
    return out.round().astype(np.uint8)


def overlay_classes(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 image with each class j >= 1 of the integer map `labels` tinted CLASS_COLORS[j - 1]
    (cycled past 8 classes); background pixels are `overlay`'s untinted image."""
    out = overlay(image, np.zeros(labels.shape, bool))
    for j in np.unique(labels[labels > 0]):
        inside = labels == j
        out[inside] = overlay(image, inside, CLASS_COLORS[(int(j) - 1) % len(CLASS_COLORS)])[inside]
    return out


def write_samples(split, preds: np.ndarray, out_dir: Path, count: int) -> list[Path]:
    """samples/<stem>.png: image | ground truth | prediction, at the model input resolution.

    A binary split (`split.num_classes` 1) tints the ground truth green and the prediction red;
    a multi-class one tints each class in its own colour (`CLASS_COLORS`) in both panels.

    Raises:
        WriteError: a panel cannot be written (each is written atomically).
    """
    ensure_folder(out_dir)
    paths = []
    multiclass = split.num_classes > 1
    for i, stem in enumerate(split.stems[:count]):
        image = split.image[i]
        size = image.shape[0]
        scale = size // preds.shape[-1]
        pred = np.kron(preds[i], np.ones((scale, scale), preds.dtype))
        gt = np.kron(split.label_low[i], np.ones((scale, scale), split.label_low.dtype))
        if multiclass:
            panels = [overlay_classes(image, gt), overlay_classes(image, pred)]
        else:
            panels = [overlay(image, gt > 0, (64, 255, 64)), overlay(image, pred > 0)]
        panel = np.concatenate([overlay(image, np.zeros(gt.shape, bool)), *panels], axis=1)
        path = out_dir / f"{stem}.png"
        atomic_write(path, encode_image(Image.fromarray(panel), path))
        paths.append(path)
    return paths


def draw_overlay(image, masks, box, points, title: str) -> Image.Image:
    """The image with masks tinted, the box outlined, points dotted and a title line."""
    out = image.astype(np.float32)
    for k, mask in enumerate(masks):
        color = np.asarray(MASK_COLORS[k % len(MASK_COLORS)], np.float32)
        out[mask] = 0.5 * out[mask] + 0.5 * color
    img = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if box is not None:
        draw.rectangle(list(box), outline=(0, 255, 0), width=3)
    for x, y, label in points:
        r = 6
        fill = (0, 255, 0) if label == 1 else (255, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
    draw.rectangle([0, 0, img.width, 14], fill=(0, 0, 0))
    draw.text((3, 2), title, fill=(255, 255, 0))
    return img
