"""Test helper: small random image/mask pairs in the folder format (DIR/<split>/{images,masks})."""

import zlib

import numpy as np
from PIL import Image


def write_pair(root, split, stem, size=(12, 16), image_suffix=".png", mask_size=None):
    """Writes a random RGB image and a 0/255 mask; size is (H, W)."""
    rng = np.random.default_rng(zlib.crc32(f"{split}/{stem}".encode()))
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        root / split / "images" / f"{stem}{image_suffix}"
    )
    mh, mw = mask_size or size
    mask = (rng.random((mh, mw)) > 0.5).astype(np.uint8) * 255
    Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")


def make_folder(root, stems, split="train"):
    for stem in stems:
        write_pair(root, split, stem)
    return root
