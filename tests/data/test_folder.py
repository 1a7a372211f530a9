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


def test_load_sample_rejects_corrupt_files_and_a_mask_of_another_aspect_ratio(tmp_path):
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
        ("d", samples["d"].mask_path, r"mask is 12x16 \(WxH\), image .*/d\.png is 16x12: another"),
    ]
    for stem, path, problem in cases:
        with pytest.raises(D.DataError, match=problem) as info:
            P.load_split_arrays([samples[stem]])
        assert info.value.path == str(path) and "\n" not in str(info.value)


def test_junk_and_hidden_files_are_never_samples(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    for sub in ("images", "masks"):
        folder = tmp_path / "train" / sub
        for name in [".DS_Store", "Thumbs.db", "DESKTOP.INI", "._a.png", "._b.jpg", ".c.png"]:
            (folder / name).write_bytes(b"\0\5junk")
        (folder / ".hidden").mkdir()
    (tmp_path / "train" / "masks" / "LICENSE.txt").write_text("not a mask")
    assert [s.stem for s in D.list_samples(tmp_path, "train")] == ["a", "b"]
    assert D.is_hidden(".anything") and D.is_hidden("Thumbs.db") and not D.is_hidden("a.png")


def test_only_junk_or_hidden_images_is_no_images(tmp_path):
    make_folder(tmp_path, ["a"])
    (tmp_path / "train" / "images" / "a.png").rename(tmp_path / "train" / "images" / ".a.png")
    with pytest.raises(D.DataError, match="no images") as info:
        D.list_samples(tmp_path, "train")
    assert info.value.path == str(tmp_path / "train" / "images")


def test_upper_case_suffixes_pair_and_are_not_called_non_png(tmp_path):
    write_pair(tmp_path, "train", "a", image_suffix=".JPG")
    write_pair(tmp_path, "train", "b")
    masks = tmp_path / "train" / "masks"
    (masks / "a.png").rename(masks / "a.PNG")
    samples = D.list_samples(tmp_path, "train")
    assert [(s.image_path.name, s.mask_path.name) for s in samples] == [
        ("a.JPG", "a.PNG"),
        ("b.png", "b.png"),
    ]
    image, mask = D.load_sample(samples[0])
    assert image.shape[:2] == mask.shape == (12, 16)
    # ISIC-2018 names: <stem>_segmentation.PNG
    pairs = D.pair_images_and_masks(
        tmp_path / "train" / "images", masks, lambda stem: stem + ".png"
    )
    assert pairs == samples
    (masks / "b.png").rename(masks / "b_segmentation.PNG")
    (masks / "a.PNG").rename(masks / "a_segmentation.Png")
    pairs = D.pair_images_and_masks(
        tmp_path / "train" / "images", masks, lambda stem: stem + "_segmentation.png"
    )
    assert [p.mask_path.name for p in pairs] == ["a_segmentation.Png", "b_segmentation.PNG"]


def test_two_masks_for_one_image_is_an_error(tmp_path):
    make_folder(tmp_path, ["a"])
    shutil.copy(tmp_path / "train/masks/a.png", tmp_path / "train/masks/a.PNG")
    with pytest.raises(D.DataError, match=r"two masks for one image \(also a\.PNG\)") as info:
        D.list_samples(tmp_path, "train")
    assert info.value.path == str(tmp_path / "train/masks/a.png")


def test_unpaired_files_are_counted_and_the_first_ones_named(tmp_path):
    make_folder(tmp_path, [str(i) for i in range(1, 9)])
    for i in (3, 4, 5, 6, 7):
        (tmp_path / "train" / "masks" / f"{i}.png").unlink()
    with pytest.raises(D.DataError) as info:
        D.list_samples(tmp_path, "train")
    assert str(info.value) == (
        f"{tmp_path / 'train/images/3.png'}: no mask {tmp_path / 'train/masks/3.png'}; 5 images "
        "without a mask: 3.png, 4.png, 5.png, ..."
    )
    make_folder(tmp_path / "other", ["x"])
    for i in (1, 2):
        shutil.copy(tmp_path / "train/masks/1.png", tmp_path / f"other/train/masks/y{i}.png")
    with pytest.raises(D.DataError) as info:
        D.list_samples(tmp_path / "other", "train")
    assert str(info.value) == (
        f"{tmp_path / 'other/train/masks/y1.png'}: mask without image in "
        f"{tmp_path / 'other/train/images'}; 2 masks without an image: y1.png, y2.png"
    )


@pytest.mark.parametrize(
    "mask, image, same",
    [
        ((454, 551), (1055, 1280), True),  # the Human Segmentation Dataset's 100.png
        ((12, 16), (12, 16), True),
        ((16, 20), (33, 40), True),  # 16.5 x 20 rounded down
        ((17, 20), (33, 40), True),  # ... and up
        ((17, 21), (33, 40), True),  # both sides 1 px off the same factor
        ((24, 30), (33, 40), True),  # 24.75 x 30, floor
        ((66, 80), (33, 40), True),  # a larger mask of the same aspect ratio
        ((19, 20), (33, 40), False),  # h needs s >= 18/33, w needs s <= 21/40
        ((16, 22), (33, 40), False),
        ((40, 33), (33, 40), False),  # transposed
        ((16, 12), (12, 16), False),
        ((20, 20), (33, 40), False),
    ],
)
def test_same_aspect_allows_one_pixel_of_rounding_per_side(mask, image, same):
    assert D.same_aspect(mask, image) is same


def test_resize_nearest_samples_pixel_centres_and_keeps_values():
    labels = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    np.testing.assert_array_equal(
        D.resize_nearest(labels, (6, 8)), labels.repeat(2, axis=0).repeat(2, axis=1)
    )
    assert D.resize_nearest(labels, (3, 4)) is labels
    big = np.arange(36).reshape(6, 6)
    np.testing.assert_array_equal(D.resize_nearest(big, (3, 2)), big[1::2][:, [1, 4]])
    rng = np.random.default_rng(0)
    for (h, w), (big_h, big_w) in [((16, 20), (33, 40)), ((454, 551), (1055, 1280))]:
        mask = rng.random((h, w)) > 0.5
        out = D.resize_nearest(mask, (big_h, big_w))
        assert out.shape == (big_h, big_w) and out.dtype == bool
        pil = Image.fromarray(mask.astype(np.uint8)).resize((big_w, big_h), Image.NEAREST)
        # PIL's floating point rounds some exact half-way rows down; otherwise the same rule
        assert (np.asarray(pil) == out).mean() > 0.97


def test_read_instance_masks_at_the_image_size(tmp_path):
    values = np.zeros((3, 4), np.uint8)
    values[0, 0], values[2, 3] = 7, 2
    Image.fromarray(values).save(tmp_path / "m.png")
    masks = D.read_instance_masks(tmp_path / "m.png", (6, 8))
    assert masks.shape == (2, 6, 8)
    np.testing.assert_array_equal(masks[1], D.resize_nearest(values == 7, (6, 8)))
    assert D.read_instance_masks(tmp_path / "m.png").shape == (2, 3, 4)


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


def test_oracle_boxes_of_a_lower_resolution_mask_are_in_image_pixels(tmp_path):
    """A mask stored at half resolution: its tight box, mapped to the image, as a detector's."""
    for sub in ("images", "masks"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "train/images/a.jpg")
    mask = np.zeros((15, 20), np.uint8)
    mask[3:9, 5:12] = 255  # rows 3..8, columns 5..11 at half size
    Image.fromarray(mask).save(tmp_path / "train/masks/a.png")
    entry = box_file_from_masks(tmp_path)["boxes"]["a"]
    assert entry["box"] == [10.0, 6.0, 24.0, 18.0] and not entry["fallback"]
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(tmp_path / "train/masks/a.png")
    with pytest.raises(D.DataError, match="another aspect ratio"):
        box_file_from_masks(tmp_path)
