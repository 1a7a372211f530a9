"""Tests of the one image reader, `amsam_jax.utils.image`: a file of every kind, built here."""

import builtins
import io
import os
import pickle
import struct
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile

from amsam_jax.utils import image as I
from amsam_jax.utils.errors import AmsamError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # (H, W) = (5, 7): orientation visible
GRAY = RNG.integers(0, 256, (5, 7), dtype=np.uint8)


@pytest.fixture(autouse=True)
def no_warnings_and_pil_state_kept():
    """Every test: no warning of any kind, and Pillow's global bomb limit as it was."""
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(I.MAX_PIXELS_ENV, raising=False)


def save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width, height, depth, color_type, rows=b"", before=b"", after=b"") -> bytes:
    """A PNG written by hand: any header (also impossible sizes), chunks around the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + before
        + png_chunk(b"IDAT", zlib.compress(rows))
        + after
        + png_chunk(b"IEND", b"")
    )


def png_rows(arr: np.ndarray) -> bytes:
    """Filter byte 0 + big-endian samples for every row of an (H, W[, C]) array."""
    arr = arr.astype(arr.dtype.newbyteorder(">"))
    return b"".join(b"\x00" + row.tobytes() for row in arr.reshape(arr.shape[0], -1))


def tiff_bytes(width, height, bits, photometric, data, extra=None) -> bytes:
    """A little-endian one-strip TIFF written by hand (for modes Pillow does not save)."""
    tags = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, list(bits)),
        (259, 3, [1]),
        (262, 3, [photometric]),
        (273, 4, [0]),  # strip offset, patched below
        (277, 3, [len(bits)]),
        (278, 4, [max(height, 1)]),
        (279, 4, [len(data)]),
    ]
    if extra is not None:
        tags.append((338, 3, list(extra)))
    blob_at = 8 + 2 + 12 * len(tags) + 4
    entries, blobs = b"", b""
    for tag, typ, values in tags:
        packed = struct.pack("<" + {3: "H", 4: "I"}[typ] * len(values), *values)
        if len(packed) <= 4:
            entries += struct.pack("<HHI", tag, typ, len(values)) + packed.ljust(4, b"\0")
        else:
            entries += struct.pack("<HHII", tag, typ, len(values), blob_at + len(blobs))
            blobs += packed
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + b"\0" * 4 + blobs)
    strip = 8 + 2 + 12 * 5 + 8  # value field of the 6th entry (273)
    out[strip : strip + 4] = struct.pack("<I", len(out))
    return bytes(out) + data


def exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


# Stored pixels S shown upright, per EXIF orientation (what `ImageOps.exif_transpose` does).
UPRIGHT = {
    1: lambda s: s,
    2: lambda s: s[:, ::-1],
    3: lambda s: np.rot90(s, 2),
    4: lambda s: s[::-1],
    5: lambda s: np.swapaxes(s, 0, 1),
    6: lambda s: np.rot90(s, -1),  # the camera was turned clockwise: rotate back clockwise
    7: lambda s: np.rot90(s, 2).swapaxes(0, 1),
    8: lambda s: np.rot90(s, 1),
}


def one_line_error(excinfo, label, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{label}: "), message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------------------------
# Modes


@pytest.mark.parametrize(
    "fmt, kwargs",
    [("png", {}), ("bmp", {}), ("tif", {}), ("webp", {"lossless": True})],
)
def test_rgb8_as_is(tmp_path, fmt, kwargs):
    path = save(Image.fromarray(RGB), tmp_path / f"a.{fmt}", **kwargs)
    out = I.read_image(path)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, RGB)
    assert out.flags.writeable and out.flags.c_contiguous


@pytest.mark.parametrize("fmt", ["png", "tif", "bmp"])
def test_gray_replicated(tmp_path, fmt):
    out = I.read_image(save(Image.fromarray(GRAY), tmp_path / f"a.{fmt}"))
    np.testing.assert_array_equal(out, np.repeat(GRAY[..., None], 3, axis=2))
    assert out.flags.writeable


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_one_bit_is_0_or_255(tmp_path, fmt):
    bits = GRAY > 127
    out = I.read_image(save(Image.fromarray(bits), tmp_path / f"a.{fmt}"))
    np.testing.assert_array_equal(out, np.repeat(bits[..., None], 3, axis=2) * 255)


PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 10], [7, 8, 9]], dtype=np.uint8)
INDICES = RNG.integers(0, 4, (5, 7), dtype=np.uint8)


def palette_image() -> Image.Image:
    img = Image.frombytes("P", (7, 5), INDICES.tobytes())
    img.putpalette(PALETTE.ravel().tolist())
    return img


@pytest.mark.parametrize(
    "transparency",
    [None, 1, bytes([255, 0, 128, 255])],  # none, one colour key, alpha per palette entry
    ids=["opaque", "key", "alpha-table"],
)
def test_palette_colours_without_warning(tmp_path, transparency):
    kwargs = {} if transparency is None else {"transparency": transparency}
    path = save(palette_image(), tmp_path / "a.png", **kwargs)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert (transparency is not None) == ("transparency" in img.info)
    np.testing.assert_array_equal(I.read_image(path), PALETTE[INDICES])


def test_palette_with_alpha_mode_pa():
    img = palette_image().convert("PA")  # no file format stores PA: the rule itself
    np.testing.assert_array_equal(I._to_rgb8(img, "x"), PALETTE[INDICES])


@pytest.mark.parametrize("fmt", ["png", "tif", "webp"])
def test_rgba_alpha_dropped_not_composited(tmp_path, fmt):
    alpha = np.zeros((5, 7), np.uint8)
    alpha[0] = 255
    alpha[1] = 77
    rgba = np.dstack([RGB, alpha])
    kwargs = {"lossless": True, "exact": True} if fmt == "webp" else {}
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / f"a.{fmt}", **kwargs)
    np.testing.assert_array_equal(I.read_image(path), RGB)


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_gray_alpha_dropped(tmp_path, fmt):
    la = np.dstack([GRAY, np.zeros_like(GRAY)])
    path = save(Image.fromarray(la, "LA"), tmp_path / f"a.{fmt}")
    np.testing.assert_array_equal(I.read_image(path), np.repeat(GRAY[..., None], 3, axis=2))


def test_rgbx_padding_dropped():
    img = Image.fromarray(np.dstack([RGB, np.full((5, 7), 9, np.uint8)]), "RGBA").convert("RGBX")
    np.testing.assert_array_equal(I._to_rgb8(img, "x"), RGB)


@pytest.mark.parametrize(
    "mode, fmt",
    [("CMYK", "jpg"), ("CMYK", "tif"), ("YCbCr", "tif"), ("LAB", "tif")],
)
def test_other_colour_spaces_by_pillow_conversion(tmp_path, mode, fmt):
    channels = len(mode) if mode != "YCbCr" else 3
    arr = RNG.integers(0, 256, (5, 7, channels), dtype=np.uint8)
    path = save(Image.fromarray(arr, mode), tmp_path / f"a.{fmt}")
    with Image.open(path) as img:
        assert img.mode == mode
        expected = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(I.read_image(path), expected)


def test_hsv_by_pillow_conversion():
    img = Image.fromarray(RGB, "RGB").convert("HSV")  # no file format stores HSV: the rule
    np.testing.assert_array_equal(I._to_rgb8(img, "x"), np.asarray(img.convert("RGB")))


# ----------------------------------------------------------------------------------------------
# 16-bit and float


V16 = np.array([[0, 1, 128, 129, 385, 386], [257, 514, 65278, 65406, 65407, 65535]], np.uint16)
V16_8 = np.array([[0, 0, 0, 1, 1, 2], [1, 2, 254, 254, 255, 255]], np.uint8)  # round(v / 257)


def test_round_of_v_over_257_reference():
    np.testing.assert_array_equal(np.round(V16 / 257), V16_8)


def test_16bit_times_257_is_exact(tmp_path):
    path = save(Image.fromarray(GRAY.astype(np.uint16) * 257), tmp_path / "a.png")
    with Image.open(path) as img:
        assert img.mode == "I;16"
    np.testing.assert_array_equal(I.read_image(path), np.repeat(GRAY[..., None], 3, axis=2))


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16bit_rounds(tmp_path, fmt):
    path = save(Image.fromarray(V16), tmp_path / f"a.{fmt}")
    np.testing.assert_array_equal(I.read_image(path)[..., 1], V16_8)


def test_16bit_big_endian_tiff(tmp_path):
    img = Image.frombytes("I;16B", (6, 2), V16.astype(">u2").tobytes())
    path = save(img, tmp_path / "a.tif")
    with Image.open(path) as opened:
        assert opened.mode == "I;16B"
    np.testing.assert_array_equal(I.read_image(path), np.repeat(V16_8[..., None], 3, axis=2))


@pytest.mark.parametrize("mode, dtype", [("I;16L", "<u2"), ("I;16N", "=u2"), ("I;16", "<u2")])
def test_16bit_modes_in_memory(mode, dtype):
    img = Image.frombytes(mode, (6, 2), V16.astype(dtype).tobytes())
    np.testing.assert_array_equal(I._to_rgb8(img, "x")[..., 2], V16_8)


def test_mode_i_clipped_to_16bit(tmp_path):
    values = np.array([[-5, 0, 257, 65535, 65536, 2**31 - 1]], np.int32)
    path = save(Image.fromarray(values), tmp_path / "a.tif")
    with Image.open(path) as img:
        assert img.mode == "I"
    np.testing.assert_array_equal(I.read_image(path)[0, :, 0], [0, 0, 1, 255, 255, 255])


def test_16bit_colour_png_keeps_pillows_high_byte(tmp_path):
    rgb16 = RGB.astype(np.uint16) * 256 + 200  # high byte RGB; round(v / 257) would differ
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(7, 5, 16, 2, png_rows(rgb16)))
    np.testing.assert_array_equal(I.read_image(path), RGB)


def test_float_in_unit_range(tmp_path):
    values = (np.arange(256, dtype=np.float32) / 255).reshape(16, 16)
    path = save(Image.fromarray(values), tmp_path / "a.tif")
    with Image.open(path) as img:
        assert img.mode == "F"
    out = I.read_image(path)
    np.testing.assert_array_equal(out[..., 0], np.arange(256).reshape(16, 16))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize(
    "bad, words",
    [
        (1.5, ["outside [0, 1]", "max 1.5"]),
        (-0.25, ["outside [0, 1]", "min -0.25"]),
        (255.0, ["outside [0, 1]"]),
        (np.nan, ["NaN or infinite"]),
        (np.inf, ["NaN or infinite"]),
    ],
)
def test_float_outside_unit_range_is_an_error(tmp_path, bad, words):
    values = np.full((3, 4), 0.5, np.float32)
    values[1, 2] = bad
    path = save(Image.fromarray(values), tmp_path / "a.tif")
    with pytest.raises(I.ImageReadError) as e:
        I.read_image(path)
    one_line_error(e, str(path), "float image", "save it as 8- or 16-bit", *words)


def test_unsupported_mode_is_named(tmp_path):
    path = tmp_path / "premultiplied.tif"  # gray + premultiplied alpha: Pillow mode "La"
    path.write_bytes(tiff_bytes(3, 2, [8, 8], 1, bytes(12), extra=[1]))
    for read in (I.read_image, I.image_size):
        with pytest.raises(I.ImageReadError) as e:
            read(path)
        one_line_error(e, str(path), "unsupported image mode La")
    with pytest.raises(I.ImageReadError) as e:
        I.read_mask_values(path)
    one_line_error(e, str(path), "unsupported mask mode La")


# ----------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_orientations_png(tmp_path, orientation):
    path = save(Image.fromarray(RGB), tmp_path / "a.png", exif=exif(orientation))
    expected = UPRIGHT[orientation](RGB)
    np.testing.assert_array_equal(I.read_image(path), expected)
    assert I.image_size(path) == expected.shape[:2]


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt, kwargs", [("tif", {}), ("webp", {"lossless": True})])
def test_orientations_lossless_formats(tmp_path, fmt, kwargs, orientation):
    path = save(Image.fromarray(RGB), tmp_path / f"a.{fmt}", exif=exif(orientation), **kwargs)
    expected = {3: np.rot90(RGB, 2), 6: np.rot90(RGB, -1), 8: np.rot90(RGB, 1)}[orientation]
    np.testing.assert_array_equal(I.read_image(path), expected)
    assert I.image_size(path) == expected.shape[:2]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientations_jpeg(tmp_path, orientation):
    path = save(Image.fromarray(RGB), tmp_path / "a.jpg", exif=exif(orientation), quality=95)
    with Image.open(path) as img:  # same decoder, stored orientation
        stored = np.asarray(img.convert("RGB"))
    expected = {3: np.rot90(stored, 2), 6: np.rot90(stored, -1), 8: np.rot90(stored, 1)}
    np.testing.assert_array_equal(I.read_image(path), expected[orientation])
    assert I.image_size(path) == expected[orientation].shape[:2]


@pytest.mark.parametrize("orientation", [6, 8])
def test_orientation_in_exif_after_the_png_pixels(tmp_path, orientation):
    path = tmp_path / "late.png"
    late = png_chunk(b"eXIf", exif(orientation).tobytes())
    path.write_bytes(png_bytes(7, 5, 8, 2, png_rows(RGB), after=late))
    expected = UPRIGHT[orientation](RGB)
    np.testing.assert_array_equal(I.read_image(path), expected)
    assert I.image_size(path) == expected.shape[:2] == (7, 5)


def xmp_chunk(orientation: int) -> bytes:
    xmp = f'<x:xmpmeta><rdf:RDF><rdf:Description tiff:Orientation="{orientation}"/></rdf:RDF>'
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode() + b"</x:xmpmeta>")


@pytest.mark.parametrize("where", ["before", "after"])
def test_orientation_in_png_xmp(tmp_path, where):
    path = tmp_path / "xmp.png"
    path.write_bytes(png_bytes(7, 5, 8, 2, png_rows(RGB), **{where: xmp_chunk(6)}))
    np.testing.assert_array_equal(I.read_image(path), np.rot90(RGB, -1))
    assert I.image_size(path) == (7, 5)


def test_image_size_reads_no_pixels(tmp_path, monkeypatch):
    late_exif = png_chunk(b"eXIf", exif(6).tobytes())
    late_comment = png_chunk(b"tEXt", b"Comment\0made by hand") + png_chunk(b"tIME", bytes(7))
    (tmp_path / "g.png").write_bytes(png_bytes(7, 5, 8, 2, png_rows(RGB), after=late_exif))
    (tmp_path / "h.png").write_bytes(png_bytes(7, 5, 8, 2, png_rows(RGB), after=late_comment))
    (tmp_path / "i.png").write_bytes(png_bytes(7, 5, 8, 2, png_rows(RGB), before=xmp_chunk(8)))
    paths = [
        save(Image.fromarray(RGB), tmp_path / "a.png"),
        save(Image.fromarray(RGB), tmp_path / "b.png", exif=exif(6)),
        save(Image.fromarray(RGB), tmp_path / "c.jpg", exif=exif(8)),
        save(Image.fromarray(RGB), tmp_path / "d.tif", exif=exif(6)),
        save(Image.fromarray(RGB), tmp_path / "e.webp", exif=exif(5)),
        save(Image.fromarray(GRAY), tmp_path / "f.bmp"),
    ]

    def no_decoding(self):
        raise AssertionError("image_size decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    paths += [tmp_path / "g.png", tmp_path / "h.png", tmp_path / "i.png"]
    sizes = [I.image_size(p) for p in paths]
    assert sizes == [(5, 7), (7, 5), (7, 5), (7, 5), (7, 5), (5, 7), (7, 5), (5, 7), (7, 5)]


def test_image_size_is_header_only_for_damaged_pixels(tmp_path):
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert I.image_size(path) == (64, 64)
    with pytest.raises(I.ImageReadError):
        I.read_image(path)


# ----------------------------------------------------------------------------------------------
# Size limit and Pillow's decompression-bomb check


def test_limit_from_the_header(tmp_path):
    path = save(Image.fromarray(RGB), tmp_path / "a.png")  # 7 x 5 = 35 pixels
    assert I.read_image(path, max_pixels=35).shape == (5, 7, 3)
    assert I.read_image(path, max_pixels=0).shape == (5, 7, 3)
    with pytest.raises(I.ImageReadError) as e:
        I.read_image(path, max_pixels=34)
    one_line_error(e, str(path), "image too large", "7x5", "35 pixels", "limit of 34", "max_pixels")
    with pytest.raises(I.ImageReadError) as e:
        I.read_mask_values(path, max_pixels=34)
    one_line_error(e, str(path), "mask too large", "7x5")


def test_limit_from_the_environment(tmp_path, monkeypatch):
    path = save(Image.fromarray(RGB), tmp_path / "a.png")
    monkeypatch.setenv(I.MAX_PIXELS_ENV, "34")
    assert I.max_image_pixels() == 34
    with pytest.raises(I.ImageReadError) as e:
        I.read_image(path)
    one_line_error(e, str(path), "7x5", "limit of 34", f"set {I.MAX_PIXELS_ENV}", "0 = no limit")
    assert I.read_image(path, max_pixels=35).shape == (5, 7, 3)  # the argument wins
    monkeypatch.setenv(I.MAX_PIXELS_ENV, " 35 ")
    assert I.read_image(path).shape == (5, 7, 3)
    monkeypatch.setenv(I.MAX_PIXELS_ENV, "0")
    assert I.max_image_pixels() == 0
    assert I.read_image(path).shape == (5, 7, 3)


@pytest.mark.parametrize("value", ["", None])
def test_limit_default(monkeypatch, value):
    if value is not None:
        monkeypatch.setenv(I.MAX_PIXELS_ENV, value)
    assert I.max_image_pixels() == I.DEFAULT_MAX_IMAGE_PIXELS == 178_956_970


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "1e6", "10 MP"])
def test_limit_invalid_setting(tmp_path, monkeypatch, value):
    path = save(Image.fromarray(RGB), tmp_path / "a.png")
    monkeypatch.setenv(I.MAX_PIXELS_ENV, value)
    for call in (I.max_image_pixels, lambda: I.read_image(path), lambda: I.read_mask_values(path)):
        with pytest.raises(I.ImageReadError) as e:
            call()
        one_line_error(e, I.MAX_PIXELS_ENV, "invalid value", repr(value), "0 = no limit")
    assert I.read_image(path, max_pixels=100).shape == (5, 7, 3)  # an explicit limit


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_limit_argument_checked(tmp_path, bad):
    path = save(Image.fromarray(RGB), tmp_path / "a.png")
    with pytest.raises(ValueError, match="max_pixels"):
        I.read_image(path, max_pixels=bad)


def huge_png(tmp_path):
    """A PNG header claiming 100000 x 100000 pixels (10 GP, 56x Pillow's bomb error level)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(100_000, 100_000, 8, 0, b"\x00" * 1000))
    return path


def test_huge_header_is_our_error_not_pillows(tmp_path):
    path = huge_png(tmp_path)
    for read, kind in ((I.read_image, "image"), (I.read_mask_values, "mask")):
        with pytest.raises(I.ImageReadError) as e:
            read(path)
        one_line_error(e, str(path), f"{kind} too large", "100000x100000", "178,956,970")
        assert "decompression bomb" not in str(e.value).lower()
    assert I.image_size(path) == (100_000, 100_000)  # no limit on the header-only size


@pytest.mark.parametrize("fmt", ["png", "jpg", "tif", "webp", "bmp"])
def test_pillow_bomb_limit_neither_warns_nor_wins(tmp_path, fmt):
    path = save(Image.fromarray(RGB), tmp_path / f"a.{fmt}")
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 10  # Pillow alone: warns over 10 pixels, errors over 20
    try:
        assert I.read_image(path).shape == (5, 7, 3)
        assert I.read_mask_values(path).shape == (5, 7)
        assert I.image_size(path) == (5, 7)
        assert Image.MAX_IMAGE_PIXELS == 10
        with pytest.raises(I.ImageReadError) as e:
            I.read_image(path, max_pixels=30)
        one_line_error(e, str(path), "image too large", "limit of 30")
        assert Image.MAX_IMAGE_PIXELS == 10
    finally:
        Image.MAX_IMAGE_PIXELS = before


def test_pillow_limit_restored_with_threads(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    paths = [save(Image.fromarray(RGB), tmp_path / f"{i}.png") for i in range(8)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        for _ in range(20):
            assert I.read_image(paths[i % 8]).shape == (5, 7, 3)
            with pytest.raises(I.ImageReadError):
                I.read_image(bad)
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("size", [(20000, 20), (20, 20000), (1, 1)])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_thin_images(tmp_path, size, fmt):
    w, h = size
    arr = np.full((h, w, 3), (10, 200, 30), np.uint8)
    path = save(
        Image.fromarray(arr), tmp_path / f"thin.{fmt}", **({"quality": 95} if fmt == "jpg" else {})
    )
    out = I.read_image(path)
    assert out.shape == (h, w, 3)
    assert I.image_size(path) == (h, w)
    if fmt == "png":
        np.testing.assert_array_equal(out, arr)
    else:
        assert np.abs(out.astype(int) - arr).max() <= 3


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    for read in (I.read_image, I.read_mask_values, I.image_size):
        with pytest.raises(I.ImageReadError) as e:
            read(path)
        one_line_error(e, str(path), "no such file")
        assert e.value.path == str(path) and e.value.problem == "no such file"


def test_directory(tmp_path):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    for read, kind in ((I.read_image, "image"), (I.read_mask_values, "mask"), (I.image_size, "")):
        with pytest.raises(I.ImageReadError) as e:
            read(folder)
        one_line_error(e, str(folder), "is a directory, not a", kind)


def good_png() -> bytes:
    return encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")


def good_jpeg() -> bytes:
    return encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")


def flip_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["cannot read image (empty file)"]),
        (b"hello, world\n", ["cannot read image (not an image"]),
        (b"%PDF-1.4\n" + b"x" * 200, ["cannot read image (not an image"]),
        (good_png()[:30], ["cannot read image (PNG file with a damaged, truncated"]),
        (good_png()[: len(good_png()) // 2], ["cannot read image (", "truncated"]),
        (good_jpeg()[:300], ["cannot read image (", "runcated"]),
        (flip_middle(good_png()), ["cannot read image ("]),
        (b"BM" + b"\0" * 60, ["cannot read image (", "BMP"]),
        (png_bytes(0, 5, 8, 0), ["empty image (0x5 pixels)"]),
        (png_bytes(5, 0, 8, 0), ["empty image (5x0 pixels)"]),
    ],
    ids=[
        "empty",
        "text",
        "pdf",
        "cut-header",
        "truncated-png",
        "truncated-jpeg",
        "corrupt-png",
        "bad-bmp",
        "zero-width",
        "zero-height",
    ],
)
def test_unreadable_files(tmp_path, content, words):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(I.ImageReadError) as e:
        I.read_image(path)
    one_line_error(e, str(path), *words)
    with pytest.raises(I.ImageReadError) as e:  # the same bytes, named
        I.read_image(content, name="upload.png")
    one_line_error(e, "upload.png", *words)
    with pytest.raises(I.ImageReadError) as e:
        I.read_mask_values(path)
    one_line_error(
        e, str(path), *(w.replace("d image", "d mask").replace("y image", "y mask") for w in words)
    )


def test_unreadable_permissions(tmp_path, monkeypatch):
    """A file the process may not read (simulated: root reads every file, chmod cannot show it)."""
    path = save(Image.fromarray(RGB), tmp_path / "a.png")
    real_open = builtins.open

    def open_denied(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denied)
    with pytest.raises(I.ImageReadError) as e:
        I.read_image(path)
    one_line_error(e, str(path), "cannot read image (Permission denied)")


def test_error_is_one_amsam_error_and_pickles():
    e = I.ImageReadError("a/b.png", "cannot read image (x)\nsecond line")
    assert isinstance(e, AmsamError)
    assert str(e) == "a/b.png: cannot read image (x)"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is I.ImageReadError
    assert (back.path, back.problem, str(back)) == (e.path, e.problem, str(e))
    assert issubclass(I.FolderError, I.ImageReadError)


# ----------------------------------------------------------------------------------------------
# Bytes input


def test_bytes_equal_path(tmp_path):
    path = save(Image.fromarray(RGB), tmp_path / "a.png", exif=exif(6))
    data = path.read_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(I.read_image(source), I.read_image(path))
        assert I.image_size(source) == (7, 5)
        np.testing.assert_array_equal(I.read_mask_values(source), np.rot90(RGB[..., 0], -1))


def test_bytes_names_in_errors():
    with pytest.raises(I.ImageReadError) as e:
        I.read_image(b"junk")
    one_line_error(e, "<bytes>", "cannot read image")
    with pytest.raises(I.ImageReadError) as e:
        I.read_image(b"junk", name="photos/x.jpg")
    one_line_error(e, "photos/x.jpg", "cannot read image")
    with pytest.raises(I.ImageReadError) as e:
        I.image_size(b"junk", name="photos/x.jpg")
    one_line_error(e, "photos/x.jpg", "cannot read image")


def test_source_type_checked():
    with pytest.raises(TypeError, match="path or bytes"):
        I.read_image(np.zeros((2, 2, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# Masks


def test_mask_8bit(tmp_path):
    out = I.read_mask_values(save(Image.fromarray(GRAY), tmp_path / "m.png"))
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, GRAY)


@pytest.mark.parametrize("fmt, mode", [("png", "I;16"), ("tif", "I;16"), ("tif", "I;16B")])
def test_mask_16bit(tmp_path, fmt, mode):
    img = Image.frombytes(
        mode, (6, 2), V16.astype(">u2" if mode.endswith("B") else "<u2").tobytes()
    )
    out = I.read_mask_values(save(img, tmp_path / f"m.{fmt}"))
    assert out.dtype == np.uint16 and out.dtype.isnative
    np.testing.assert_array_equal(out, V16)


def test_mask_palette_indices(tmp_path):
    path = save(palette_image(), tmp_path / "m.png", transparency=0)
    np.testing.assert_array_equal(I.read_mask_values(path), INDICES)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_mask_first_channel(tmp_path, mode):
    arr = RNG.integers(0, 256, (5, 7, len(mode)), dtype=np.uint8)
    out = I.read_mask_values(save(Image.fromarray(arr, mode), tmp_path / "m.png"))
    np.testing.assert_array_equal(out, arr[..., 0])


def test_mask_1bit_and_float_and_int(tmp_path):
    bits = GRAY > 100
    out = I.read_mask_values(save(Image.fromarray(bits), tmp_path / "b.png"))
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, bits)
    floats = np.array([[0.0, 2.5, -1.0]], np.float32)  # values, not pixels: no range rule
    np.testing.assert_array_equal(
        I.read_mask_values(save(Image.fromarray(floats), tmp_path / "f.tif")), floats
    )
    ints = np.array([[0, 70000, -3]], np.int32)
    np.testing.assert_array_equal(
        I.read_mask_values(save(Image.fromarray(ints), tmp_path / "i.tif")), ints
    )


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_mask_exif_rotated(tmp_path, orientation):
    path = save(Image.fromarray(GRAY), tmp_path / "m.png", exif=exif(orientation))
    np.testing.assert_array_equal(I.read_mask_values(path), UPRIGHT[orientation](GRAY))


# ----------------------------------------------------------------------------------------------
# Folders


def touch_image(path):
    Image.new("L", (2, 2)).save(path, format="PNG")  # content irrelevant: only names count


def test_list_images_order_and_filter(tmp_path):
    names = ["2.jpg", "10.jpg", "1.jpg", "b.png", "B.TIFF", "a.WebP", "c.bmp", "d.jpeg", "e.tif"]
    for n in names:
        touch_image(tmp_path / n)
    for n in [".DS_Store", "Thumbs.db", "THUMBS.DB", "desktop.ini", "._1.jpg", "._x.png"]:
        (tmp_path / n).write_bytes(b"\0\5junk")
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "notes.png.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()
    found = I.list_images(tmp_path)
    assert [p.name for p in found] == sorted(names)  # plain string order
    assert [p.name for p in found][:4] == ["1.jpg", "10.jpg", "2.jpg", "B.TIFF"]
    assert all(p.parent == tmp_path for p in found)


@pytest.mark.parametrize(
    "name, junk",
    [
        (".DS_Store", True),
        ("thumbs.db", True),
        ("Desktop.ini", True),
        ("._photo.jpg", True),
        ("photo.jpg", False),
        (".hidden.png", False),
        ("_a.png", False),
    ],
)
def test_is_junk(name, junk):
    assert I.is_junk(name) is junk


def test_list_images_missing_and_not_a_folder(tmp_path):
    with pytest.raises(I.FolderError) as e:
        I.list_images(tmp_path / "nope")
    one_line_error(e, str(tmp_path / "nope"), "no such folder")
    file = tmp_path / "f.png"
    touch_image(file)
    with pytest.raises(I.ImageReadError) as e:
        I.list_images(file)
    one_line_error(e, str(file), "not a folder")


@pytest.mark.parametrize("contents", [[], [".DS_Store", "._a.png", "a.txt"]], ids=["empty", "junk"])
def test_list_images_no_images(tmp_path, contents):
    for n in contents:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    with pytest.raises(I.FolderError) as e:
        I.list_images(tmp_path)
    one_line_error(e, str(tmp_path), "no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp)")


def test_list_images_duplicate_stem(tmp_path):
    for n in ["a.png", "x.jpg", "x.PNG", "z.png"]:
        touch_image(tmp_path / n)
    with pytest.raises(I.FolderError) as e:
        I.list_images(tmp_path)
    one_line_error(e, str(tmp_path / "x.jpg"), "duplicate image stem 'x'", "also x.PNG")


def test_suffixes_and_junk_constants():
    assert I.IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    assert all(s == s.lower() for s in I.IMAGE_SUFFIXES)
    assert {".DS_Store", "Thumbs.db", "desktop.ini"} <= I.JUNK_NAMES
