"""Live parity of our automatic mask generator with the official one (same random weights).

Random SAM weights give logits of size ~0.1 that are positive on ~half of every image, so the
decoder's last layers are rescaled (`make_varied`) to give logits of size ~1 and a mask-level bias:
the thresholds then keep some masks and drop others. Both models get the same modified weights.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sam_reference import build_official, randomize_, state_dict_numpy, to_jax  # noqa: E402
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator  # noqa: E402

from amsam_jax import SamConfig  # noqa: E402
from amsam_jax.automatic_mask_generator import SamAutomaticMaskGenerator  # noqa: E402
from amsam_jax.utils.amg import (  # noqa: E402
    coco_rle_to_mask,
    generate_crop_boxes,
    remove_small_regions,
    rle_to_mask,
)

pytestmark = pytest.mark.slow

BASE = dict(
    points_per_side=8,
    pred_iou_thresh=0.2,
    stability_score_thresh=0.5,
    stability_score_offset=0.3,
    box_nms_thresh=1.0,
)
CASES = {
    "grid": {},
    "nms_and_crops": dict(box_nms_thresh=0.99, crop_n_layers=1, crop_nms_thresh=0.99),
    "small_regions": dict(min_mask_region_area=40),
}


@torch.no_grad()
def make_varied(model):
    """Logits of size ~1 with a per-mask bias (see the module docstring)."""
    up = model.mask_decoder.output_upscaling[3]
    up.weight[:, 0] = 0.0
    up.bias[0] = 5.0  # channel 0 of the upscaled embedding is constant (GELU(5) ~ 5)
    for mlp in model.mask_decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.mul_(10.0)
        mlp.layers[-1].bias.mul_(10.0)
        mlp.layers[-1].weight[0] = 0.0
        mlp.layers[-1].bias[0] = -0.1  # a mask-level logit offset of about -0.5
    return model


@pytest.fixture(scope="module")
def models():
    cfg = SamConfig.tiny()
    torch.manual_seed(0)
    ref = make_varied(randomize_(build_official(cfg), 0))
    return ref, to_jax(state_dict_numpy(ref), cfg)


@pytest.fixture(scope="module")
def image():
    """96 x 160 RGB: coloured shapes on a gradient, plus noise."""
    yy, xx = np.mgrid[:96, :160]
    img = np.stack([(xx * 3 + 40 * np.sin(yy / 7)) % 256, (yy * 5) % 256, 0 * xx], -1)
    img[((xx - 80) ** 2 + (yy - 48) ** 2) < 900, 2] = 200
    img[10:40, 110:150] = [250, 30, 30]
    img = img + np.random.default_rng(0).integers(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case", list(CASES))
def test_generate_matches_official_masks_order_boxes_and_scores(models, image, case):
    ref_model, model = models
    kw = {**BASE, **CASES[case]}
    ref = OfficialGenerator(ref_model, **kw).generate(image)
    ours = SamAutomaticMaskGenerator(model, **kw).generate(image)
    assert len(ref) > 5, f"{case}: degenerate reference ({len(ref)} masks)"
    assert len(ours) == len(ref)
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a["segmentation"].dtype == bool
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"], err_msg=f"mask {k}")
        assert a["area"] == b["area"]
        assert a["bbox"] == b["bbox"]
        assert a["point_coords"] == b["point_coords"]
        assert a["crop_box"] == b["crop_box"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) <= 1e-4
        # The stability score is a ratio of pixel counts at logit cutoffs ±offset; a pixel whose
        # logit is within float32 rounding of a cutoff may count on one side only. Allow that one
        # pixel (1 / union <= 1 / area), nothing more.
        tol = max(1e-4, 1.0 / a["area"])
        assert abs(a["stability_score"] - b["stability_score"]) <= tol, f"mask {k}"
        prob = a["probability"]
        assert prob.dtype == np.uint8 and prob.shape == image.shape[:2]
        np.testing.assert_array_equal(prob > 127, a["segmentation"])


def test_generate_without_probabilities_and_rle_outputs(models, image):
    _, model = models
    binary = SamAutomaticMaskGenerator(model, **BASE).generate(image)
    rle = SamAutomaticMaskGenerator(
        model, output_mode="uncompressed_rle", keep_probabilities=False, **BASE
    ).generate(image)
    coco = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **BASE).generate(image)
    assert "probability" not in rle[0]
    for a, b, c in zip(binary, rle, coco, strict=True):
        np.testing.assert_array_equal(rle_to_mask(b["segmentation"]), a["segmentation"])
        np.testing.assert_array_equal(coco_rle_to_mask(c["segmentation"]), a["segmentation"])


def test_crop_boxes_and_small_regions_match_official_helpers():
    from segment_anything.utils import amg as ref_amg

    for size in [(96, 160), (1500, 2250), (7, 5)]:
        for layers in (0, 1, 2):
            assert generate_crop_boxes(size, layers, 512 / 1500) == ref_amg.generate_crop_boxes(
                size, layers, 512 / 1500
            )
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((40, 50)) < rng.uniform(0.2, 0.8)
        for mode in ("holes", "islands"):
            ours, changed = remove_small_regions(mask, 6, mode)
            ref, ref_changed = ref_amg.remove_small_regions(mask, 6, mode)
            assert changed == ref_changed
            np.testing.assert_array_equal(ours, ref)
