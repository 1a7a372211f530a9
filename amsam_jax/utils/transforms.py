"""Resizing images and prompts to SAM's input frame (NumPy/PIL, outside jit).

Port of segment_anything/utils/transforms.py (Apache-2.0).
"""

from copy import deepcopy

import numpy as np
from PIL import Image


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
        """Output (h, w) for an input of (oldh, oldw) and the target longest side.

        As the reference, except that a side is at least 1 pixel: the reference rounds the short
        side of a very thin image (20000 x 20 at 1024: 1.02 -> 1, at 256: 0.256 -> 0) down to 0,
        which no resize accepts. Every other size gives the reference's shape.
        """
        scale = long_side_length * 1.0 / max(oldh, oldw)
        newh, neww = oldh * scale, oldw * scale
        return max(int(newh + 0.5), 1), max(int(neww + 0.5), 1)
