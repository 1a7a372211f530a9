"""Letterbox geometry: Ultralytics' aspect-preserving resize and padding, and boxes mapped back.

`ultralytics/data/augment.py::LetterBox` (auto=False, centred, pad value 114) with a bit-exact
NumPy copy of OpenCV's uint8 `INTER_LINEAR` resize, and `ultralytics/utils/ops.py::scale_boxes`
back to the image (padding from rounded sides, clip). No OpenCV dependency.
"""

import dataclasses

import numpy as np

PAD_VALUE = 114  # Ultralytics letterbox fill
# OpenCV's fixed-point resize: weights are integers scaled by 2**11 (INTER_RESIZE_COEF_BITS).
_COEF_SCALE = 2048


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


def _resize_taps(
    src: int, dst: int, clamp: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV `resizeGeneric_` linear taps: source indices and 2**11-scaled integer weights.

    OpenCV clamps the fraction to 0 at the x borders but not at the y borders (where it clips the
    row indices instead); `clamp` selects the x behaviour.
    """
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = f - i0.astype(np.float32)
    if clamp:
        f[(i0 < 0) | (i0 >= src - 1)] = 0
    w0 = np.rint((np.float32(1) - f) * _COEF_SCALE).astype(np.int32)
    w1 = np.rint(f * _COEF_SCALE).astype(np.int32)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def resize_linear_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bit-exact numpy copy of `cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`.

    Half-pixel centres, no antialiasing, OpenCV's 11-bit fixed-point weights and its SIMD
    rounding; checked against OpenCV in the tests. Only the needed source rows are read.

    Args:
        image: (H, W, C) uint8.
        size: (h, w) output size.

    Returns:
        (h, w, C) uint8.
    """
    (h, w), (src_h, src_w, channels) = size, image.shape
    if (h, w) == (src_h, src_w):
        return image
    x0, x1, a0, a1 = _resize_taps(src_w, w, clamp=True)
    y0, y1, b0, b1 = _resize_taps(src_h, h, clamp=False)
    rows, inverse = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    src = image[rows].reshape(len(rows), src_w * channels)  # (R, W*C)
    c = np.arange(channels)
    horiz = np.multiply(
        np.take(src, (x0[:, None] * channels + c).ravel(), axis=1),
        np.repeat(a0, channels),
        dtype=np.int32,
    )  # (R, w*C), scaled by 2**11
    horiz += np.multiply(
        np.take(src, (x1[:, None] * channels + c).ravel(), axis=1),
        np.repeat(a1, channels),
        dtype=np.int32,
    )
    horiz >>= 4
    top, bottom = horiz[inverse[:h]], horiz[inverse[h:]]  # (h, w*C) each
    top *= b0[:, None]
    top >>= 16
    bottom *= b1[:, None]
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2  # a weighted mean: already in [0, 255]
    return top.astype(np.uint8).reshape(h, w, channels)


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
