"""Bit-exact NumPy copy of OpenCV's uint8 `INTER_AREA` resize, without an OpenCV dependency.

`cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)` (opencv/modules/imgproc/src/resize.cpp,
Apache-2.0) takes one of three paths, all reproduced here: `resizeAreaFast_` when both scales
are integers (mean of each block, `(sum + 2) >> 2` for 2x2 blocks of 1, 3 or 4 channels);
`resizeArea_` when both axes shrink by non-integer factors (the `computeResizeAreaTab` float32
weights, summed in OpenCV's order, then `saturate_cast`); and, when either axis grows, the
fixed-point bilinear `resizeGeneric_` with area-specific fractions (2**11 weights and its SIMD
rounding, shared with `resize_linear_uint8`, the copy of `INTER_LINEAR` the detector uses).
"""

import numpy as np

# OpenCV's fixed-point resize: weights are integers scaled by 2**11 (INTER_RESIZE_COEF_BITS).
_COEF_SCALE = 2048
_DBL_EPSILON = float(np.finfo(np.float64).eps)
_CHUNK = 2**16  # float32 elements per block of the column pass


def _area_taps(src: int, dst: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """`computeResizeAreaTab` as a padded table: (dst, K) source indices and float32 weights.

    Each output cell covers source [d*scale, (d+1)*scale): a partial head pixel, whole pixels,
    a partial tail pixel, in this order (the order OpenCV sums in). Padding taps weigh 0.
    """
    fsx1 = np.arange(dst, dtype=np.float64) * scale
    fsx2 = fsx1 + scale
    cell = np.minimum(scale, src - fsx1)
    sx2 = np.minimum(np.floor(fsx2).astype(np.int64), src - 1)
    sx1 = np.minimum(np.ceil(fsx1).astype(np.int64), sx2)
    head = (sx1 - fsx1 > 1e-3).astype(np.int64)
    tail = (fsx2 - sx2 > 1e-3).astype(np.int64)
    whole = sx2 - sx1
    taps = head + whole + tail
    k = np.arange(taps.max())
    j = k - head[:, None]  # (dst, K): -1 head, [0, whole) whole pixels, whole tail
    weight = np.select(
        [j < 0, j < whole[:, None]],
        [((sx1 - fsx1) / cell)[:, None], (1.0 / cell)[:, None]],
        (np.minimum(np.minimum(fsx2 - sx2, 1.0), cell) / cell)[:, None],
    ).astype(np.float32)
    weight[k >= taps[:, None]] = 0
    return np.clip(sx1[:, None] + j, 0, src - 1), weight


def _linear_taps(
    src: int, dst: int, scale: float, clamp: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`resizeGeneric_` taps in area mode: two source indices and 2**11-scaled integer weights.

    The fraction is `(d + 1) - (s + 1) / scale` wrapped to [0, 1) (0 when not positive), with
    s = floor(d * scale). As for INTER_LINEAR, OpenCV clamps the fraction to 0 at the x border
    but only clips the row indices at the y border; `clamp` selects the x behaviour.
    """
    d = np.arange(dst)
    s = np.floor(d * scale).astype(np.int64)
    f = ((d + 1) - (s + 1) * (dst / src)).astype(np.float32)
    f = np.where(f <= 0, np.float32(0), f - np.floor(f))
    if clamp:
        f[s >= src - 1] = 0
    w0 = np.rint((np.float32(1) - f) * _COEF_SCALE).astype(np.int32)
    w1 = np.rint(f * _COEF_SCALE).astype(np.int32)
    return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1


def _resize_fast(image: np.ndarray, scale_y: int, scale_x: int) -> np.ndarray:
    """`resizeAreaFast_`: the mean of each scale_y x scale_x block (sizes divide exactly)."""
    src_h, src_w, channels = image.shape
    h, w = src_h // scale_y, src_w // scale_x
    bands = image.reshape(h, scale_y, w * scale_x * channels)
    # int32 like OpenCV's sum, wrapping on overflow as it does (only past 2**23 pixels per
    # block); integer sums are exact in any order, and this one is fast.
    rows = np.zeros((h, w * scale_x * channels), dtype=np.int32)
    for i in range(scale_y):
        rows += bands[:, i]
    total = rows.reshape(h, w, scale_x, channels).sum(axis=2, dtype=np.int32)  # (h, w, C)
    if scale_x == scale_y == 2 and channels in (1, 3, 4):
        return ((total + 2) >> 2).astype(np.uint8)  # ResizeAreaFastVec's 2x2 fast mode
    mean = total.astype(np.float32) * np.float32(1.0 / (scale_x * scale_y))
    return np.rint(mean).clip(0, 255).astype(np.uint8)


def _resize_area(image: np.ndarray, size: tuple[int, int], scales: tuple[float, float]):
    """`resizeArea_`: float32 area weights along each row, then down the columns, in order."""
    (h, w), (src_h, src_w, channels) = size, image.shape
    x_index, x_weight = _area_taps(src_w, w, scales[1])
    y_index, y_weight = _area_taps(src_h, h, scales[0])
    rows, inverse = np.unique(y_index, return_inverse=True)  # the rows some output row reads
    src = image.reshape(src_h, src_w * channels)
    c = np.arange(channels)
    columns = [(x_index[:, k, None] * channels + c).ravel() for k in range(x_index.shape[1])]
    weights = [np.repeat(x_weight[:, k], channels) for k in range(x_index.shape[1])]
    horiz = np.empty((len(rows), w * channels), dtype=np.float32)
    step = max(1, _CHUNK // (w * channels))  # row blocks that stay in cache
    for start in range(0, len(rows), step):
        block = src.take(rows[start : start + step], axis=0)  # (r, W*C)
        total = np.zeros((len(block), w * channels), dtype=np.float32)
        product = np.empty_like(total)
        for column, weight in zip(columns, weights, strict=True):  # one tap per output column
            np.multiply(block.take(column, axis=1), weight, out=product)  # float32, as OpenCV
            total += product  # summed in OpenCV's tap order
        horiz[start : start + step] = total
    horiz = horiz.reshape(len(rows), w, channels)
    inverse = inverse.reshape(y_index.shape)
    out = np.zeros((h, w, channels), dtype=np.float32)
    for k in range(y_index.shape[1]):
        out += y_weight[:, k, None, None] * horiz[inverse[:, k]]
    return np.rint(out).clip(0, 255).astype(np.uint8)  # saturate_cast: round half to even


def _half_pixel_taps(
    src: int, dst: int, clamp: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`resizeGeneric_` taps for `INTER_LINEAR`: half-pixel centres, 2**11-scaled weights.

    OpenCV clamps the fraction to 0 at the x borders but not at the y borders (where it clips
    the row indices instead); `clamp` selects the x behaviour.
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


def _bilinear(image: np.ndarray, h: int, x_taps: tuple, y_taps: tuple) -> np.ndarray:
    """`resizeGeneric_`'s fixed-point bilinear pass given its taps; reads only the needed rows."""
    (x0, x1, a0, a1), (y0, y1, b0, b1) = x_taps, y_taps
    src_w, channels = image.shape[1:]
    w = len(x0)
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
    # VResizeLinearVec_32s8u (and its scalar tail): ((b0*t >> 16) + (b1*b >> 16) + 2) >> 2.
    top *= b0[:, None]
    top >>= 16
    bottom *= b1[:, None]
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2  # a weighted mean: already in [0, 255]
    return top.astype(np.uint8).reshape(h, w, channels)


def _resize_linear(image: np.ndarray, size: tuple[int, int], scales: tuple[float, float]):
    """`resizeGeneric_` in area mode: bilinear with OpenCV's fixed-point arithmetic."""
    (h, w), (src_h, src_w) = size, image.shape[:2]
    x_taps = _linear_taps(src_w, w, scales[1], clamp=True)
    y_taps = _linear_taps(src_h, h, scales[0], clamp=False)
    return _bilinear(image, h, x_taps, y_taps)


def resize_linear_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bit-exact NumPy copy of `cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`.

    Half-pixel centres, no antialiasing, OpenCV's 11-bit fixed-point weights and its SIMD
    rounding; checked against OpenCV in tests/boxes/test_boxes.py. An unchanged size returns
    `image` itself.

    Args:
        image: (H, W, C) uint8.
        size: (h, w) output size.

    Returns:
        (h, w, C) uint8.
    """
    (h, w), (src_h, src_w) = size, image.shape[:2]
    if (h, w) == (src_h, src_w):
        return image
    x_taps = _half_pixel_taps(src_w, w, clamp=True)
    y_taps = _half_pixel_taps(src_h, h, clamp=False)
    return _bilinear(image, h, x_taps, y_taps)


def resize_area_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bit-exact NumPy copy of `cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)`.

    Shrinking averages the covered source area; growing in either axis is OpenCV's bilinear
    emulation of area interpolation. Checked against OpenCV in tests/utils/test_resize.py.
    Unlike cv2, an (H, W, 1) input gives an (h, w, 1) output (cv2 drops the channel axis).

    Args:
        image: (H, W) or (H, W, C) uint8.
        size: (h, w) output size, both >= 1.

    Returns:
        (h, w) or (h, w, C) uint8, with as many axes as `image`.

    Raises:
        ValueError: if `image` is not a non-empty 2-D or 3-D uint8 array or `size` is not positive.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(
            f"expected a non-empty (H, W) or (H, W, C) uint8 image, got {image.dtype} {image.shape}"
        )
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"output size must be positive, got {tuple(size)}")
    planar = image.ndim == 2
    src = image[:, :, None] if planar else image
    src_h, src_w = src.shape[:2]
    if (h, w) == (src_h, src_w):
        out = src.copy()  # cv::resize copies when the size is unchanged
    else:
        # cv::resize derives the scales in double precision from the sizes, as here.
        scales = (1.0 / (h / src_h), 1.0 / (w / src_w))
        integer = tuple(round(s) for s in scales)
        if min(scales) < 1:
            out = _resize_linear(src, (h, w), scales)
        elif all(abs(s - i) < _DBL_EPSILON for s, i in zip(scales, integer, strict=True)):
            out = _resize_fast(src, *integer)
        else:
            out = _resize_area(src, (h, w), scales)
    return out[:, :, 0] if planar else out
