"""The one image and mask reader of amsam_jax: pixels, sizes and folder listings, one set of rules.

`read_image` turns every file Pillow can open into upright (H, W, 3) uint8 RGB by one rule per
mode: 8-bit RGB as is (RGBX: padding dropped); L and 1-bit replicated to 3 channels; palette P/PA
(also with transparency) through RGBA, alpha dropped; RGBA/LA: alpha dropped, never composited;
CMYK, YCbCr, LAB and HSV by Pillow's conversion to RGB; 16-bit integer (I;16, I;16B, I;16L,
I;16N and 32-bit I, clipped to 0..65535) as round(v / 257); float F only when every value is
finite and in [0, 1], as round(255 * v); any other mode is an error. The EXIF orientation
(also XMP `tiff:Orientation`) is applied before anything else, and `image_size` reports the same
upright (H, W) from the header. Sizes are checked from the header before decoding against one
limit, `max_image_pixels()` (`AMSAM_MAX_IMAGE_PIXELS`); Pillow's own decompression-bomb check is
switched off while a file is read, so it neither warns nor disagrees. Every problem is an
`ImageReadError` whose `str()` is one line, `<path>: <problem>`.
"""

import contextlib
import io
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from amsam_jax.utils.errors import AmsamError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# OS bookkeeping files that are never images (compared case-insensitively), and AppleDouble
# `._<name>` resource forks that macOS writes next to every file on foreign file systems.
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
JUNK_PREFIXES = ("._",)
MAX_PIXELS_ENV = "AMSAM_MAX_IMAGE_PIXELS"
# Pillow's own error threshold (2 x its 89 MP warning level): about 13377 x 13377 pixels.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

Source = str | os.PathLike | bytes | bytearray | memoryview

_UINT16 = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_AS_RGB = ("RGB", "RGBX", "RGBA", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
SUPPORTED_MODES = (*_AS_RGB, *_UINT16, "F")
# Errors Pillow (and its plugins, on damaged files) raise while identifying or decoding a file.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    ArithmeticError,
    struct.error,
    MemoryError,
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = (
    (_PNG_SIGNATURE, "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP"),
    (b"GIF8", "GIF"),
)
# Text chunks, and the keywords of those Pillow reads an orientation from (XMP, raw EXIF).
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PNG_ORIENTATION_KEYWORDS = (b"XML:com.adobe.xmp", b"Raw profile type exif")
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that transpose the image

_bomb_lock = threading.Lock()
_bomb_depth = 0
_bomb_saved: int | None = None


class ImageReadError(AmsamError):
    """An image, mask, folder or setting that cannot be used; `str()` is `<path>: <problem>`.

    Args:
        path: the file, folder or environment variable at fault.
        problem: what is wrong (one line; only the first line is kept).

    Attributes:
        path: `str(path)`.
        problem: the problem.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(os.fspath(path) if isinstance(path, os.PathLike) else str(path), problem)

    def __reduce__(self):  # pickles (worker processes) as (path, problem), not as the message
        return type(self), (self.path, self.problem)


class FolderError(ImageReadError):
    """A folder of images that cannot be used (missing, empty, duplicate stems)."""


# ----------------------------------------------------------------------------------------------
# Settings


def max_image_pixels() -> int:
    """The pixel limit of every read: `AMSAM_MAX_IMAGE_PIXELS` if set, else the default.

    Returns:
        The largest W * H that is decoded; 0 means no limit. An unset or empty variable gives
        `DEFAULT_MAX_IMAGE_PIXELS` (178_956_970, about 13377 x 13377).

    Raises:
        ImageReadError: the variable is not a whole number >= 0 (the error names the variable).
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ImageReadError(
            MAX_PIXELS_ENV,
            f"invalid value {raw!r}; expected a whole number of pixels, 0 = no limit",
        )
    return value


def _limit(max_pixels: int | None) -> tuple[int, str]:
    """The limit to apply and how to change it, for the error message."""
    if max_pixels is None:
        return max_image_pixels(), f"set {MAX_PIXELS_ENV} to change it, 0 = no limit"
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(f"max_pixels must be an int >= 0 (0 = no limit), not {max_pixels!r}")
    return max_pixels, "the max_pixels argument; 0 = no limit"


def is_junk(name: str) -> bool:
    """Whether a file name is OS bookkeeping that is never an image (`.DS_Store`, `._x.jpg`).

    Args:
        name: a file name (not a path).

    Returns:
        True for `JUNK_NAMES` (any case) and names starting with a `JUNK_PREFIXES` entry.
    """
    lower = name.lower()
    return lower in {n.lower() for n in JUNK_NAMES} or name.startswith(JUNK_PREFIXES)


# ----------------------------------------------------------------------------------------------
# Opening


@contextlib.contextmanager
def _without_pil_bomb_check() -> Iterator[None]:
    """Switches Pillow's decompression-bomb check off for the block; our limit is the only one.

    `Image.MAX_IMAGE_PIXELS` is a process-wide setting: it is None while at least one read (of
    any thread) is inside the block, and its previous value is back when the last one leaves.
    """
    global _bomb_depth, _bomb_saved
    with _bomb_lock:
        if _bomb_depth == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _bomb_depth += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_depth -= 1
            if _bomb_depth == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


def _describe(error: BaseException, head: bytes = b"") -> str:
    """One line for a Pillow or OS error, without the file name that the message starts with.

    `head` (the first bytes of the file) names the format when Pillow cannot identify a file
    that starts like a known one (a damaged, truncated or unsupported header).
    """
    if isinstance(error, UnidentifiedImageError):
        for signature, fmt in _SIGNATURES:
            if head.startswith(signature) and (fmt != "WebP" or head[8:12] == b"WEBP"):
                return f"{fmt} file with a damaged, truncated or unsupported header"
        return "not an image, or a format Pillow cannot open"
    if isinstance(error, MemoryError):
        return "out of memory"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _png_header_size(head: bytes) -> tuple[int, int] | None:
    """(W, H) from a PNG's IHDR chunk, or None if `head` does not start like a PNG."""
    if len(head) >= 24 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def _label(source: Source, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    return os.fspath(source) if isinstance(source, os.PathLike) else str(source)


@contextlib.contextmanager
def _opened(source: Source, label: str, kind: str) -> Iterator[Image.Image]:
    """Opens a path or encoded bytes with Pillow (header only) and maps every failure, also in
    the block, to one `ImageReadError` line; `kind` ("image" or "mask") words the messages."""
    article = "an" if kind[0] in "aeiou" else "a"
    with contextlib.ExitStack() as stack:
        if isinstance(source, bytes | bytearray | memoryview):
            fp: io.IOBase = io.BytesIO(bytes(source))
        elif isinstance(source, str | os.PathLike):
            if os.path.isdir(source):
                raise ImageReadError(label, f"is a directory, not {article} {kind}")
            try:
                fp = stack.enter_context(open(source, "rb"))  # closed by the stack
            except FileNotFoundError:
                raise ImageReadError(label, "no such file") from None
            except OSError as e:
                raise ImageReadError(label, f"cannot read {kind} ({_describe(e)})") from None
        else:
            raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
        if fp.seek(0, io.SEEK_END) == 0:
            raise ImageReadError(label, f"cannot read {kind} (empty file)")
        fp.seek(0)
        head = fp.read(32)
        fp.seek(0)
        size = _png_header_size(head)
        if size is not None and 0 in size:  # Pillow refuses these as unidentified
            raise ImageReadError(label, f"empty {kind} ({size[0]}x{size[1]} pixels)")
        stack.enter_context(_without_pil_bomb_check())
        try:
            img = stack.enter_context(Image.open(fp))
            yield img
        except Image.DecompressionBombError as e:  # not raised while the check is off
            raise ImageReadError(label, f"{kind} too large ({_describe(e)})") from None
        except _DECODE_ERRORS as e:
            raise ImageReadError(label, f"cannot read {kind} ({_describe(e, head)})") from None


def _check_size(img: Image.Image, label: str, kind: str, limit: int, change: str) -> None:
    """Refuses a 0-pixel image, and one over the limit (0 = none) before any pixel is decoded."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageReadError(label, f"empty {kind} ({w}x{h} pixels)")
    if limit and w * h > limit:
        raise ImageReadError(
            label,
            f"{kind} too large: {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} "
            f"pixels ({change})",
        )


def _png_late_metadata(fp) -> tuple[bytes | None, bool]:
    """Metadata after a PNG's pixel data, found by seeking over the chunks (nothing decoded).

    Pillow reads such chunks only when it decodes the pixels. Returns the data of an eXIf chunk
    there (None if none), and whether a text chunk there may hold an orientation (XMP or an
    ImageMagick raw EXIF profile).
    """
    position = fp.tell()
    try:
        fp.seek(len(_PNG_SIGNATURE))
        seen_data, late_exif, late_text = False, None, False
        while len(header := fp.read(8)) == 8:
            length, chunk = struct.unpack(">I4s", header)
            if chunk == b"IEND":
                break
            if chunk in (b"IDAT", b"fdAT"):
                seen_data = True
            elif seen_data and chunk == b"eXIf":
                late_exif = fp.read(length)
                length -= len(late_exif)
            elif seen_data and chunk in _PNG_TEXT_CHUNKS:
                keyword = fp.read(min(length, 80))
                late_text |= keyword.split(b"\0")[0] in _PNG_ORIENTATION_KEYWORDS
                length -= len(keyword)
            fp.seek(length + 4, io.SEEK_CUR)  # the rest of the data, and the CRC
        return late_exif, late_text
    finally:
        fp.seek(position)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) that `ImageOps.exif_transpose` applies after decoding."""
    if img.format == "PNG" and "exif" not in img.info:
        late_exif, late_text = _png_late_metadata(img.fp)
        if late_text:
            exif = img.getexif()  # rare: Pillow decodes the pixels to read these chunks
        else:
            if late_exif is not None:  # as Pillow's PNG plugin stores it
                img.info["exif"] = b"Exif\x00\x00" + late_exif
            exif = Image.Image.getexif(img)  # PngImageFile.getexif would decode the pixels
    else:
        exif = img.getexif()
    orientation = exif.get(ExifTags.Base.Orientation, 1)
    return orientation if isinstance(orientation, int) else 1


def _check_mode(img: Image.Image, label: str, kind: str) -> None:
    if img.mode not in SUPPORTED_MODES:
        raise ImageReadError(label, f"unsupported {kind} mode {img.mode}")


# ----------------------------------------------------------------------------------------------
# Reading


def read_image(
    source: Source, *, name: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Reads an image file (path or encoded bytes) as upright uint8 RGB.

    Rules, by the mode Pillow opens the file in (the first frame of multi-frame files):

    - RGB as is; RGBX: the padding channel dropped.
    - L and 1 (1-bit: 0 / 255): the gray value replicated to 3 channels.
    - P and PA, also with transparency: the palette colours (through RGBA, so Pillow does not
      warn), alpha dropped.
    - RGBA and LA: alpha dropped, colours kept as stored (no compositing on a background).
    - CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
    - I;16, I;16B, I;16L, I;16N and I (32-bit integer, clipped to 0..65535 first): gray
      round(v / 257) replicated to 3 channels, so an 8-bit image saved as 16-bit by x257 comes
      back exactly. Pillow opens 16-bit colour PNGs (and 16-bit gray+alpha) as 8-bit RGB(A)
      itself, keeping the high byte (v >> 8, which also inverts x257 exactly).
    - F (32-bit float): every value finite and in [0, 1], read as round(255 * v); else an error.
    - Any other mode is an error naming it.

    The EXIF orientation is applied first (all 8 orientations; see `image_size`). The size is
    checked from the header before any pixel is decoded; Pillow's own decompression-bomb check
    is off during the read (and `Image.MAX_IMAGE_PIXELS` restored afterwards), so that this
    limit is the only one and nothing warns.

    Args:
        source: a path, or the encoded file as bytes (a `bytes` value is always file content,
            never a path).
        name: the file name in error messages (default: the path, or "<bytes>").
        max_pixels: refuse images with more than this many pixels (W * H); 0 = no limit.
            Default: `max_image_pixels()`, the `AMSAM_MAX_IMAGE_PIXELS` setting.

    Returns:
        (H, W, 3) uint8 RGB, C-contiguous and writable.

    Raises:
        ImageReadError: one line `<name>: <problem>`: no such file; is a directory, not an
            image; cannot read image (...) for an empty, unreadable, truncated, corrupt or
            non-image file; empty image (0 pixels); image too large (W x H over the limit);
            a float image with NaN/Inf or values outside [0, 1]; unsupported image mode; an
            invalid `AMSAM_MAX_IMAGE_PIXELS` (then the variable is named instead of the file).
        TypeError: `source` is neither a path nor bytes.
        ValueError: `max_pixels` is not an int >= 0.
    """
    limit, change = _limit(max_pixels)  # an invalid setting fails before the file is opened
    label = _label(source, name)
    with _opened(source, label, "image") as img:
        _check_size(img, label, "image", limit, change)
        _check_mode(img, label, "image")
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb8(img, label)


def _to_rgb8(img: Image.Image, label: str) -> np.ndarray:
    """Applies the mode rules of `read_image` to a loaded, upright image."""
    mode = img.mode
    if mode in _UINT16:
        v = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        return _gray_to_rgb(((v + 128) // 257).astype(np.uint8))  # exactly round(v / 257)
    if mode == "F":
        v = np.asarray(img, dtype=np.float64)
        if not np.isfinite(v).all():
            raise ImageReadError(
                label, "float image with NaN or infinite values; save it as 8- or 16-bit"
            )
        lo, hi = float(v.min()), float(v.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageReadError(
                label,
                f"float image with values outside [0, 1] (min {lo:g}, max {hi:g}); "
                "save it as 8- or 16-bit",
            )
        return _gray_to_rgb(np.rint(v * 255.0).astype(np.uint8))
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode in ("RGBA", "RGBX"):
        return np.ascontiguousarray(np.asarray(img)[..., :3])
    if mode == "L":
        return _gray_to_rgb(np.asarray(img))
    if mode == "1":
        return _gray_to_rgb(np.asarray(img).astype(np.uint8) * 255)
    if mode == "LA":
        return _gray_to_rgb(np.asarray(img)[..., 0])
    if mode in ("P", "PA"):
        return np.ascontiguousarray(np.asarray(img.convert("RGBA"))[..., :3])
    if mode in _AS_RGB:  # CMYK, YCbCr, LAB, HSV
        return np.array(img.convert("RGB"), dtype=np.uint8)
    raise ImageReadError(label, f"unsupported image mode {mode}")


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray.astype(np.uint8, copy=False)[:, :, None], 3, axis=2)


def read_mask_values(
    source: Source, *, name: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Reads the stored values of a mask file (path or encoded bytes), upright.

    No scaling: L and palette masks give their bytes (P: the palette indices, not colours),
    16-bit masks their 16-bit values, 1-bit masks bools; for several channels (RGB, RGBA, LA,
    PA, CMYK, ...) the first one. The EXIF orientation, the size limit and the errors are those
    of `read_image`, worded "mask".

    Args:
        source: a path, or the encoded file as bytes.
        name: the file name in error messages (default: the path, or "<bytes>").
        max_pixels: refuse masks with more than this many pixels; 0 = no limit. Default:
            `max_image_pixels()`.

    Returns:
        (H, W) array, writable: bool (mode 1), uint8 (L, P, RGB, ...), uint16 (I;16*),
        int32 (I) or float32 (F).

    Raises:
        ImageReadError: as `read_image` (no such file, is a directory, not a mask, cannot read
            mask (...), empty mask, mask too large, unsupported mask mode).
        TypeError: `source` is neither a path nor bytes.
        ValueError: `max_pixels` is not an int >= 0.
    """
    limit, change = _limit(max_pixels)
    label = _label(source, name)
    with _opened(source, label, "mask") as img:
        _check_size(img, label, "mask", limit, change)
        _check_mode(img, label, "mask")
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        values = np.asarray(img)
    if values.ndim == 3:
        values = values[..., 0]
    if not values.dtype.isnative:  # I;16B
        values = values.astype(values.dtype.newbyteorder("="))
    return np.array(values, order="C")  # a copy: Pillow's arrays are read-only


def image_size(source: Source, *, name: str | None = None) -> tuple[int, int]:
    """The (H, W) that `read_image` would return, upright, from the file header only.

    Only the header is read (PNG: plus a seek over the chunk headers, for EXIF after the pixel
    data; only a PNG with XMP or a raw EXIF profile after its pixel data is decoded, as Pillow
    reads those only then).
    The size limit is not applied, and a file whose header is fine but whose pixel data is
    damaged gets its size here and an error from `read_image`.

    Args:
        source: a path, or the encoded file as bytes.
        name: the file name in error messages (default: the path, or "<bytes>").

    Returns:
        (H, W) after the EXIF orientation (swapped for orientations 5 to 8).

    Raises:
        ImageReadError: no such file; is a directory, not an image; cannot read image (...);
            empty image (0 pixels); unsupported image mode.
        TypeError: `source` is neither a path nor bytes.
    """
    label = _label(source, name)
    with _opened(source, label, "image") as img:
        _check_size(img, label, "image", 0, "")
        _check_mode(img, label, "image")
        # Stored (W, H): Pillow >= 11 reports a TIFF's `size` already upright (it rotates TIFFs
        # itself when loading) and keeps the stored one as `_tile_size`.
        w, h = getattr(img, "_tile_size", None) or img.size
        return (w, h) if _orientation(img) in _SWAPS_AXES else (h, w)


def has_alpha(source: Source, *, name: str | None = None) -> bool:
    """Whether the file has an alpha channel or a transparency key (header only).

    Raises:
        ImageReadError: as `image_size`.
    """
    label = _label(source, name)
    with _opened(source, label, "image") as img:
        return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info


# ----------------------------------------------------------------------------------------------
# Folders


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in a folder, sorted by plain string order of the file names.

    A file is an image by its suffix (`IMAGE_SUFFIXES`, any case); OS junk (`is_junk`: .DS_Store,
    Thumbs.db, desktop.ini, AppleDouble `._*`) and sub-folders are skipped, other files ignored.
    String order is what "first/last N" refers to: "1.jpg" < "10.jpg" < "2.jpg". File contents
    are not read.

    Args:
        folder: the folder.

    Returns:
        Paths `folder / name` of the images.

    Raises:
        FolderError: (an `ImageReadError`) no such folder; not a folder; cannot list folder;
            no images (suffixes listed); two images with the same stem (both named: masks, box
            and cache entries are keyed by stem).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FolderError(folder, "no such folder")
    if not folder.is_dir():
        raise FolderError(folder, "not a folder")
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise FolderError(folder, f"cannot list folder ({_describe(e)})") from None
    found = sorted(
        (
            p
            for p in entries
            if p.suffix.lower() in IMAGE_SUFFIXES and not is_junk(p.name) and p.is_file()
        ),
        key=lambda p: p.name,
    )
    if not found:
        raise FolderError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for p in found:
        if p.stem in seen:
            raise FolderError(p, f"duplicate image stem {p.stem!r} (also {seen[p.stem].name})")
        seen[p.stem] = p
    return found
