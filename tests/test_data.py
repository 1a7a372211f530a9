"""Tests of the data folders, few-shot selection, preprocessing (spec §4) and embedding cache."""

import dataclasses
import json
import shutil
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from amsam_jax import data as D
from amsam_jax.build_sam import SamConfig
from amsam_jax.cache import EmbeddingCache, sam_weights_key
from amsam_jax.checkpoint import CONFIG_FILE, FORMAT, PARAMS_DIR


def write_pair(root, split, stem, size=(12, 16), image_suffix=".png", mask_size=None):
    """Writes a random RGB image and a 0/255 mask; size is (H, W)."""
    rng = np.random.default_rng(zlib.crc32(f"{split}/{stem}".encode()))
    for sub in ("images", "masks"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        root / split / "images" / f"{stem}{image_suffix}"
    )
    mh, mw = mask_size or size
    mask = (rng.random((mh, mw)) > 0.5).astype(np.uint8) * 255
    Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")


def make_folder(root, stems, split="train"):
    for stem in stems:
        write_pair(root, split, stem)
    return root


# ----------------------------------------------------------------------------------------------
# Listing and pairing


def test_list_samples_sorts_by_plain_string_order_and_pairs_by_stem(tmp_path):
    stems = ["2", "101", "1", "10", "100", "11"]
    for stem in stems:
        write_pair(tmp_path, "train", stem, image_suffix=".jpg" if stem == "10" else ".png")
    samples = D.list_samples(tmp_path, "train")
    assert [s.stem for s in samples] == ["1", "10", "100", "101", "11", "2"]
    for s in samples:
        assert s.image_path.parent == tmp_path / "train" / "images"
        assert s.mask_path == tmp_path / "train" / "masks" / f"{s.stem}.png"
    assert samples[1].image_path.name == "10.jpg"
    # Non-image files are not samples.
    (tmp_path / "train" / "images" / "README.txt").write_text("x")
    assert len(D.list_samples(tmp_path, "train")) == len(stems)


def empty_split(root):
    shutil.rmtree(root / "test")
    (root / "test" / "images").mkdir(parents=True)


@pytest.mark.parametrize(
    "setup, path, problem",
    [
        (lambda r: shutil.rmtree(r / "test"), "test", "no such split folder"),
        (empty_split, "test/images", "no images"),
        (lambda r: (r / "test" / "masks" / "a.png").unlink(), "test/images/a.png", "no mask"),
        (
            lambda r: Image.new("RGB", (4, 4)).save(r / "test" / "images" / "a.jpg"),
            "test/images/a.png",
            "duplicate image stem 'a'",
        ),
        (
            lambda r: Image.new("L", (4, 4)).save(r / "test" / "masks" / "zz.png"),
            "test/masks/zz.png",
            "mask without image",
        ),
    ],
    ids=["missing_split", "empty_split", "mask_missing", "duplicate_stem", "mask_without_image"],
)
def test_list_samples_errors_name_the_file(tmp_path, setup, path, problem):
    make_folder(tmp_path, ["a", "b"], split="test")
    setup(tmp_path)
    with pytest.raises(D.DataError, match=problem) as info:
        D.list_samples(tmp_path, "test")
    assert str(info.value).startswith(str(tmp_path / path) + ": ")
    assert "\n" not in str(info.value)


def test_mask_with_wrong_suffix_is_reported_as_missing_with_a_hint(tmp_path):
    make_folder(tmp_path, ["a"])
    mask = tmp_path / "train" / "masks" / "a.png"
    mask.rename(mask.with_suffix(".jpg"))
    with pytest.raises(D.DataError, match=r"no mask .*a\.png \(found a\.jpg: masks must be PNG\)"):
        D.list_samples(tmp_path, "train")


def test_load_sample_rejects_corrupt_files_and_a_mask_of_another_size(tmp_path):
    make_folder(tmp_path, ["a", "b", "c"])
    write_pair(tmp_path, "train", "d", size=(12, 16), mask_size=(16, 12))
    samples = {s.stem: s for s in D.list_samples(tmp_path, "train")}
    samples["a"].image_path.write_bytes(b"not an image")
    good = samples["b"].mask_path.read_bytes()
    samples["b"].mask_path.write_bytes(good[: len(good) // 2])
    samples["c"].mask_path.write_bytes(b"")
    cases = [
        ("a", samples["a"].image_path, "cannot read image"),
        ("b", samples["b"].mask_path, "cannot read mask"),
        ("c", samples["c"].mask_path, "cannot read mask"),
        ("d", samples["d"].mask_path, r"mask is 12x16 \(WxH\), image d.png is 16x12"),
    ]
    for stem, path, problem in cases:
        with pytest.raises(D.DataError, match=problem) as info:
            D.load_split_arrays([samples[stem]])
        assert info.value.path == str(path) and "\n" not in str(info.value)


def test_grayscale_rgba_palette_and_16bit_inputs_are_read(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    gray = rng.integers(0, 256, (10, 14), dtype=np.uint8)
    rgba = rng.integers(0, 256, (10, 14, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (10, 14), dtype=np.uint16)
    on = rng.random((10, 14)) > 0.5
    Image.fromarray(gray).save(tmp_path / "train/images/gray.png")
    Image.fromarray(rgba).save(tmp_path / "train/images/rgba.png")
    Image.fromarray(deep).save(tmp_path / "train/images/deep.png")
    # Masks: 16-bit with small values, RGB (first channel counts), palette indices.
    Image.fromarray(on.astype(np.uint16) * 3).save(tmp_path / "train/masks/gray.png")
    rgb_mask = np.zeros((10, 14, 3), np.uint8)
    rgb_mask[..., 0] = on * 255
    rgb_mask[..., 1] = 255  # ignored: only the first channel is the label
    Image.fromarray(rgb_mask).save(tmp_path / "train/masks/rgba.png")
    palette = Image.fromarray(on.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.save(tmp_path / "train/masks/deep.png")
    samples = D.list_samples(tmp_path, "train")
    assert [s.stem for s in samples] == ["deep", "gray", "rgba"]
    loaded = {s.stem: D.load_sample(s) for s in samples}
    for stem, (image, mask) in loaded.items():
        assert image.shape == (10, 14, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(mask, on, err_msg=stem)
    np.testing.assert_array_equal(loaded["gray"][0], np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(loaded["rgba"][0], rgba[..., :3])
    np.testing.assert_array_equal(loaded["deep"][0][..., 0], np.round(deep / 257).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Few-shot selection and D1/D2


def fake_samples(n):
    return [D.Sample(f"{i:03d}", f"{i:03d}.png", f"{i:03d}.png") for i in range(n)]


def test_few_shot_first_n_and_seeded_subsets():
    pool = fake_samples(20)
    assert D.select_few_shot(pool, 4) == pool[:4]
    seeded = D.select_few_shot(pool, 8, seed=3)
    assert seeded == D.select_few_shot(pool, 8, seed=3)
    assert seeded != D.select_few_shot(pool, 8, seed=4)
    assert len(set(seeded)) == 8 and seeded == sorted(seeded, key=pool.index)
    assert D.select_few_shot(pool, 20, seed=0) == pool
    with pytest.raises(D.DataError, match="only 20 samples"):
        D.select_few_shot(pool, 21)
    with pytest.raises(D.DataError, match="at least 1"):
        D.select_few_shot(pool, 0)


@pytest.mark.parametrize(
    "n, sizes", [(4, (2, 2)), (5, (2, 3)), (8, (4, 4)), (16, (8, 8)), (2, (1, 1))]
)
def test_d1_d2_split_sizes(n, sizes):
    samples = fake_samples(n)
    d1, d2 = D.split_d1_d2(samples)
    assert (len(d1), len(d2)) == sizes and d1 + d2 == samples
    with pytest.raises(D.DataError, match="at least 2"):
        D.split_d1_d2(samples[:1])


# ----------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_matches_the_reference_scipy_calls_and_keeps_overshoot():
    rng = np.random.default_rng(0)
    image = np.zeros((90, 130, 3), np.uint8)
    image[:, 65:] = 255  # a sharp edge: the cubic spline over- and undershoots
    image[:45, :, 1] = rng.integers(0, 256, (45, 130))
    mask = rng.random((90, 130)) > 0.5
    img, label, low = D.preprocess(image, mask)
    assert (img.shape, img.dtype) == ((256, 256, 3), np.float32)
    assert (label.shape, label.dtype) == ((256, 256), np.int32)
    assert (low.shape, low.dtype) == ((64, 64), np.int32)
    # The literal reference calls.
    ref = ndimage.zoom(image / 255.0, (256 / 90, 256 / 130, 1), order=3)
    np.testing.assert_allclose(img, ref, rtol=0, atol=1e-6)
    ref_label = ndimage.zoom(mask.astype(np.int32), (256 / 90, 256 / 130), order=0)
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_array_equal(low, ndimage.zoom(ref_label, 0.25, order=0))
    # Corner-aligned nearest neighbour: output o reads input round(o * 255 / 63).
    src = np.round(np.arange(64) * 255 / 63).astype(int)
    np.testing.assert_array_equal(low, label[np.ix_(src, src)])
    assert img.min() < -0.05 and img.max() > 1.05  # no clipping


def test_preprocess_sam_pixel_norm_and_key():
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    unit, _, _ = D.preprocess(image, mask)
    norm, _, _ = D.preprocess(image, mask, sam_pixel_norm=True)
    mean, std = np.array(D.SAM_PIXEL_MEAN), np.array(D.SAM_PIXEL_STD)
    np.testing.assert_allclose(norm, (unit.astype(np.float64) * 255 - mean) / std, atol=1e-4)
    small, label, low = D.preprocess(image, mask, size=128, low_res=32)
    assert small.shape == (128, 128, 3) and label.shape == (128, 128) and low.shape == (32, 32)
    keys = {
        D.Preprocessing().key(),
        D.Preprocessing(sam_pixel_norm=True).key(),
        D.Preprocessing(size=128).key(),
        D.Preprocessing(low_res=32).key(),
    }
    assert len(keys) == 4 and D.Preprocessing().key() == D.Preprocessing().key()


def test_load_split_arrays_stacks_preprocessed_samples(tmp_path):
    write_pair(tmp_path, "test", "b", size=(20, 30))
    write_pair(tmp_path, "test", "a", size=(25, 15))
    samples = D.list_samples(tmp_path, "test")
    arrays = D.load_split_arrays(samples, D.Preprocessing(), original_masks=True)
    assert arrays["stem"] == ["a", "b"]
    assert arrays["image"].shape == (2, 256, 256, 3) and arrays["image"].dtype == np.float32
    assert arrays["label"].shape == (2, 256, 256) and arrays["label"].dtype == np.int32
    assert arrays["label_low"].shape == (2, 64, 64) and arrays["label_low"].dtype == np.int32
    np.testing.assert_array_equal(arrays["original_size"], [[25, 15], [20, 30]])
    for i, sample in enumerate(samples):
        image, mask = D.load_sample(sample)
        np.testing.assert_array_equal(arrays["mask"][i], mask)
        expected = D.preprocess(image, mask)
        for j, key in enumerate(("image", "label", "label_low")):
            np.testing.assert_array_equal(arrays[key][i], expected[j])
    assert "mask" not in D.load_split_arrays(samples[:1])


def test_bundled_synthetic_dataset_equals_a_regeneration(tmp_path):
    fresh = D.make_synthetic_dataset(tmp_path / "fresh", **D.BUNDLED_SYNTHETIC)
    bundled = D.bundled_synthetic_dir()
    for split, n in (
        ("train", D.BUNDLED_SYNTHETIC["n_train"]),
        ("test", D.BUNDLED_SYNTHETIC["n_test"]),
    ):
        ours, theirs = D.list_samples(bundled, split), D.list_samples(fresh, split)
        assert [s.stem for s in ours] == [s.stem for s in theirs] and len(ours) == n
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(D.load_sample(a), D.load_sample(b), strict=True):
                np.testing.assert_array_equal(x, y)
    files = [p for p in bundled.rglob("*") if p.is_file()]
    assert len(files) == 24 and sum(p.stat().st_size for p in files) < 1_000_000
    _, mask = D.load_sample(D.list_samples(bundled, "train")[0])
    assert 0.02 < mask.mean() < 0.5


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
