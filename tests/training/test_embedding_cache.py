"""The embedding cache: content keys, reuse, corrupt entries, the weights key."""

import dataclasses
import json

import numpy as np
import pytest

from amsam_jax.build_sam import SamConfig
from amsam_jax.checkpoint import CONFIG_FILE, FORMAT, PARAMS_DIR
from amsam_jax.training.embedder import EmbeddingCache, sam_weights_key

# ----------------------------------------------------------------------------------------------
# Embedding cache


class CountingEncoder:
    """A fake encoder (B, 32, 32, 3) -> (B, 4, 4, 8), recording the batches it sees."""

    def __init__(self, offset=0.0):
        self.batches = []
        self.offset = offset

    def __call__(self, images):
        self.batches.append(images.shape[0])
        pooled = images.reshape(images.shape[0], 4, 8, 4, 8, 3).mean(axis=(2, 4))
        return np.tile(pooled, (1, 1, 1, 3))[..., :8] + self.offset


def cache_images(n, seed=0):
    return np.random.default_rng(seed).random((n, 32, 32, 3)).astype(np.float32)


def test_cache_second_run_is_all_hits_and_bit_identical(tmp_path):
    images = cache_images(5)
    encoder = CountingEncoder()
    first = EmbeddingCache(tmp_path).get_or_compute(images, encoder, "w", "p", batch_size=2)
    assert first.shape == (5, 4, 4, 8) and first.dtype == np.float32
    assert encoder.batches == [2, 2, 2]  # the last batch is padded to a fixed size
    np.testing.assert_array_equal(first, encoder(images)[:5])
    second_cache = EmbeddingCache(tmp_path)
    again = CountingEncoder()
    second = second_cache.get_or_compute(images, again, "w", "p", batch_size=2)
    assert again.batches == [] and second_cache.stats.hits == 5
    assert second_cache.stats.misses == second_cache.stats.corrupt == 0
    np.testing.assert_array_equal(first, second)
    # The key is the content: the same images in another order (and a repeat) still hit.
    order = [4, 0, 0, 2]
    third = EmbeddingCache(tmp_path).get_or_compute(images[order], again, "w", "p")
    np.testing.assert_array_equal(third, first[order])
    assert again.batches == []


def test_cache_keys_change_with_weights_preprocessing_and_content(tmp_path):
    images = cache_images(2)
    cache = EmbeddingCache(tmp_path)
    cache.get_or_compute(images, CountingEncoder(), "w", "p")
    for weights, prep, imgs in [
        ("w2", "p", images),
        ("w", "p2", images),
        ("w", "p", images + np.float32(1e-6) * (np.arange(2) == 0)[:, None, None, None]),
    ]:
        encoder = CountingEncoder(offset=1.0)
        out = EmbeddingCache(tmp_path).get_or_compute(imgs, encoder, weights, prep)
        assert encoder.batches, (weights, prep)
        np.testing.assert_array_equal(out[0], encoder(imgs[:1])[0])
    assert EmbeddingCache.image_hash(images[0]) != EmbeddingCache.image_hash(images[0].T)
    assert cache.entry_dir("w", "p") != cache.entry_dir("w2", "p")


@pytest.mark.parametrize("damage", ["truncate", "shape", "dtype", "nan", "garbage"])
def test_cache_corrupt_entry_is_recomputed_with_a_warning(tmp_path, damage):
    images = cache_images(3)
    first = EmbeddingCache(tmp_path).get_or_compute(images, CountingEncoder(), "w", "p")
    folder = EmbeddingCache(tmp_path).entry_dir("w", "p")
    entry = folder / f"{EmbeddingCache.image_hash(images[1])}.npy"
    good = np.load(entry)
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "shape":
        np.save(entry, good[:2])
    elif damage == "dtype":
        np.save(entry, good.astype(np.float64))
    elif damage == "nan":
        np.save(entry, np.where(good > 0.5, np.nan, good).astype(np.float32))
    else:
        entry.write_bytes(b"\x00" * 50)
    cache = EmbeddingCache(tmp_path)
    encoder = CountingEncoder()
    with pytest.warns(UserWarning, match="corrupt cache entry"):
        again = cache.get_or_compute(images, encoder, "w", "p")
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (2, 1, 1)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(entry), good)  # rewritten


def test_cache_rejects_bad_encoder_output_without_caching(tmp_path):
    images = cache_images(2)
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        cache.get_or_compute(images, lambda x: np.full((len(x), 4, 4, 8), np.nan), "w", "p")
    with pytest.raises(ValueError, match="for a batch of 1"):
        cache.get_or_compute(images, lambda x: np.zeros((2, 4, 4, 8)), "w", "p")
    assert not list(tmp_path.rglob("*.npy"))
    cache.get_or_compute(images, CountingEncoder(), "w", "p")
    with pytest.raises(ValueError, match="holds"):
        cache.get_or_compute(cache_images(1, seed=9), lambda x: np.zeros((1, 2, 2, 8)), "w", "p")


def test_cache_default_dir_and_sam_weights_key(tmp_path, monkeypatch):
    monkeypatch.setenv("AMSAM_CACHE", str(tmp_path / "c"))
    assert EmbeddingCache().cache_dir == tmp_path / "c"
    monkeypatch.delenv("AMSAM_CACHE")
    assert str(EmbeddingCache().cache_dir).endswith(".cache/amsam_jax/embeddings")
    sam_dir = tmp_path / "sam"
    (sam_dir / PARAMS_DIR).mkdir(parents=True)
    (sam_dir / PARAMS_DIR / "blob").write_bytes(b"1")
    meta = {"format": FORMAT, "model": dataclasses.asdict(SamConfig.tiny()), "source": {}}
    (sam_dir / CONFIG_FILE).write_text(json.dumps(meta))
    key = sam_weights_key(sam_dir)
    assert key == sam_weights_key(sam_dir) and key.endswith("-float32")
    assert sam_weights_key(sam_dir, "bfloat16") != key
    (sam_dir / PARAMS_DIR / "blob").write_bytes(b"2")  # no source hash: params are hashed
    assert sam_weights_key(sam_dir) != key
