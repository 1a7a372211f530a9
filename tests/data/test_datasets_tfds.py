"""Tests of the tfds builders on fake manual downloads in the official layouts (no TensorFlow)."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from amsam_jax.data import folder as D
from amsam_jax.data.tfds import BUILDERS, SegmentationConfig, export_to_folder
from amsam_jax.data.tfds.isic2018 import FOLDERS as ISIC_FOLDERS
from amsam_jax.datasets import main


def write_pair(image_path, mask_path, seed, size=(9, 13), mask_mode="L"):
    """A random image (format from the suffix) and a mask; returns (image path, foreground)."""
    rng = np.random.default_rng(seed)
    h, w = size
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path)
    on = rng.random((h, w)) > 0.5
    values = on.astype(np.uint8) * np.uint8(rng.integers(1, 256))
    if mask_mode == "RGB":
        values = np.stack([values, np.full_like(values, 255), values], axis=-1)
    Image.fromarray(values).save(mask_path)
    return image_path, on


def fake_tiktok(root, stems):
    folder = root / "segmentation_full_body_tik_tok_2615_img"
    masks = {
        s: write_pair(folder / "images" / f"{s}.png", folder / "masks" / f"{s}.png", i)
        for i, s in enumerate(stems)
    }
    (folder / "df.csv").write_text("images,masks\n")
    return masks


def fake_human_seg(root, n):
    folder = root / "Human-Segmentation-Dataset-master"
    return {
        str(i): write_pair(
            folder / "Training_Images" / f"{i}.jpg",
            folder / "Ground_Truth" / f"{i}.png",
            i,
            mask_mode="RGB",
        )
        for i in range(1, n + 1)
    }


def fake_isic(root, counts):
    masks = {}
    for split, (inputs, truth) in ISIC_FOLDERS.items():
        for i in range(counts.get(split, 0)):
            stem = f"ISIC_{split[:2]}{i:05d}"
            masks[stem] = write_pair(
                root / inputs / f"{stem}.jpg", root / truth / f"{stem}_segmentation.png", len(masks)
            )
        if split in counts:
            (root / inputs / "LICENSE.txt").write_text("CC-BY-NC")
            (root / truth / "ATTRIBUTION.txt").write_text("ISIC")
    return masks


def build(name, manual_dir, data_dir, **config):
    builder = BUILDERS[name](
        data_dir=str(data_dir),
        config=SegmentationConfig(name="tiny", **config),
        file_format="array_record",
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder.as_data_source()


def stems(source):
    return [source[i]["stem"].decode() for i in range(len(source))]


def check_pairs(source, written):
    """Each example holds its image file's bytes and the foreground of the mask of that stem."""
    for i in range(len(source)):
        example = source[i]
        image_path, on = written[example["stem"].decode()]
        assert example["filename"].decode() == image_path.name
        assert example["image"] == image_path.read_bytes()
        assert example["mask"].shape == (*on.shape, 1)
        np.testing.assert_array_equal(example["mask"][..., 0] > 0, on)


def test_tiktok_last_n_sorted_are_test_and_pairs_by_stem(tmp_path):
    names = ["0001", "0010", "0002", "0100", "0011", "0003"]
    masks = fake_tiktok(tmp_path / "manual", names)
    sources = build("tiktok", tmp_path / "manual", tmp_path / "tfds", num_test=2)
    assert "tensorflow" not in sys.modules
    assert stems(sources["train"]) == ["0001", "0002", "0003", "0010"]
    assert stems(sources["test"]) == ["0011", "0100"]
    check_pairs(sources["train"], masks)
    check_pairs(sources["test"], masks)


def test_human_seg_uses_plain_string_order(tmp_path):
    masks = fake_human_seg(tmp_path / "manual", 12)
    sources = build("human_seg", tmp_path / "manual", tmp_path / "tfds", num_test=3)
    assert stems(sources["train"]) == ["1", "10", "11", "12", "2", "3", "4", "5", "6"]
    assert stems(sources["test"]) == ["7", "8", "9"]
    check_pairs(sources["test"], masks)


def test_isic2018_keeps_official_splits_with_optional_validation(tmp_path):
    masks = fake_isic(tmp_path / "full", {"train": 3, "validation": 2, "test": 2})
    sources = build("isic2018", tmp_path / "full", tmp_path / "tfds_full")
    assert {k: len(v) for k, v in sources.items()} == {"train": 3, "validation": 2, "test": 2}
    assert stems(sources["validation"]) == ["ISIC_va00000", "ISIC_va00001"]
    for source in sources.values():
        check_pairs(source, masks)
    fake_isic(tmp_path / "no_val", {"train": 2, "test": 1})
    sources = build("isic2018", tmp_path / "no_val", tmp_path / "tfds_no_val")
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "test": 1}  # counts as found
    fake_isic(tmp_path / "no_test", {"train": 1})
    with pytest.raises(D.DataError, match=r"no_test: folder ISIC2018_Task1-2_Test_Input/ not"):
        build("isic2018", tmp_path / "no_test", tmp_path / "tfds_no_test")
    (tmp_path / "no_val" / ISIC_FOLDERS["validation"][0]).mkdir()
    with pytest.raises(D.DataError, match=r"no_val: folder ISIC2018_Task1_Validation_GroundT"):
        build("isic2018", tmp_path / "no_val", tmp_path / "tfds_half_val")


def test_export_to_folder_round_trips_through_list_samples(tmp_path):
    fake_human_seg(tmp_path / "manual", 5)
    config = SegmentationConfig(name="tiny", num_test=2)
    counts = export_to_folder(
        "human_seg", tmp_path / "manual", tmp_path / "out", tmp_path / "tfds", config
    )
    assert counts == {"train": 3, "test": 2}
    repo = tmp_path / "manual" / "Human-Segmentation-Dataset-master"
    pairs = D.pair_images_and_masks(repo / "Training_Images", repo / "Ground_Truth")
    originals = {s.stem: s for s in pairs}
    for split in ("train", "test"):
        for sample in D.list_samples(tmp_path / "out", split):
            assert sample.image_path.suffix == ".jpg"
            ours, theirs = D.load_sample(sample), D.load_sample(originals[sample.stem])
            np.testing.assert_array_equal(ours[0], theirs[0])
            np.testing.assert_array_equal(ours[1], theirs[1])
    with pytest.raises(D.DataError, match="exists and is not empty"):
        export_to_folder("human_seg", tmp_path / "manual", tmp_path / "out", tmp_path / "tfds")


@pytest.mark.parametrize("problem", ["missing mask", "mask aspect", "too few"])
def test_builders_stop_on_bad_downloads(tmp_path, problem):
    manual = tmp_path / "manual"
    fake_tiktok(manual, ["a", "b", "c"])
    folder = manual / "segmentation_full_body_tik_tok_2615_img"
    num_test = 1
    if problem == "missing mask":
        (folder / "masks" / "b.png").unlink()
        match = r"images/b\.png: no mask"
    elif problem == "mask aspect":
        Image.new("L", (13, 4)).save(folder / "masks" / "c.png")  # the image is 13x9
        match = r"masks/c\.png: mask is 13x4 \(WxH\), image .*images/c\.png is 13x9"
    else:
        num_test = 3
        match = r"img: 3 image/mask pairs: too few to take the last 3 as test for tiktok/tiny"
    with pytest.raises(D.DataError, match=match):
        build("tiktok", manual, tmp_path / "tfds", num_test=num_test)


def test_a_mask_of_the_same_aspect_at_another_resolution_is_resized_to_its_image(tmp_path):
    manual = tmp_path / "manual"
    written = fake_tiktok(manual, ["a", "b", "c"])
    mask = manual / "segmentation_full_body_tik_tok_2615_img" / "masks" / "b.png"
    low = np.zeros((5, 7), np.uint8)  # 9x13 (H, W) at about 0.54
    low[1:4, 2:6] = 255
    Image.fromarray(low).save(mask)
    sources = build("tiktok", manual, tmp_path / "tfds", num_test=1)
    example = sources["train"][1]
    assert example["stem"] == b"b" and example["mask"].shape == (9, 13, 1)
    np.testing.assert_array_equal(example["mask"][..., 0] > 0, D.resize_nearest(low > 0, (9, 13)))
    check_pairs(sources["test"], written)


def test_cli_export_reports_one_line_errors(tmp_path, capsys):
    fake_tiktok(tmp_path / "manual", ["a", "b", "c"])
    argv = ["export", "tiktok", "--manual-dir", str(tmp_path / "manual")]
    code = main([*argv, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "tfds")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "3 image/mask pairs: too few to take the last 2000 as test" in err
    assert err.startswith("error: ") and "\n" not in err
