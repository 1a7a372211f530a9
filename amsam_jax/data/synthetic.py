"""Deterministic synthetic scenes (objects on textured backgrounds) for demos and smoke runs."""

import os
from pathlib import Path

import numpy as np
from PIL import Image

# The bundled copy under amsam_jax/assets/ is `make_synthetic_dataset(dir, **BUNDLED_SYNTHETIC)`.
BUNDLED_SYNTHETIC = {"n_train": 8, "n_test": 4, "seed": 0, "size": (160, 200)}


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


def bundled_synthetic_dir() -> Path:
    """The synthetic dataset shipped in the package (`BUNDLED_SYNTHETIC` parameters)."""
    return Path(__file__).parent.parent / "assets" / "synthetic_fewshot"
