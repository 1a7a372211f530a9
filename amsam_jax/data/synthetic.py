"""Deterministic synthetic scenes (objects on textured backgrounds) for demos and smoke runs."""

import os
from pathlib import Path

import numpy as np
from PIL import Image

# The bundled copy under amsam_jax/assets/ is `make_synthetic_dataset(dir, **BUNDLED_SYNTHETIC)`.
BUNDLED_SYNTHETIC = {"n_train": 8, "n_test": 4, "seed": 0, "size": (160, 200)}
# The bundled 3-class copy is `make_multiclass_dataset(dir, **BUNDLED_MULTICLASS)`.
BUNDLED_MULTICLASS = {"n_train": 6, "n_test": 3, "seed": 0, "size": (64, 96)}
# Class ids of the multi-class scenes: 1 disc, 2 square, 3 triangle, each in its own colour family.
MULTICLASS_SHAPES = ("disc", "square", "triangle")
CLASS_HUES = ((210, 170, 60), (140, 80, 170), (80, 180, 180))  # ochre, purple, teal
# Palette of the multi-class masks (index = class id): black background, then the class colours.
LABEL_PALETTE = ((0, 0, 0), (220, 20, 60), (50, 205, 50), (30, 144, 255))


def textured_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour gradients plus stripes and noise, float (H, W, 3) in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(60, 190, 3)
    slope = rng.uniform(-0.15, 0.15, (2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    freq, phase = rng.uniform(0.03, 0.12), rng.uniform(0, 2 * np.pi)
    img += 18 * np.sin(freq * (xx + 0.6 * yy) + phase)[..., None]
    img += rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255)


def make_scene(
    seed: int, size: tuple[int, int] = (460, 540), shape: str = "disc"
) -> tuple[np.ndarray, np.ndarray]:
    """One image with a foreground object and a distractor.

    Args:
        seed: RNG seed; the same seed always gives the same scene.
        size: (H, W).
        shape: "disc" or "blob" (an irregular star-shaped object).

    Returns:
        uint8 image (H, W, 3) and bool foreground mask (H, W).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    img = textured_background(h, w, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = rng.uniform(0.18, 0.28) * min(h, w)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r
    if shape == "blob":
        radius = r * (1 + 0.25 * np.sin(rng.integers(3, 6) * angle + rng.uniform(0, 6)))
    mask = np.hypot(yy - cy, xx - cx) < radius
    color = rng.uniform(0, 255, 3)
    shade = 1 + 0.2 * np.cos(angle)[..., None]
    img = np.where(
        mask[..., None], np.clip(color * shade + rng.normal(0, 6, (h, w, 3)), 0, 255), img
    )
    # A distractor rectangle that is not part of the foreground.
    dh, dw = int(0.15 * h), int(0.2 * w)
    y0 = int(rng.integers(0, h - dh))
    x0 = int(rng.integers(0, w - dw))
    distractor = np.zeros_like(mask)
    distractor[y0 : y0 + dh, x0 : x0 + dw] = True
    distractor &= ~mask
    img[distractor] = rng.uniform(0, 255, 3)
    return img.round().astype(np.uint8), mask


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (160, 200),
) -> Path:
    """Writes a deterministic dataset in the folder format (objects on textured backgrounds).

    Scene i (train first, then test) is `make_scene(seed * 10_000 + i, size, shape)` with the
    shape alternating disc/blob; files are `scene_<i:03d>.png` with masks 0/255 8-bit PNG.

    Args:
        out_dir: created if needed; existing files of the same names are overwritten.
        n_train: training images.
        n_test: test images.
        seed: dataset seed.
        size: (H, W) of every image.

    Returns:
        `out_dir`.
    """
    out_dir = Path(out_dir)
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        image, mask = make_scene(seed * 10_000 + i, size, ("disc", "blob")[i % 2])
        for sub, arr in (("images", image), ("masks", mask.astype(np.uint8) * 255)):
            (out_dir / split / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(out_dir / split / sub / f"scene_{i:03d}.png")
    return out_dir


def make_multiclass_scene(
    seed: int, size: tuple[int, int] = (64, 96)
) -> tuple[np.ndarray, np.ndarray]:
    """One image with one object of each class (disc 1, square 2, triangle 3), side by side.

    The width is cut into three columns in a random order, one object per column, so every class
    is present and objects never overlap. The background is smooth (gradient and stripes, no
    pixel noise) and each class keeps its colour family (`CLASS_HUES`, jittered per scene), so
    the files stay small and a tiny model can tell the classes apart.

    Args:
        seed: RNG seed; the same seed always gives the same scene.
        size: (H, W); W should be at least 3·H/2 for round objects.

    Returns:
        uint8 image (H, W, 3) and uint8 label map (H, W) with values 0..3.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(90, 170, 3)
    slope = rng.uniform(-0.4, 0.4, (2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    img += 10 * np.sin(rng.uniform(0.1, 0.3) * (xx + yy) + rng.uniform(0, 2 * np.pi))[..., None]
    label = np.zeros((h, w), np.uint8)
    col_w = w / 3
    for column, k in enumerate(rng.permutation(3)):
        r = rng.uniform(0.25, 0.4) * min(h, col_w)
        cx = (column + 0.5) * col_w + rng.uniform(-0.1, 0.1) * col_w
        cy = rng.uniform(r + 1, h - r - 1)
        if MULTICLASS_SHAPES[k] == "disc":
            inside = np.hypot(yy - cy, xx - cx) < r
        elif MULTICLASS_SHAPES[k] == "square":
            inside = (np.abs(yy - cy) < 0.85 * r) & (np.abs(xx - cx) < 0.85 * r)
        else:  # an upward triangle: below its two slanted sides, above its base
            inside = (yy < cy + 0.8 * r) & (yy - cy + r > 1.7 * np.abs(xx - cx))
        label[inside] = k + 1
        color = np.clip(np.asarray(CLASS_HUES[k]) + rng.uniform(-25, 25, 3), 0, 255)
        img[inside] = color
    return np.clip(img, 0, 255).round().astype(np.uint8), label


def make_multiclass_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 6,
    n_test: int = 3,
    seed: int = 0,
    size: tuple[int, int] = (64, 96),
) -> Path:
    """Writes a deterministic 3-class dataset in the folder format (`data.num_classes=3`).

    Scene i (train first, then test) is `make_multiclass_scene(seed * 10_000 + i, size)`; files
    are `scene_<i:03d>.png`, masks palette PNGs whose indices are the class ids 0..3
    (`LABEL_PALETTE` colours).

    Args:
        out_dir: created if needed; existing files of the same names are overwritten.
        n_train: training images.
        n_test: test images.
        seed: dataset seed.
        size: (H, W) of every image.

    Returns:
        `out_dir`.
    """
    out_dir = Path(out_dir)
    palette = [v for rgb in LABEL_PALETTE for v in rgb]
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        image, label = make_multiclass_scene(seed * 10_000 + i, size)
        mask = Image.fromarray(label, mode="P")
        mask.putpalette(palette)
        for sub, img in (("images", Image.fromarray(image)), ("masks", mask)):
            (out_dir / split / sub).mkdir(parents=True, exist_ok=True)
            img.save(out_dir / split / sub / f"scene_{i:03d}.png", optimize=True)
    return out_dir


def bundled_synthetic_dir(num_classes: int = 1) -> Path:
    """The synthetic dataset shipped in the package: binary (`BUNDLED_SYNTHETIC` parameters) for
    `num_classes` 1, the 3-class one (`BUNDLED_MULTICLASS`) for more."""
    name = "synthetic_fewshot" if num_classes == 1 else "synthetic_multiclass"
    return Path(__file__).parent.parent / "assets" / name
