"""The paper's datasets in the layouts their archives really have (tests/folder_fixtures.py): the
export finds and pairs them, exported masks are binary and aligned to their images, and the few-shot
preprocessing takes a mask stored at a lower resolution than its image."""

import shutil

import numpy as np
import pytest
from folder_fixtures import (
    HUMAN_SEG_PHOTO,
    HUMAN_SEG_STEMS,
    human_seg_layout,
    isic_layout,
    person,
    save_mask,
    save_photo,
    tiktok_layout,
)
from PIL import Image
from scipy import ndimage

from amsam_jax.data import folder as D
from amsam_jax.data.sa1b import iter_pseudo_labels
from amsam_jax.data.tfds import SegmentationConfig, export_to_folder
from amsam_jax.datasets import main
from amsam_jax.fewshot import preprocessing as P


@pytest.fixture(scope="module")
def human_seg(tmp_path_factory):
    """The Human Segmentation Dataset as cloned: (download folder, {stem: (photo, mask, on)})."""
    root = tmp_path_factory.mktemp("human_seg")
    return root / "download", human_seg_layout(root / "download")


def exported_files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def check_exported(out, split, written):
    """Every exported pair: the image's bytes as downloaded, a 0/255 8-bit mask of the image's
    size equal to the stored mask resized with nearest neighbour, on the person of the photo."""
    samples = D.list_samples(out, split)
    for sample in samples:
        image_path, mask_path, on = written[sample.stem]
        assert sample.image_path.name == image_path.name
        assert sample.image_path.read_bytes() == image_path.read_bytes()
        with Image.open(sample.mask_path) as exported:
            assert exported.mode == "L"
            values = np.asarray(exported)
        assert set(np.unique(values)) <= {0, 255}
        assert values.shape == on.shape  # the image's (H, W)
        stored = D.read_mask(mask_path)
        np.testing.assert_array_equal(values > 0, D.resize_nearest(stored, on.shape))
        if stored.shape == on.shape:
            np.testing.assert_array_equal(values > 0, on)
        else:  # aligned: the downscaled-then-upscaled person covers the photo's person
            iou = (on & (values > 0)).sum() / (on | (values > 0)).sum()
            assert iou > 0.7, (sample.stem, stored.shape, iou)
    return samples


def test_human_seg_as_distributed_exports_its_290_pairs_with_lower_res_masks(
    human_seg, tmp_path, capsys
):
    download, written = human_seg
    low = [s for s, (_, m, on) in written.items() if D.read_mask(m).shape != on.shape]
    assert len(written) == 290 and len(low) == 193  # like the real 198 of 290
    out = tmp_path / "out"
    argv = ["export", "human_seg", "--manual-dir", str(download), "--out", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path / "tfds")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"{out}: train 190, test 100 (290 image/mask pairs found)"
    order = sorted(HUMAN_SEG_STEMS)  # plain string order: 1, 10, 100, ..., 299 absent, 3, 30, 300
    assert [s.stem for s in check_exported(out, "train", written)] == order[:190]
    assert [s.stem for s in check_exported(out, "test", written)] == order[190:]
    files = exported_files(out)
    assert len(files) == 580 and not any("/." in f or "DS_Store" in f for f in files)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_human_seg_export_into_an_existing_empty_folder(human_seg, tmp_path):
    download, written = human_seg
    (tmp_path / "out").mkdir()
    config = SegmentationConfig(name="paper_again", num_test=100)
    counts = export_to_folder("human_seg", download, tmp_path / "out", tmp_path / "tfds", config)
    assert counts == {"train": 190, "test": 100}
    check_exported(tmp_path / "out", "test", written)


def test_a_mask_of_another_aspect_ratio_fails_with_one_line_naming_both(
    human_seg, tmp_path, capsys
):
    download = shutil.copytree(human_seg[0], tmp_path / "download")
    repo = download / "Human-Segmentation-Dataset-master"
    Image.new("L", (20, 20)).save(repo / "Ground_Truth" / "100.png")  # the photo is 40x33
    argv = ["export", "human_seg", "--manual-dir", str(download), "--out", str(tmp_path / "out")]
    assert main([*argv, "--data-dir", str(tmp_path / "tfds")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: {repo / 'Ground_Truth' / '100.png'}: mask is 20x20 (WxH), image "
        f"{repo / 'Training_Images' / '100.jpg'} is 40x33: another aspect ratio "
        "(not this image's mask?)"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("levels_up", [0, 1], ids=["archive_folder", "its_parent"])
def test_tiktok_kaggle_archive_nested_with_upper_case_extensions(tmp_path, levels_up):
    stems = ["60_0_0003", "60_0_0010", "7_1_0001", "60_0_0002", "100_2_0001", "60_0_0001"]
    written = tiktok_layout(tmp_path / "dl" / "archive", stems)
    manual = tmp_path / "dl" / "archive" if levels_up == 0 else tmp_path / "dl"
    config = SegmentationConfig(name="tiny", num_test=2)
    counts = export_to_folder("tiktok", manual, tmp_path / "out", tmp_path / "tfds", config)
    assert counts == {"train": 4, "test": 2}
    train = check_exported(tmp_path / "out", "train", written)
    test = check_exported(tmp_path / "out", "test", written)
    assert [s.stem for s in train + test] == sorted(stems)
    assert {s.image_path.suffix for s in train + test} == {".png", ".PNG"}
    assert all(s.mask_path.suffix == ".png" for s in train + test)
    assert not any("collages" in f for f in exported_files(tmp_path / "out"))


def test_isic2018_official_archives_with_licenses_nesting_and_upper_case(tmp_path):
    written = isic_layout(tmp_path / "dl", {"train": 5, "validation": 2, "test": 3})
    counts = export_to_folder("isic2018", tmp_path / "dl", tmp_path / "out", tmp_path / "tfds")
    assert counts == {"train": 5, "validation": 2, "test": 3}
    for split in counts:
        check_exported(tmp_path / "out", split, written)
    test = [s.stem for s in D.list_samples(tmp_path / "out", "test")]
    assert test == ["ISIC_0012218", "ISIC_0012225", "ISIC_0012232"]
    uppers = [p for p, _, _ in written.values() if p.suffix == ".JPG"]
    assert len(uppers) == 2
    assert not any(f.endswith(".txt") for f in exported_files(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------
# The folder format laid out by hand (the few-shot trainer's data.dir)


def test_human_seg_laid_out_by_hand_is_read_by_the_fewshot_preprocessing(human_seg, tmp_path):
    repo = human_seg[0] / "Human-Segmentation-Dataset-master"
    shutil.copytree(repo / "Training_Images", tmp_path / "train" / "images")  # with .DS_Store
    shutil.copytree(repo / "Ground_Truth", tmp_path / "train" / "masks")
    samples = D.list_samples(tmp_path, "train")
    assert len(samples) == 290
    prep = P.Preprocessing(size=32, low_res=8)
    arrays = P.load_split_arrays(samples, prep, original_masks=True)
    assert arrays["label"].shape == (290, 32, 32) and arrays["label_low"].shape == (290, 8, 8)
    assert (arrays["original_size"] == HUMAN_SEG_PHOTO).all()
    assert all(m.shape == HUMAN_SEG_PHOTO for m in arrays["mask"])


def test_fewshot_preprocessing_zooms_a_lower_res_mask_straight_to_the_model_frame(tmp_path):
    on = person(HUMAN_SEG_PHOTO, 5)
    save_photo(tmp_path / "train" / "images" / "low.jpg", HUMAN_SEG_PHOTO, 5)
    save_mask(tmp_path / "train" / "masks" / "low.png", on, (17, 20))  # 0.5: 16.5 rounded up
    save_photo(tmp_path / "train" / "images" / "full.jpg", HUMAN_SEG_PHOTO, 6)
    save_mask(tmp_path / "train" / "masks" / "full.png", on)
    samples = D.list_samples(tmp_path, "train")
    arrays = P.load_split_arrays(samples, P.Preprocessing(size=64, low_res=16), original_masks=True)
    for i, sample in enumerate(samples):
        stored = D.read_mask(sample.mask_path).astype(np.int32)
        h, w = stored.shape
        label = ndimage.zoom(stored, (64 / h, 64 / w), order=0)  # the reference's label resize
        np.testing.assert_array_equal(arrays["label"][i], label)
        np.testing.assert_array_equal(
            arrays["label_low"][i], ndimage.zoom(label, (16 / 64, 16 / 64), order=0)
        )
        assert tuple(arrays["original_size"][i]) == HUMAN_SEG_PHOTO
        np.testing.assert_array_equal(arrays["mask"][i], D.resize_nearest(stored > 0, on.shape))
    assert [s.stem for s in samples] == ["full", "low"]
    np.testing.assert_array_equal(arrays["mask"][0], on)
    image, mask = D.load_sample(samples[1])
    assert mask.shape == image.shape[:2] == HUMAN_SEG_PHOTO
    assert D.load_sample(samples[1], resize_mask=False)[1].shape == (17, 20)


def test_pseudo_label_folders_skip_junk_and_hidden_images(tmp_path):
    (tmp_path / "._a.jpg").write_bytes(b"\0\5\26\7")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    save_photo(tmp_path / ".hidden.png", (4, 4), 0)  # no `.hidden.json` needed
    assert list(iter_pseudo_labels(tmp_path)) == []


def test_grey_levels_in_a_mask_are_foreground_not_an_error(tmp_path):
    written = tiktok_layout(tmp_path / "dl", ["a", "b", "c"])
    image, mask, on = written["b"]
    values = on.astype(np.uint8) * 128
    values[0, :3] = [1, 2, 254]  # anti-aliased or JPEG-damaged edges
    Image.fromarray(values).save(mask, format="PNG")
    config = SegmentationConfig(name="tiny", num_test=1)
    export_to_folder("tiktok", tmp_path / "dl", tmp_path / "out", tmp_path / "tfds", config)
    with Image.open(tmp_path / "out" / "train" / "masks" / "b.png") as exported:
        exported = np.asarray(exported)
    assert set(np.unique(exported)) == {0, 255}
    np.testing.assert_array_equal(exported > 0, values > 0)
