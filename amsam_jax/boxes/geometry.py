"""Letterbox geometry: Ultralytics' aspect-preserving resize and padding, and boxes mapped back.

`ultralytics/data/augment.py::LetterBox` (auto=False, centred, pad value 114) with the bit-exact
NumPy copy of OpenCV's uint8 `INTER_LINEAR` resize (`amsam_jax.utils.resize`), and
`ultralytics/utils/ops.py::scale_boxes` back to the image (padding from rounded sides,
clip). No OpenCV dependency.
"""

import dataclasses

import numpy as np

from amsam_jax.utils.resize import resize_linear_uint8

PAD_VALUE = 114  # Ultralytics letterbox fill


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterbox, as `LetterBox.get_params` (auto=False, center=True).

    Attributes:
        image_shape: (H, W) of the original image.
        shape: (H, W) of the letterboxed image (the detector input).
        resized: (H, W) of the image inside the padding.
        top: rows of padding above.
        left: columns of padding on the left.
    """

    image_shape: tuple[int, int]
    shape: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int

    @classmethod
    def fit(cls, image_shape: tuple[int, int], shape: tuple[int, int]) -> "Letterbox":
        h, w = image_shape
        r = min(shape[0] / h, shape[1] / w)
        new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
        dw, dh = (shape[1] - new_w) / 2, (shape[0] - new_h) / 2
        return cls((h, w), tuple(shape), (new_h, new_w), round(dh - 0.1), round(dw - 0.1))


def letterbox(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resizes keeping the aspect ratio and pads with 114 to `shape`, like Ultralytics' LetterBox.

    Args:
        image: (H, W, 3) uint8.
        shape: (h, w) detector input size.

    Returns:
        (h, w, 3) uint8 letterboxed image and its geometry.
    """
    geometry = Letterbox.fit(image.shape[:2], shape)
    resized = resize_linear_uint8(image, geometry.resized)
    out = np.full((*shape, 3), PAD_VALUE, dtype=np.uint8)
    rh, rw = geometry.resized
    out[geometry.top : geometry.top + rh, geometry.left : geometry.left + rw] = resized
    return out, geometry


def scale_boxes(boxes: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """Maps boxes from the letterboxed frame to the original image, as `ops.scale_boxes`.

    Args:
        boxes: (K, 4) float32 xyxy in the letterboxed frame.
        geometry: the letterbox that produced the detector input.

    Returns:
        (K, 4) float32 xyxy in original pixel coordinates, clipped to the image.
    """
    (h, w), (new_h, new_w) = geometry.image_shape, geometry.resized
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] -= geometry.left
    out[:, [1, 3]] -= geometry.top
    out[:, [0, 2]] /= new_w / w
    out[:, [1, 3]] /= new_h / h
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def to_model_frame(boxes: np.ndarray, image_shape: tuple[int, int], size: int = 256) -> np.ndarray:
    """Maps original-image boxes to the SAM input frame: x' = x·size/W, y' = y·size/H.

    docs/fewshot.md §6.1.

    Args:
        boxes: (..., 4) xyxy in original pixel coordinates.
        image_shape: (H, W) of the original image.
        size: side of the square SAM input.

    Returns:
        (..., 4) float32 xyxy in [0, size].
    """
    h, w = image_shape
    scale = np.array([size / w, size / h, size / w, size / h], dtype=np.float32)
    return np.clip(np.asarray(boxes, dtype=np.float32) * scale, 0, size)
