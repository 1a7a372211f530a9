"""The frozen image encoder behind an on-disk embedding cache (docs/fewshot.md §5.7).

The encoder is frozen in every method here, so each distinct preprocessed image is encoded once
per weights and preprocessing: `EmbeddingCache` keeps the embeddings on disk, keyed by content,
and `Embedder` is the one jitted encoder that fills it.

On several devices and processes (docs/scale.md §3) the missing entries are split over the
processes by their content hash (each entry has one owner, whatever was cached before), each
process encodes its share in batches of one image per local device and writes one file per
entry, and every process then reads the others' entries from the shared cache folder.
"""

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, read_sam_config
from amsam_jax.training.mesh import data_sharding, local_mesh, replicated, sync
from amsam_jax.utils.io import atomic_write, sha256_bytes

META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """`$AMSAM_CACHE` if set, else `~/.cache/amsam_jax/embeddings`."""
    env = os.environ.get("AMSAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "amsam_jax" / "embeddings"


def sha256_hex(data: bytes | str) -> str:
    return sha256_bytes(data.encode() if isinstance(data, str) else data)


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

        In a multi-process run every process calls it with the same images: each encodes the
        missing entries it owns (`owner`), then all wait for each other and read the rest.

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
        count = jax.process_count()
        others = {h: i for h, i in todo.items() if owner(h, count) != jax.process_index()}
        pending = [(h, i) for h, i in todo.items() if h not in others]
        self.stats.misses += len(pending)
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
                atomic_write(folder / f"{h}.npy", lambda f, e=embedding: np.save(f, e))
        if count > 1:
            sync("embedding-cache")  # every owner wrote its entries
            meta = meta or self._read_meta(folder, weights_key, preprocessing_key)
            for h in others:
                entry = self._load(folder / f"{h}.npy", meta)
                if entry is None:
                    raise ValueError(f"{folder / h}.npy: not written by its owner process")
                found[h] = entry
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
        atomic_write(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
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


def owner(image_hash: str, process_count: int) -> int:
    """The process that encodes and writes the entry `image_hash` in a multi-process run."""
    return int(image_hash[:8], 16) % process_count


@partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images)


class Embedder:
    """The frozen image encoder over an `EmbeddingCache`: every caller's one jitted encoder.

    Args:
        image_encoder: SAM's image encoder module (its state is captured now).
        weights_key: identifies the weights in the cache (`resolve_sam` gives it); None: no disk
            cache (every `embed` call encodes).
        cache: the cache (default: `EmbeddingCache()` at `default_cache_dir()`).
        memory: how many embeddings `embed_one` keeps in memory by name.
        devices: local devices a batch of images is split over, one image each (0: all of this
            process's devices; the `--mesh-data` of the precompute commands).
    """

    def __init__(
        self,
        image_encoder: nnx.Module,
        weights_key: str | None,
        cache: EmbeddingCache | None = None,
        memory: int = 256,
        devices: int = 0,
    ):
        self._graphdef, self._state = nnx.split(image_encoder)
        self.weights_key = weights_key
        self.cache = cache if cache is not None else EmbeddingCache()
        self._memory: dict[str, np.ndarray] = {}
        self._memory_size = memory
        self._mesh = local_mesh(devices)
        self.batch_size = self._mesh.devices.size
        self._sharded_state = None

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) model inputs -> (B, G, G, C) embeddings, without the cache.

        With several local devices B must be a multiple of `batch_size`: the batch is split
        over them, one image per device.
        """
        if self.batch_size == 1:
            return np.asarray(_encode(self._graphdef, self._state, jnp.asarray(images)))
        if self._sharded_state is None:
            self._sharded_state = jax.device_put(self._state, replicated(self._mesh))
        x = jax.device_put(np.asarray(images), data_sharding(self._mesh, 4))
        return np.asarray(_encode(self._graphdef, self._sharded_state, x))

    def embed(self, images: np.ndarray, preprocessing_key: str) -> np.ndarray:
        """(N, S, S, 3) preprocessed images -> (N, G, G, C) embeddings through the cache."""
        if self.weights_key is None:
            n, b = len(images), self.batch_size
            padded = np.concatenate([images, np.repeat(images[-1:], -n % b, axis=0)])
            return np.concatenate([self.encode(padded[i : i + b]) for i in range(0, n, b)])[:n]
        return self.cache.get_or_compute(
            images, self.encode, self.weights_key, preprocessing_key, batch_size=self.batch_size
        )

    def embed_one(
        self, name: str, make_input: Callable[[], np.ndarray], preprocessing_key: str
    ) -> np.ndarray:
        """(G, G, C) embedding of one image, remembered in memory under `name`.

        Args:
            name: identifies the image (e.g. its path) in the in-memory cache.
            make_input: builds the (S, S, 3) model input; called only on a memory miss.
            preprocessing_key: as `embed`.
        """
        if name not in self._memory:
            self._memory[name] = self.embed(make_input()[None], preprocessing_key)[0]
            if len(self._memory) > self._memory_size:
                self._memory.pop(next(iter(self._memory)))
        return self._memory[name]
