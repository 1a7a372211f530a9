"""Multi-class few-shot segmentation (docs/fewshot.md §4.5): label files of class ids, the
`data.num_classes` setting, calibration and metrics over K classes, class-coloured overlays, the
bundled 3-class sample, a 3-class run through the trainer, and K = 1 left as the binary path."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from amsam_jax.data import synthetic
from amsam_jax.data.folder import (
    DataError,
    list_samples,
    load_sample,
    read_label,
    read_mask,
    read_mask_file,
)
from amsam_jax.evaluation.fewshot import evaluate_fewshot as evaluate
from amsam_jax.evaluation.plots import CLASS_COLORS, overlay, write_samples
from amsam_jax.evaluation.workdir import evaluate_workdir
from amsam_jax.fewshot import trainer
from amsam_jax.fewshot.calibration import calibrate_masks
from amsam_jax.fewshot.config import DataConfig, FewShotConfig
from amsam_jax.fewshot.preprocessing import Preprocessing, Split, load_split, load_split_arrays
from amsam_jax.fewshot.recipes import am_sam
from amsam_jax.training.config import ConfigError, SamSection, apply_overrides

LABELS = np.array([[0, 1, 1, 2], [3, 3, 0, 2], [0, 0, 1, 3]], np.uint8)
EPOCH_KEYS = {"kind", "step", "epoch", "d2_dice", "d2_iou", "best_d2_dice"}
SUMMARY_KEYS = {"workdir", "weights", "boxes", "steps", "best_d2_dice", "final_d2_dice"}


def _palette_png(path, labels: np.ndarray) -> None:
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [255] * (252 * 3))
    img.save(path)


# ------------------------------------------------------------------------------ label files


def test_palette_and_single_channel_masks_read_as_class_ids(tmp_path):
    _palette_png(tmp_path / "p.png", LABELS)
    Image.fromarray(LABELS, mode="L").save(tmp_path / "l.png")
    Image.fromarray(LABELS.astype(np.uint16)).save(tmp_path / "i16.png")
    for name in ("p.png", "l.png", "i16.png"):
        got = read_label(tmp_path / name, 3)
        np.testing.assert_array_equal(got, LABELS, err_msg=name)
        # One class: the binary reading of today (value > 0), whatever the file stores.
        np.testing.assert_array_equal(read_label(tmp_path / name, 1), LABELS > 0)
        assert read_label(tmp_path / name, 1).dtype == bool
    # A palette file's indices are the ids, not its colours (index 3 is blue here).
    assert Image.open(tmp_path / "p.png").mode == "P"
    # More classes than the file uses are fine (a class absent from these images).
    np.testing.assert_array_equal(read_label(tmp_path / "l.png", 5), LABELS)


def test_label_value_above_num_classes_is_one_line_naming_the_file_and_setting(tmp_path):
    path = tmp_path / "five.png"
    Image.fromarray(np.where(LABELS == 3, 5, LABELS).astype(np.uint8)).save(path)
    with pytest.raises(DataError) as e:
        read_label(path, 3)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "label value 5" in msg and "data.num_classes=3" in msg
    # A 0/255 binary mask with K > 1 is refused with the binary setting named.
    binary = tmp_path / "binary.png"
    Image.fromarray((LABELS > 0).astype(np.uint8) * 255).save(binary)
    with pytest.raises(DataError, match=r"255 outside 0\.\.2.*data\.num_classes=1"):
        read_label(binary, 2)
    np.testing.assert_array_equal(read_label(binary, 1), LABELS > 0)  # K = 1: as today


def test_negative_or_floating_point_values_are_not_class_ids(tmp_path):
    Image.fromarray(np.where(LABELS == 3, -1, LABELS.astype(np.int32))).save(tmp_path / "i.tif")
    with pytest.raises(DataError, match=r"label value -1 outside 0\.\.3"):
        read_label(tmp_path / "i.tif", 3)
    Image.fromarray(LABELS.astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="floating-point mask"):
        read_label(tmp_path / "f.tif", 3)


def test_the_trainer_names_a_bad_label_file_before_training(tmp_path):
    data = synthetic.make_multiclass_dataset(tmp_path / "data", n_train=4, n_test=1, size=(32, 48))
    cfg = apply_overrides(am_sam("smoke"), [f"data.dir={data}", "data.num_classes=2"])
    with pytest.raises(DataError, match=r"scene_000\.png: label value 3 outside 0\.\.2"):
        trainer.train(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------------- settings


def test_data_num_classes_sets_the_mask_tokens_and_a_contradiction_is_refused():
    binary = FewShotConfig()
    assert binary.validate() is binary and binary.sam.num_classes == 1
    cfg = FewShotConfig(data=DataConfig(num_classes=3)).validate()
    assert cfg.sam.num_classes == 3 and cfg.data.num_classes == 3
    assert cfg.validate() is cfg  # resolved once, stable on reload (config.json)
    agreeing = FewShotConfig(data=DataConfig(num_classes=3), sam=SamSection(num_classes=3))
    assert agreeing.validate() is agreeing
    contradicting = FewShotConfig(data=DataConfig(num_classes=3), sam=SamSection(num_classes=2))
    with pytest.raises(ConfigError) as e:
        contradicting.validate()
    assert "\n" not in str(e.value)
    assert "sam.num_classes=2" in str(e.value) and "data.num_classes=3" in str(e.value)
    # sam.num_classes alone (labels would be read as binary) is a contradiction too.
    with pytest.raises(ConfigError, match="sam.num_classes=3: contradicts data.num_classes=1"):
        FewShotConfig(sam=SamSection(num_classes=3)).validate()
    with pytest.raises(ConfigError, match="data.num_classes=0: must be >= 1"):
        FewShotConfig(data=DataConfig(num_classes=0)).validate()


def test_bundled_multiclass_sample_is_a_tiny_regeneration_with_every_class_in_every_image(
    tmp_path,
):
    params = synthetic.BUNDLED_MULTICLASS
    fresh = synthetic.make_multiclass_dataset(tmp_path / "fresh", **params)
    bundled = synthetic.bundled_synthetic_dir(3)
    assert synthetic.bundled_synthetic_dir(1) != bundled
    for split, n in (("train", params["n_train"]), ("test", params["n_test"])):
        ours, theirs = list_samples(bundled, split), list_samples(fresh, split)
        assert [s.stem for s in ours] == [s.stem for s in theirs] and len(ours) == n
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(load_sample(a, num_classes=3), load_sample(b, num_classes=3),
                            strict=True):  # fmt: skip
                np.testing.assert_array_equal(x, y)
            assert set(np.unique(load_sample(a, num_classes=3)[1])) == {0, 1, 2, 3}
            assert Image.open(a.mask_path).mode == "P"
    files = [p for p in bundled.rglob("*") if p.is_file()]
    assert len(files) == 2 * (params["n_train"] + params["n_test"])
    assert sum(p.stat().st_size for p in files) < 60_000


# ------------------------------------------------------------------- preprocessing, K = 1 path


def test_preprocessing_keeps_class_ids_and_binarises_with_one_class():
    samples = list_samples(synthetic.bundled_synthetic_dir(3), "train")[:2]
    multi = load_split_arrays(samples, Preprocessing(num_classes=3), original_masks=True)
    binary = load_split_arrays(samples, Preprocessing(), original_masks=True)
    for arrays in (multi, binary):
        assert arrays["label"].dtype == arrays["label_low"].dtype == np.int32
    assert set(np.unique(multi["label_low"])) == {0, 1, 2, 3}
    np.testing.assert_array_equal(binary["label_low"], multi["label_low"] > 0)
    np.testing.assert_array_equal(binary["label"], multi["label"] > 0)
    np.testing.assert_array_equal(binary["image"], multi["image"])  # images do not depend on K
    for m_multi, m_binary in zip(multi["mask"], binary["mask"], strict=True):
        np.testing.assert_array_equal(m_binary, m_multi > 0)
    assert Preprocessing(num_classes=3).key() == Preprocessing().key()  # one embedding cache


def test_one_class_labels_are_the_binary_path_bit_for_bit():
    """K = 1 reads, zooms and stores labels as the binary path always did (docs/fewshot.md
    §4.1): mask value > 0 of the file, order-0 zooms, int32; the bundled binary set's 0/255 masks
    give the same arrays as masks of 0/1."""
    prep = Preprocessing()
    samples = list_samples(synthetic.bundled_synthetic_dir(), "train")[:3]
    arrays = load_split_arrays(samples, prep, original_masks=True)
    for i, sample in enumerate(samples):
        stored = read_mask_file(sample.mask_path)
        assert set(np.unique(stored)) == {0, 255}
        label = (stored > 0).astype(np.int32)
        label = ndimage.zoom(label, (256 / label.shape[0], 256 / label.shape[1]), order=0)
        low = ndimage.zoom(label, (64 / 256, 64 / 256), order=0)
        np.testing.assert_array_equal(arrays["label"][i], label)
        np.testing.assert_array_equal(arrays["label_low"][i], low)
        assert arrays["mask"][i].dtype == bool
        np.testing.assert_array_equal(arrays["mask"][i], read_mask(sample.mask_path))
    split = load_split(samples, prep)
    assert split.num_classes == 1


def test_one_class_overlays_are_unchanged_and_several_classes_get_their_colours(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    low = np.zeros((1, 4, 4), np.int32)
    low[0, 0, :2], low[0, 1, 2:], low[0, 3, 0] = 1, 2, 3
    pred = np.roll(low, 1, axis=2)

    def split(k: int) -> Split:
        masks = (np.zeros((8, 8), bool),)
        return Split(("s",), image, low, np.array([[8, 8]]), masks, num_classes=k)

    def panels(path) -> list[np.ndarray]:
        return np.split(np.asarray(Image.open(path)), 3, axis=1)

    # K = 1: the image, green ground truth (label > 0), red prediction, as before.
    write_samples(split(1), pred, tmp_path / "binary", 1)
    up = np.kron(low[0], np.ones((2, 2), np.int32))
    up_pred = np.kron(pred[0], np.ones((2, 2), np.int32))
    expected = [overlay(image[0], np.zeros((8, 8), bool)), overlay(image[0], up > 0, (64, 255, 64)),
                overlay(image[0], up_pred > 0)]  # fmt: skip
    for got, want in zip(panels(tmp_path / "binary" / "s.png"), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # K = 3: class j tinted CLASS_COLORS[j - 1] in both panels, background untinted.
    write_samples(split(3), pred, tmp_path / "multi", 1)
    plain, gt, prediction = panels(tmp_path / "multi" / "s.png")
    np.testing.assert_array_equal(plain, expected[0])
    for panel, labels in ((gt, up), (prediction, up_pred)):
        for j in range(4):
            want = expected[0] if j == 0 else overlay(image[0], labels == j, CLASS_COLORS[j - 1])
            np.testing.assert_array_equal(panel[labels == j], want[labels == j], err_msg=str(j))
    assert len(set(CLASS_COLORS)) == len(CLASS_COLORS)


# ------------------------------------------------------------------------------ calibration


def _literal_calibration(u: np.ndarray, h: np.ndarray, alpha: float) -> np.ndarray:
    """Paper Eqs. 9-12 with R materialised: u (b, c, hh, ww), h (b, n, c), float64."""
    b, c = u.shape[:2]
    n = h.shape[1]
    r = np.concatenate(
        [np.repeat(u[:, i : i + 1], n, axis=1) * h[:, :, i].reshape(b, n, 1, 1) for i in range(c)]
    )  # (b·c, n, hh, ww): Eqs. 9-10
    m_new = np.repeat(r.mean(axis=0, keepdims=True), b, axis=0)  # Eq. 11
    return alpha * np.einsum("bnc,bchw->bnhw", h, u) + (1 - alpha) * m_new  # Eq. 12


@pytest.mark.parametrize("b", [1, 2])
def test_calibration_of_four_class_logits_is_eqs_9_to_12_over_every_class(b):
    """K = 3 (n = 4 mask tokens): the closed form applied to all n logit channels equals Eqs. 9-12
    materialised, in float64; at b = 2 every class of a sample gets the batch mean of that class."""
    rng = np.random.default_rng(b)
    u = rng.standard_normal((b, 32, 16, 16))
    h = rng.standard_normal((b, 4, 32))
    m_orig = np.einsum("bnc,bchw->bnhw", h, u)
    with jax.enable_x64(True):
        got = np.asarray(calibrate_masks(jnp.asarray(m_orig), 32, 0.7, "batch"))
    np.testing.assert_allclose(got, _literal_calibration(u, h, 0.7), rtol=0, atol=1e-12)
    batch_term = np.broadcast_to((0.3 / 32) * m_orig.mean(axis=0, keepdims=True), m_orig.shape)
    np.testing.assert_allclose(got - 0.7 * m_orig, batch_term, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- trainer run


def smoke(epochs: int = 2, **data) -> FewShotConfig:
    cfg = am_sam("smoke")
    sets = {"epochs": epochs, "checkpoint_every_s": 0, "num_samples": 2}
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **sets),
        data=dataclasses.replace(cfg.data, **data),
    )


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multiclass") / "run"
    return workdir, trainer.train(smoke(num_classes=3), workdir)


def test_three_class_run_reports_per_class_dice_in_summary_and_metrics(three_class_run):
    workdir, summary = three_class_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["num_classes"] == 3 and config["sam"]["num_classes"] == 3
    assert config["data"]["dir"] is None  # the bundled 3-class sample
    assert set(summary) == SUMMARY_KEYS | {"final_d2_dice_per_class", "final_d2_iou_per_class"}
    per_class = summary["final_d2_dice_per_class"]
    assert len(per_class) == 3 and all(0 <= v <= 100 for v in per_class)
    assert np.isclose(np.mean(per_class), summary["final_d2_dice"], rtol=1e-12, atol=1e-12)
    assert len(summary["final_d2_iou_per_class"]) == 3
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2
    for r in epochs:
        assert set(r) == EPOCH_KEYS | {"d2_dice_per_class", "d2_iou_per_class"}
        assert np.isclose(np.mean(r["d2_dice_per_class"]), r["d2_dice"], rtol=1e-12, atol=1e-12)
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == [
        "scene_002.png",
        "scene_003.png",
    ]


def test_three_class_evaluation_reports_per_class_dice_and_iou(three_class_run):
    workdir, _ = three_class_run
    result = evaluate_workdir(workdir, "final", overlays=1)
    assert result["data_dir"] == str(synthetic.bundled_synthetic_dir(3))
    assert len(result["per_image"]) == synthetic.BUNDLED_MULTICLASS["n_test"]
    for key in ("dice", "iou"):
        per_class = result[f"{key}_per_class"]
        assert len(per_class) == 3
        rows = np.array([r[f"{key}_per_class"] for r in result["per_image"]])
        np.testing.assert_allclose(per_class, rows.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(rows.mean(axis=1), [r[key] for r in result["per_image"]])
        assert np.isclose(np.mean(per_class), result[key], rtol=1e-12, atol=1e-12)
    saved = json.loads((workdir / "eval_test.json").read_text())
    assert saved["dice_per_class"] == result["dice_per_class"]


def test_a_binary_evaluation_reports_no_per_class_keys(tmp_path):
    setup = trainer.build_setup(smoke().validate(), tmp_path, quiet=True)
    assert setup.preprocessing.num_classes == setup.d2.num_classes == 1
    args = (setup.graphdef, setup.step_cfg, setup.initial, setup.frozen, setup.d2.eval_data())
    result = evaluate(*args)
    assert set(result) == {"dice", "iou", "dice_original", "per_image"}
    assert all(set(r) == {"stem", "dice", "iou", "dice_original"} for r in result["per_image"])
    assert trainer.per_class_of(result, "d2_") == {}
