"""The folder format: listing, pairing and reading (docs/fewshot.md §4.2); the bundled set."""

import json
import shutil

import numpy as np
import pytest
from folder_fixtures import make_folder, write_pair
from PIL import Image

from amsam_jax.boxes.box_file import box_file_from_masks
from amsam_jax.data import folder as D
from amsam_jax.data import synthetic
from amsam_jax.fewshot import preprocessing as P

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
            P.load_split_arrays([samples[stem]])
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


def test_bundled_synthetic_dataset_equals_a_regeneration(tmp_path):
    fresh = synthetic.make_synthetic_dataset(tmp_path / "fresh", **synthetic.BUNDLED_SYNTHETIC)
    bundled = synthetic.bundled_synthetic_dir()
    for split, n in (
        ("train", synthetic.BUNDLED_SYNTHETIC["n_train"]),
        ("test", synthetic.BUNDLED_SYNTHETIC["n_test"]),
    ):
        ours, theirs = D.list_samples(bundled, split), D.list_samples(fresh, split)
        assert [s.stem for s in ours] == [s.stem for s in theirs] and len(ours) == n
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(D.load_sample(a), D.load_sample(b), strict=True):
                np.testing.assert_array_equal(x, y)
    files = [p for p in bundled.rglob("*") if p.is_file() and p.suffix == ".png"]
    assert len(files) == 24 and sum(p.stat().st_size for p in files) < 1_000_000
    # The box file of the bundled set is its masks' tight boxes, up to date with the masks.
    boxes = json.loads((bundled / "boxes_from_masks.json").read_text())
    assert boxes == box_file_from_masks(bundled)
    _, mask = D.load_sample(D.list_samples(bundled, "train")[0])
    assert 0.02 < mask.mean() < 0.5
