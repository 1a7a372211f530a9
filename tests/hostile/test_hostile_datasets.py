"""Hostile inputs to `python -m amsam_jax.datasets export`: bad downloads, settings and outputs.

Every case starts from a copy of a real layout (tests/folder_fixtures.py), breaks one thing and
asserts exit 2, one `error:` line naming the file or setting, and that nothing under the test's
folder (download, output, tfds data folder) was created, changed or removed.
"""

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from folder_fixtures import human_seg_layout, isic_layout, tiktok_layout
from hostile import fails_cleanly
from PIL import Image

from amsam_jax.datasets import main

REPO = "Human-Segmentation-Dataset-master"
TIKTOK = "segmentation_full_body_tik_tok_2615_img"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    human_seg_layout(root / "human_seg")
    tiktok_layout(root / "tiktok", ["0001", "0002", "0003", "0004"])
    isic_layout(root / "isic2018", {"train": 3, "validation": 1, "test": 2})
    return root


@dataclasses.dataclass
class Case:
    """A copy of one layout in `tmp`, to break; `argv()` exports it to `out`."""

    tmp: Path
    pristine: Path
    monkeypatch: pytest.MonkeyPatch
    builder: str = "human_seg"
    manual: Path | None = None
    out: Path | None = None
    extra: tuple[str, ...] = ()

    def copy(self, builder: str) -> Path:
        self.builder = builder
        self.manual = shutil.copytree(self.pristine / builder, self.tmp / "download")
        return self.manual

    @property
    def human(self) -> Path:
        return self.manual / REPO

    def argv(self) -> list[str]:
        out = self.out or self.tmp / "out"
        argv = ["export", self.builder, "--manual-dir", str(self.manual), "--out", str(out)]
        return [*argv, "--data-dir", str(self.tmp / "tfds"), *self.extra]


def human(case: Case) -> Path:
    case.copy("human_seg")
    return case.human


def manual_missing(c):
    c.manual = c.tmp / "nope"
    return [str(c.tmp / "nope"), "no such folder"]


def manual_is_file(c):
    c.manual = c.tmp / "download.zip"
    c.manual.write_bytes(b"PK\3\4")
    return [str(c.manual), "not a folder"]


def manual_empty(c):
    c.manual = c.tmp / "download"
    c.manual.mkdir()
    return [str(c.manual), "empty folder"]


def manual_only_junk(c):
    c.manual = c.tmp / "download"
    (c.manual / "__MACOSX" / REPO).mkdir(parents=True)
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._Training_Images", ".hidden"):
        (c.manual / name).write_bytes(b"\0\0\0\1Bud1")
    (c.manual / "__MACOSX" / REPO / "._1.jpg").write_bytes(b"\0\5\26\7")
    return [str(c.manual), "empty folder (only OS junk or hidden files)"]


def no_ground_truth(c):
    shutil.rmtree(human(c) / "Ground_Truth")
    return [str(c.manual), "folders Training_Images/, Ground_Truth/ not found"]


def ground_truth_under_macosx_only(c):
    repo = human(c)
    (c.manual / "__MACOSX" / REPO).mkdir(parents=True)
    shutil.move(repo / "Ground_Truth", c.manual / "__MACOSX" / REPO / "Ground_Truth")
    (c.manual / "__MACOSX" / REPO / "Training_Images").mkdir()
    return [str(c.manual), "not found"]


def images_only_junk(c):
    images = human(c) / "Training_Images"
    for p in images.glob("*.jpg"):
        p.rename(images / f"._{p.name}")
    return [str(images), "no images"]


def images_only_hidden(c):
    images = human(c) / "Training_Images"
    for p in images.glob("*.jpg"):
        p.rename(images / f".{p.name}")
    return [str(images), "no images"]


def corrupt_image(c):
    (human(c) / "Training_Images" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    return [str(c.human / "Training_Images" / "1.jpg"), "cannot read image"]


def truncated_mask(c):
    mask = human(c) / "Ground_Truth" / "1.png"
    mask.write_bytes(mask.read_bytes()[:60])
    return [str(mask), "cannot read mask"]


def empty_mask_file(c):
    (human(c) / "Ground_Truth" / "1.png").write_bytes(b"")
    return [str(c.human / "Ground_Truth" / "1.png"), "cannot read mask (empty file)"]


def mask_other_aspect(c):
    Image.new("L", (20, 20)).save(human(c) / "Ground_Truth" / "1.png")
    return [
        str(c.human / "Ground_Truth" / "1.png"),
        "mask is 20x20 (WxH)",
        f"image {c.human / 'Training_Images' / '1.jpg'} is 40x33",
        "another aspect ratio",
    ]


def mask_transposed(c):
    Image.new("L", (33, 40)).save(human(c) / "Ground_Truth" / "1.png")
    return [str(c.human / "Ground_Truth" / "1.png"), "mask is 33x40 (WxH)", "40x33"]


def mask_two_pixels_off(c):
    Image.new("L", (20, 19)).save(human(c) / "Ground_Truth" / "1.png")  # 20 x 16.5 (+2.5)
    return [str(c.human / "Ground_Truth" / "1.png"), "mask is 20x19 (WxH)", "aspect ratio"]


def mask_without_image(c):
    shutil.copy(human(c) / "Ground_Truth" / "1.png", c.human / "Ground_Truth" / "295.png")
    return [str(c.human / "Ground_Truth" / "295.png"), "mask without image"]


def images_without_masks(c):
    repo = human(c)
    for n in (5, 6, 7):
        (repo / "Ground_Truth" / f"{n}.png").unlink()
    return [str(c.human / "Training_Images" / "5.jpg"), "3 images without a mask: 5.jpg, 6.jpg"]


def mask_not_png(c):
    (human(c) / "Ground_Truth" / "1.png").rename(c.human / "Ground_Truth" / "1.jpg")
    return [str(c.human / "Training_Images" / "1.jpg"), "found 1.jpg: masks must be PNG"]


def two_masks_one_image(c):
    shutil.copy(human(c) / "Ground_Truth" / "1.png", c.human / "Ground_Truth" / "1.PNG")
    return ["Ground_Truth", "two masks for one image"]


def duplicate_image_stem(c):
    Image.new("RGB", (40, 33)).save(human(c) / "Training_Images" / "1.png")
    return [str(c.human / "Training_Images"), "duplicate image stem '1'"]


def too_few_pairs(c):
    repo = human(c)
    for n in range(51, 290):
        (repo / "Training_Images" / f"{n}.jpg").unlink()
        (repo / "Ground_Truth" / f"{n}.png").unlink()
    return [str(c.human), "51 image/mask pairs: too few to take the last 100 as test"]


def two_copies(c):
    shutil.copytree(human(c), c.manual / "Human-Segmentation-Dataset-main")  # extracted twice
    return [str(c.manual), "found more than once", str(c.human), "Dataset-main"]


def image_over_pixel_limit(c):
    human(c)
    c.monkeypatch.setenv("AMSAM_MAX_IMAGE_PIXELS", "1000")
    return [str(c.human / "Training_Images" / "1.jpg"), "image too large: 40x33 = 1,320 pixels"]


def bad_pixel_limit_setting(c):
    human(c)
    c.monkeypatch.setenv("AMSAM_MAX_IMAGE_PIXELS", "lots")
    return ["AMSAM_MAX_IMAGE_PIXELS", "invalid value 'lots'"]


def unknown_config(c):
    human(c)
    c.extra = ("--config", "nope")
    return ["config", "unknown human_seg config 'nope' (known: paper)"]


def unknown_builder(c):
    human(c)
    c.builder = "coco"
    return ["argument builder", "invalid choice: 'coco'"]


def data_dir_is_file(c):
    human(c)
    (c.tmp / "tfds").write_text("not a folder")
    return [str(c.tmp / "tfds"), "cannot build the dataset"]


def out_is_file(c):
    human(c)
    c.out = c.tmp / "out.txt"
    c.out.write_text("keep me")
    return [str(c.out), "exists and is not a folder"]


def out_not_empty(c):
    human(c)
    c.out = c.tmp / "out"
    (c.out / "train").mkdir(parents=True)
    (c.out / "notes.txt").write_text("keep me")
    return [str(c.out), "exists and is not empty"]


def out_parent_is_file(c):
    human(c)
    (c.tmp / "outs").write_text("a file")
    c.out = c.tmp / "outs" / "human_seg"
    return [str(c.out), f"cannot create: {c.tmp / 'outs'} is not a folder"]


def out_unwritable(c):
    human(c)
    parent = c.tmp / "readonly"
    parent.mkdir()
    c.out = parent / "human_seg"
    if os.geteuid() == 0:  # root writes anywhere: the target is a file in it instead
        c.out.write_text("a file")
        problem = "exists and is not a folder"
    else:
        problem = f"cannot create: {parent} is not writable"
    parent.chmod(0o500)
    return [str(c.out), problem]


def tiktok_no_masks(c):
    shutil.rmtree(c.copy("tiktok") / TIKTOK / TIKTOK / "masks")
    return [str(c.manual), "folders images/, masks/ not found"]


def tiktok_mask_without_image(c):
    masks = c.copy("tiktok") / TIKTOK / TIKTOK / "masks"
    shutil.copy(masks / "0001.png", masks / "0009.png")
    return [str(masks / "0009.png"), "mask without image"]


def tiktok_too_few_for_the_paper_split(c):
    c.copy("tiktok")
    return [TIKTOK, "4 image/mask pairs: too few to take the last 2000 as test for tiktok/paper"]


def isic_no_test_input(c):
    shutil.rmtree(c.copy("isic2018") / "ISIC2018" / "ISIC2018_Task1-2_Test_Input")
    return [str(c.manual), "folder ISIC2018_Task1-2_Test_Input/ not found"]


def isic_validation_without_ground_truth(c):
    shutil.rmtree(c.copy("isic2018") / "ISIC2018" / "ISIC2018_Task1_Validation_GroundTruth")
    return [str(c.manual), "folder ISIC2018_Task1_Validation_GroundTruth/ not found", "its input"]


def isic_test_mask(c) -> Path:
    """The first test mask of a fresh ISIC copy (ISIC_<id>_segmentation.png)."""
    truth = c.copy("isic2018") / "ISIC2018" / "ISIC2018_Task1_Test_GroundTruth"
    return sorted(truth.glob("ISIC_*_segmentation.png"))[0]


def isic_mask_without_suffix(c):
    mask = isic_test_mask(c)
    stem = mask.name.removesuffix("_segmentation.png")
    mask.rename(mask.with_name(f"{stem}.png"))
    return [f"{stem}.jpg", f"no mask {mask}"]


def isic_mask_as_jpeg(c):
    mask = isic_test_mask(c)
    mask.rename(mask.with_suffix(".jpg"))
    return [mask.name.replace("_segmentation.png", ".jpg"), "masks must be PNG", mask.stem]


def isic_corrupt_upper_case_image(c):
    image = next(c.copy("isic2018").rglob("ISIC_*.JPG"))
    image.write_bytes(b"\xff\xd8\xff")
    return [str(image), "cannot read image"]


def isic_upper_case_mask_other_aspect(c):
    mask = next(c.copy("isic2018").rglob("ISIC_*_segmentation.PNG"))
    Image.new("L", (5, 30)).save(mask, format="PNG")
    return [str(mask), "mask is 5x30 (WxH)", mask.name.replace("_segmentation.PNG", ".JPG")]


CASES: list[Callable[[Case], list[str]]] = [
    manual_missing,
    manual_is_file,
    manual_empty,
    manual_only_junk,
    no_ground_truth,
    ground_truth_under_macosx_only,
    images_only_junk,
    images_only_hidden,
    corrupt_image,
    truncated_mask,
    empty_mask_file,
    mask_other_aspect,
    mask_transposed,
    mask_two_pixels_off,
    mask_without_image,
    images_without_masks,
    mask_not_png,
    two_masks_one_image,
    duplicate_image_stem,
    too_few_pairs,
    two_copies,
    image_over_pixel_limit,
    bad_pixel_limit_setting,
    unknown_config,
    unknown_builder,
    data_dir_is_file,
    out_is_file,
    out_not_empty,
    out_parent_is_file,
    out_unwritable,
    tiktok_no_masks,
    tiktok_mask_without_image,
    tiktok_too_few_for_the_paper_split,
    isic_no_test_input,
    isic_validation_without_ground_truth,
    isic_mask_without_suffix,
    isic_mask_as_jpeg,
    isic_corrupt_upper_case_image,
    isic_upper_case_mask_other_aspect,
]


@pytest.mark.parametrize("setup", CASES, ids=[f.__name__ for f in CASES])
def test_datasets_export_fails_cleanly(setup, tmp_path, pristine, capsys, monkeypatch):
    case = Case(tmp_path / "case", pristine, monkeypatch)
    case.tmp.mkdir()
    names = setup(case)
    try:
        line = fails_cleanly(main, case.argv(), capsys, names=names, watch=[case.tmp])
    finally:
        for folder in case.tmp.rglob("*"):  # let pytest remove what a case made read-only
            if folder.is_dir():
                folder.chmod(0o700)
    assert line.startswith("error: ") or "error: argument builder" in line
    assert not list(case.tmp.glob(".out*.tmp-*"))
