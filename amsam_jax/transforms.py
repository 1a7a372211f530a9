"""Host-side image and prompt transforms (numpy/PIL, outside jit).

Port of segment_anything/utils/transforms.py (Apache-2.0), plus image reading.
"""

import os
from copy import deepcopy

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images above this many pixels instead of exhausting memory (PIL's bomb guard warns at
# ~89 MP and errors at twice that; we turn its error into one clear line).
MAX_IMAGE_PIXELS = 178_956_970


class ImageReadError(Exception):
    """An image that cannot be used; the message is one line naming the file and the problem."""


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as uint8 RGB (H, W, 3).

    EXIF orientation is applied; grayscale, palette and RGBA become RGB (alpha dropped); 16-bit
    and float images are scaled to 8 bit by their type's range (16-bit: value / 257).

    Raises:
        ImageReadError: missing, corrupt, truncated, too large or of an unsupported mode.
    """
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: image too large ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = (np.asarray(img, dtype=np.uint16).astype(np.float64) / 257.0).round()
        return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and arr.max(initial=0) <= 1.0 else 65535.0
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=-1)
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ImageReadError(f"{path}: unsupported image mode {img.mode}")
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"{path}: empty image")
    return arr


class ResizeLongestSide:
    """Resizes images so the longest side is `target_length`, and maps coordinates and boxes."""

    def __init__(self, target_length: int):
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (h, w, 3) with PIL bilinear, as the reference."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Maps (..., 2) (x, y) coordinates of the original image to the resized image."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = deepcopy(coords).astype(float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Maps (B, 4) boxes (x0, y0, x1, y1) of the original image to the resized image."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """Output (h, w) for an input of (oldh, oldw) and the target longest side."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        newh, neww = oldh * scale, oldw * scale
        return int(newh + 0.5), int(neww + 0.5)
