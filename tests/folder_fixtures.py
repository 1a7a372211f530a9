"""Test helper: small random image/mask pairs in the folder format (DIR/<split>/{images,masks}),
and the paper's datasets in the layouts their archives really have."""

import zlib

import numpy as np
from PIL import Image


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
# The paper's datasets as they are really distributed (tiny images, the real names and layouts)

HUMAN_SEG_STEMS = [str(n) for n in [*range(1, 290), 300]]  # 290 pairs: 290..299 are absent
HUMAN_SEG_PHOTO = (33, 40)  # (H, W); the real photos are e.g. 1055 x 1280 (H x W)
# Mask sizes (H, W) of the same aspect ratio, each side within 1 px of the exact scaled value:
# 0.5 -> 16.5 x 20 rounded down and up, 0.75 -> 24.75 x 30 up and down, 0.43 -> 14.19 x 17.2,
# and 0.5 with both sides 1 px off the other way (17 x 21: |17 - 16.5|, |21 - 20| <= 1).
HUMAN_SEG_MASK_SIZES = [(16, 20), (17, 20), (25, 30), (24, 30), (14, 17), (17, 21)]
JUNK_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


def person(size, seed):
    """A full-resolution (H, W) bool foreground: an off-centre ellipse, different per seed."""
    h, w = size
    rng = np.random.default_rng(seed)
    cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
    ry, rx = h * rng.uniform(0.2, 0.35), w * rng.uniform(0.15, 0.3)
    y, x = np.mgrid[:h, :w] + 0.5
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def save_photo(path, size, seed, fmt=None):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format=fmt)


def save_mask(path, on, size=None, mode="L", fmt=None):
    """Writes `on` as a 0/255 mask, downscaled with PIL NEAREST to `size` (H, W) if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(on.astype(np.uint8) * 255)
    if size is not None and size != on.shape:
        img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)
    img.convert(mode).save(path, format=fmt)


def add_junk(folder):
    """The OS junk a macOS/Windows copy leaves: .DS_Store, Thumbs.db, desktop.ini, ._<file>."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in JUNK_FILES:
        (folder / name).write_bytes(b"\0\0\0\1Bud1junk")
    (folder / "._1.png").write_bytes(b"\0\5\26\7AppleDouble")


def human_seg_layout(root):
    """Vikram Shenoy's repository as cloned: `root/Human-Segmentation-Dataset-master/`.

    290 pairs `Training_Images/<n>.jpg` + `Ground_Truth/<n>.png` (n = 1..289, 300), 2/3 of the
    masks at a lower resolution than their photo with the same aspect ratio, `.DS_Store` in
    every folder.

    Returns:
        {stem: (photo path, mask path, full-resolution foreground (H, W) bool)}.
    """
    repo = root / "Human-Segmentation-Dataset-master"
    out = {}
    for i, stem in enumerate(HUMAN_SEG_STEMS):
        on = person(HUMAN_SEG_PHOTO, i)
        photo = repo / "Training_Images" / f"{stem}.jpg"
        mask = repo / "Ground_Truth" / f"{stem}.png"
        save_photo(photo, HUMAN_SEG_PHOTO, i)
        low = HUMAN_SEG_MASK_SIZES[i % len(HUMAN_SEG_MASK_SIZES)] if i % 3 else None
        save_mask(mask, on, low)
        out[stem] = (photo, mask, on)
    for folder in (repo, repo / "Training_Images", repo / "Ground_Truth"):
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (repo / "README.md").write_text("# Human Segmentation Dataset\n300 images\n")
    return out


TIKTOK_DIR = "segmentation_full_body_tik_tok_2615_img"


def tiktok_layout(root, stems):
    """The Kaggle archive unzipped into `root`: `df.csv` and the frames two folders down,
    `segmentation_full_body_tik_tok_2615_img/segmentation_full_body_tik_tok_2615_img/`
    {images, masks, collages}/<name>.png; every 3rd file has an upper-case `.PNG`, the masks
    are RGB 0/255; a macOS `__MACOSX/` copy of resource forks and OS junk next to them.

    Returns:
        {stem: (image path, mask path, foreground (H, W) bool)}.
    """
    inner = root / TIKTOK_DIR / TIKTOK_DIR
    out = {}
    for i, stem in enumerate(stems):
        suffix = ".PNG" if i % 3 == 2 else ".png"
        size = (24 + i % 2, 18)
        on = person(size, 100 + i)
        image = inner / "images" / f"{stem}{suffix}"
        mask = inner / "masks" / f"{stem}{suffix}"
        save_photo(image, size, 100 + i, fmt="PNG")
        save_mask(mask, on, mode="RGB", fmt="PNG")
        save_photo(inner / "collages" / f"{stem}.png", size, 200 + i)
        out[stem] = (image, mask, on)
    rows = "".join(
        f"{i},images/{p.name},masks/{m.name}\n" for i, (p, m, _) in enumerate(out.values())
    )
    (root / "df.csv").write_text(",images,masks\n" + rows)
    mac = root / "__MACOSX" / TIKTOK_DIR / TIKTOK_DIR
    for sub in ("images", "masks"):
        add_junk(mac / sub)
        add_junk(inner / sub)
    return out


ISIC_FOLDERS = {
    "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}


def isic_layout(root, counts, nested=("ISIC2018_Task1-2_Training_Input",)):
    """The official ISIC-2018 Task 1 ZIPs extracted into `root/ISIC2018/`: one folder per ZIP
    with `ISIC_<7 digits>.jpg` or `ISIC_<id>_segmentation.png` and its LICENSE.txt and
    ATTRIBUTION.txt; folders in `nested` extracted into a folder of their own name (twice
    nested); every 4th image `.JPG` and its mask `.PNG`.

    Returns:
        {stem: (image path, mask path, foreground (H, W) bool)}.
    """
    out, n = {}, 0
    for split, (inputs, truth) in ISIC_FOLDERS.items():
        if split not in counts:
            continue
        folders = {}
        for name in (inputs, truth):
            folder = root / "ISIC2018" / name
            folders[name] = folder / name if name in nested else folder
            (folders[name] / "LICENSE.txt").parent.mkdir(parents=True, exist_ok=True)
            (folders[name] / "LICENSE.txt").write_text("CC-BY-NC 4.0\n")
            (folders[name] / "ATTRIBUTION.txt").write_text("ISIC Archive\n")
            add_junk(folders[name])
        for _ in range(counts[split]):
            stem = f"ISIC_{12169 * (split == 'test') + 7 * n:07d}"
            upper = n % 4 == 3
            size = (15 + n % 3, 20)
            on = person(size, 300 + n)
            image = folders[inputs] / f"{stem}{'.JPG' if upper else '.jpg'}"
            mask = folders[truth] / f"{stem}_segmentation{'.PNG' if upper else '.png'}"
            save_photo(image, size, 300 + n, fmt="JPEG")
            save_mask(mask, on, fmt="PNG")
            out[stem] = (image, mask, on)
            n += 1
    return out
