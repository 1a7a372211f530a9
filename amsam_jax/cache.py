"""On-disk cache of frozen-encoder image embeddings (spec §5.7), keyed by image content."""

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from amsam_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, read_sam_config

META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """`$AMSAM_CACHE` if set, else `~/.cache/amsam_jax/embeddings`."""
    env = os.environ.get("AMSAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "amsam_jax" / "embeddings"


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def sam_weights_key(sam_dir: str | os.PathLike, encoder_dtype: str | None = None) -> str:
    """A key that changes whenever the encoder of a converted SAM directory would.

    It hashes `config.json` (model config incl. image size, and the source checkpoint's SHA-256
    recorded at conversion) and the compute dtype. A directory whose source has no SHA-256 (a
    model saved by `save_sam` from random weights) also hashes every file under `params/`.

    Args:
        sam_dir: the converted directory.
        encoder_dtype: the encoder compute dtype override passed to `load_sam` (None: float32).

    Returns:
        "sam-<sha256 prefix>-<image size>-<dtype>".
    """
    sam_dir = Path(sam_dir)
    cfg, meta = read_sam_config(sam_dir)
    h = hashlib.sha256((sam_dir / CONFIG_FILE).read_bytes())
    if not meta.get("source", {}).get("sha256"):
        for path in sorted((sam_dir / PARAMS_DIR).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(sam_dir)).encode())
                h.update(path.read_bytes())
    return f"sam-{h.hexdigest()[:16]}-{cfg.image_size}-{encoder_dtype or cfg.encoder_dtype}"


@dataclasses.dataclass
class CacheStats:
    """Counts since the cache object was made: entries reused, computed, and found corrupt."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """Writes through a temporary file in the same folder, fsyncs, then renames over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class EmbeddingCache:
    """Image embeddings on disk: the frozen encoder runs once per distinct image.

    Layout: `cache_dir/<sha256(weights_key)[:16]>/<sha256(preprocessing_key)[:16]>/` holds
    `meta.json` (both keys in full, the embedding shape and dtype) and one `<image-hash>.npy`
    per image. The image hash is the SHA-256 of the preprocessed float32 image (shape and
    bytes): the encoder's exact input, so the key is the content, not the path, and any change
    of preprocessing output (parameters, SciPy version) misses rather than reusing stale values.
    Entries are written atomically; an entry that does not load, has the wrong shape or dtype,
    or holds non-finite values is recomputed with a warning, never used.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.stats = CacheStats()

    def entry_dir(self, weights_key: str, preprocessing_key: str) -> Path:
        return self.cache_dir / sha256_hex(weights_key)[:16] / sha256_hex(preprocessing_key)[:16]

    @staticmethod
    def image_hash(image: np.ndarray) -> str:
        """SHA-256 of one preprocessed image's shape and float32 bytes."""
        image = np.ascontiguousarray(image, dtype=np.float32)
        return sha256_hex(str(image.shape).encode() + image.tobytes())

    def get_or_compute(
        self,
        images: np.ndarray,
        encode_fn: Callable[[np.ndarray], np.ndarray],
        weights_key: str,
        preprocessing_key: str,
        batch_size: int = 1,
    ) -> np.ndarray:
        """Embeddings of `images`, reusing cached entries and computing the rest.

        Args:
            images: (N, H, W, 3) preprocessed images.
            encode_fn: (B, H, W, 3) float32 -> (B, h, w, C) embeddings; always called with
                exactly `batch_size` images (the last batch is padded by repeating its last
                image, so a jitted encoder compiles once).
            weights_key: identifies the encoder weights (e.g. `sam_weights_key(sam_dir)`).
            preprocessing_key: identifies the preprocessing (`Preprocessing.key()`).
            batch_size: B.

        Returns:
            (N, h, w, C) float32.

        Raises:
            ValueError: no images, or `encode_fn` returned a wrong batch size, inconsistent
                shapes or non-finite values (nothing of that batch is cached).
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images of shape {images.shape}: expected (N, H, W, 3), N >= 1")
        folder = self.entry_dir(weights_key, preprocessing_key)
        meta = self._read_meta(folder, weights_key, preprocessing_key)
        hashes = [self.image_hash(image) for image in images]
        found: dict[str, np.ndarray] = {}
        todo: dict[str, int] = {}  # hash -> first index; duplicate images are encoded once
        for i, h in enumerate(hashes):
            if h in found or h in todo:
                continue
            entry = self._load(folder / f"{h}.npy", meta)
            if entry is None:
                todo[h] = i
            else:
                found[h] = entry
        self.stats.hits += len(found)
        self.stats.misses += len(todo)
        pending = list(todo.items())
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            idx = [i for _, i in chunk]
            idx += [idx[-1]] * (batch_size - len(idx))
            out = np.asarray(encode_fn(images[idx]), dtype=np.float32)
            if out.ndim != 4 or out.shape[0] != batch_size:
                raise ValueError(
                    f"encode_fn returned {out.shape} for a batch of {batch_size}: "
                    "expected (B, h, w, C)"
                )
            if not np.all(np.isfinite(out)):
                raise ValueError("encode_fn returned non-finite embeddings")
            if meta is None:
                meta = self._write_meta(folder, weights_key, preprocessing_key, out.shape[1:])
            if tuple(out.shape[1:]) != tuple(meta["shape"]):
                raise ValueError(
                    f"encode_fn returned embeddings of shape {out.shape[1:]}; this cache entry "
                    f"({folder}) holds {tuple(meta['shape'])} for the same keys"
                )
            for (h, _), embedding in zip(chunk, out, strict=False):
                found[h] = embedding
                _atomic_write(folder / f"{h}.npy", lambda f, e=embedding: np.save(f, e))
        return np.stack([found[h] for h in hashes])

    def _read_meta(self, folder: Path, weights_key: str, preprocessing_key: str) -> dict | None:
        path = folder / META_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
            valid = (
                meta["weights_key"] == weights_key
                and meta["preprocessing_key"] == preprocessing_key
                and meta["dtype"] == "float32"
                and len(meta["shape"]) == 3
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            valid, meta = False, f"({type(e).__name__}: {e})"
        if not valid:
            warnings.warn(f"{path}: unusable cache metadata {meta}; recomputing", stacklevel=3)
            return None
        return meta

    def _write_meta(
        self, folder: Path, weights_key: str, preprocessing_key: str, shape: tuple[int, ...]
    ) -> dict:
        meta = {
            "weights_key": weights_key,
            "preprocessing_key": preprocessing_key,
            "shape": list(shape),
            "dtype": "float32",
        }
        folder.mkdir(parents=True, exist_ok=True)
        text = (json.dumps(meta, indent=2) + "\n").encode()
        _atomic_write(folder / META_FILE, lambda f: f.write(text))
        return meta

    def _load(self, path: Path, meta: dict | None) -> np.ndarray | None:
        """The entry at `path`, or None when absent or unusable (then warns and counts it)."""
        if meta is None or not path.is_file():
            return None
        try:
            entry = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            problem = f"cannot load ({e})"
        else:
            if entry.dtype != np.float32 or entry.shape != tuple(meta["shape"]):
                problem = f"{entry.dtype} {entry.shape}, expected float32 {tuple(meta['shape'])}"
            elif not np.all(np.isfinite(entry)):
                problem = "non-finite values"
            else:
                return entry
        self.stats.corrupt += 1
        warnings.warn(f"{path}: corrupt cache entry, {problem}; recomputing", stacklevel=3)
        return None
