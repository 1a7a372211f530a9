"""Tests of `amsam_jax.utils.resize`: bit-exact with OpenCV's uint8 INTER_AREA, without cv2."""

import subprocess
import sys

import cv2
import numpy as np
import pytest

from amsam_jax.utils.resize import resize_area_uint8

CHANNELS = (0, 1, 2, 3, 4)  # 0: a 2-D (H, W) image
CASES_PER_KIND = 400


def opencv_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2's INTER_AREA with the input's axes (cv2 drops the axis of an (H, W, 1) image)."""
    h, w = size
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return out.reshape((h, w, *image.shape[2:]))


def random_image(rng: np.random.Generator, shape: tuple[int, int], channels: int) -> np.ndarray:
    """Noise, or (a third of the time) 0/255 noise, whose means often land on a .5 tie."""
    full = shape if channels == 0 else (*shape, channels)
    image = rng.integers(0, 256, full, dtype=np.uint8)
    return image // 128 * np.uint8(255) if rng.random() < 1 / 3 else image


def longest_side(shape: tuple[int, int], side: int = 256) -> tuple[int, int]:
    scale = side / max(shape)
    return max(round(shape[0] * scale), 1), max(round(shape[1] * scale), 1)


def random_sizes(kind: str, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """(source, output) sizes of one random case of the given kind."""
    if kind == "any":  # up, down or mixed per axis, integer factors rare
        src_h, src_w, h, w = (int(v) for v in rng.integers(1, 701, 4))
        return (src_h, src_w), (h, w)
    if kind == "integer":  # resizeAreaFast_: factors 1..6 per axis
        h, w, fy, fx = (int(v) for v in rng.integers(1, [120, 120, 7, 7]))
        return (h * fy, w * fx), (h, w)
    if kind == "small":
        src_h, src_w, h, w = (int(v) for v in rng.integers(1, 13, 4))
        return (src_h, src_w), (h, w)
    if kind == "thin":  # extreme aspect ratios, longest side to 256
        shape = (int(rng.integers(1, 6)), int(rng.integers(300, 3000)))
        shape = shape[::-1] if rng.random() < 0.5 else shape
        return shape, longest_side(shape)
    shape = (int(rng.integers(1, 701)), int(rng.integers(1, 701)))  # "longest": LiteMedSAM's use
    return shape, longest_side(shape)


@pytest.mark.parametrize("kind", ["any", "integer", "small", "thin", "longest"])
def test_random_resizes_are_bit_exact_with_opencv(kind):
    rng = np.random.default_rng(["any", "integer", "small", "thin", "longest"].index(kind))
    mismatches = []
    for _ in range(CASES_PER_KIND):
        shape, size = random_sizes(kind, rng)
        image = random_image(rng, shape, int(rng.choice(CHANNELS)))
        expected, got = opencv_area(image, size), resize_area_uint8(image, size)
        assert got.shape == expected.shape
        if not np.array_equal(got, expected):
            diff = np.abs(got.astype(np.int16) - expected).max()
            mismatches.append((image.shape, size, int(diff)))
    assert mismatches == []


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 1), (256, 256)),
        ((20000, 20), (256, 1)),
        ((20, 20000), (1, 256)),
        ((3000, 1), (256, 1)),
        ((2, 5000), (1, 256)),
        ((7, 5), (1, 1)),
        ((700, 700), (1, 1)),
        ((1, 700), (700, 1)),
        ((255, 257), (256, 256)),
        ((100, 100), (99, 101)),
    ],
)
@pytest.mark.parametrize("channels", CHANNELS)
def test_edge_sizes_are_bit_exact_with_opencv(shape, size, channels):
    rng = np.random.default_rng(0)
    image = random_image(rng, shape, channels)
    np.testing.assert_array_equal(resize_area_uint8(image, size), opencv_area(image, size))


@pytest.mark.parametrize("factor", [(2, 2), (3, 3), (4, 4), (2, 1), (1, 3), (4, 2)])
@pytest.mark.parametrize("channels", CHANNELS)
def test_integer_factors_are_bit_exact_with_opencv(factor, channels):
    rng = np.random.default_rng(1)
    h, w = 37, 23
    for _ in range(3):
        image = random_image(rng, (h * factor[0], w * factor[1]), channels)
        np.testing.assert_array_equal(resize_area_uint8(image, (h, w)), opencv_area(image, (h, w)))


@pytest.mark.parametrize("channels", CHANNELS)
def test_2x2_blocks_round_half_up_except_with_two_channels(channels):
    shape = (2, 2) if channels == 0 else (2, 2, channels)
    image = np.zeros(shape, dtype=np.uint8)
    image[0, 0] = 2  # block sum 2: mean 0.5
    out = resize_area_uint8(image, (1, 1))
    assert out.shape == (1, 1, *shape[2:])
    assert (out == (0 if channels == 2 else 1)).all()  # 2 channels: saturate_cast, half to even
    np.testing.assert_array_equal(out, opencv_area(image, (1, 1)))


@pytest.mark.parametrize("channels", CHANNELS)
def test_identity_size_returns_an_equal_copy(channels):
    image = random_image(np.random.default_rng(2), (31, 17), channels)
    out = resize_area_uint8(image, (31, 17))
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out, opencv_area(image, (31, 17)))
    assert not np.shares_memory(out, image)


def test_2d_input_gives_2d_output():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert resize_area_uint8(image, (5, 2)).shape == (5, 2)


@pytest.mark.parametrize(
    ("image", "size"),
    [
        (np.zeros((4, 4), dtype=np.float32), (2, 2)),
        (np.zeros((4,), dtype=np.uint8), (2, 2)),
        (np.zeros((0, 4, 3), dtype=np.uint8), (2, 2)),
        (np.zeros((4, 4, 3), dtype=np.uint8), (0, 2)),
    ],
)
def test_bad_image_or_size_raises_value_error(image, size):
    with pytest.raises(ValueError):
        resize_area_uint8(image, size)


def test_importing_the_module_does_not_import_cv2():
    code = (
        "import sys; import amsam_jax.utils.resize as r; import numpy as np; "
        "r.resize_area_uint8(np.zeros((9, 7, 3), np.uint8), (4, 3)); "
        "assert 'cv2' not in sys.modules, 'cv2 imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
