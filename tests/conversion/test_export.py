"""Export to the official formats: the segment-anything state dict and ONNX (docs/export.md).

The fast tests need no torch (the inverse key table, the torch-free writer, the LoRA merge, the
side file, hostile inputs); the slow ones load the exports into the official code and ONNX Runtime
and compare with this project's predictor and few-shot forward (logits within 1e-4 * max|ref|).
"""

import dataclasses
import json
import sys

import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
import torch
from flax import nnx
from litemedsam_reference import build_mobile_sam_reference, randomize_
from litemedsam_reference import reference as litemedsam_code
from sam_reference import official_pair, state_dict_numpy, to_jax
from segment_anything import SamPredictor as OfficialPredictor
from segment_anything import sam_model_registry
from smoke_workdir import smoke_workdir

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import abstract_state, load_sam, save_sam
from amsam_jax.conversion.mapping import source_of, target_of
from amsam_jax.conversion.torch_pickle import load_state_dict, write_state_dict
from amsam_jax.fewshot.blo import BoxResidual, StepConfig, TrainingModel, forward
from amsam_jax.fewshot.lora import LoRALinear, apply_lora
from amsam_jax.fewshot.recipes import am_sam
from amsam_jax.fewshot.trainer import load_run_state, train
from amsam_jax.predictor import SamPredictor
from amsam_jax.training.prompt_decoder import PromptDecoder
from weights_conversion import export_onnx as export_onnx_module
from weights_conversion.__main__ import main
from weights_conversion.export_onnx import (
    NoPromptSpec,
    export_no_prompt,
    export_onnx,
    official_sam,
    require_torch,
)
from weights_conversion.export_sam import (
    EXTRA_SUFFIX,
    export_sam,
    merged_state,
    official_state_dict,
)
from weights_conversion.make_golden import build_litemedsam_like, build_official, synthetic_image

TOLERANCE = 1e-4  # of max|reference| on logits
# A small random ViT: ViT-B width, one (global) block, 256 px.
SMALL_VIT = SamConfig.vit_b(image_size=256, encoder_depth=1, encoder_global_attn_indexes=(0,))
# LiteMedSAM's layout at a small size (the tiny_vit golden fixture's configuration).
SMALL_TINY_VIT = SamConfig.tiny_vit(
    image_size=128,
    tiny_vit_patch_stride=1,
    tiny_vit_merge_strides=(2, 2, 2),
    preprocess="medsam",
    pixel_mean=(0.0, 0.0, 0.0),
    pixel_std=(1.0, 1.0, 1.0),
)


def close(ours: np.ndarray, ref: np.ndarray) -> bool:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return ours.shape == ref.shape and np.max(np.abs(ours - ref)) <= TOLERANCE * np.max(np.abs(ref))


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def nchw(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory):
    """(official torch model, converted SAM dir) with the same random SMALL_VIT weights."""
    ref, ours = official_pair(SMALL_VIT, seed=5)
    sam_dir = tmp_path_factory.mktemp("export") / "sam"
    save_sam(ours, SMALL_VIT, sam_dir, {"file": "random"})
    return ref, sam_dir


# --- the inverse key table and the writer (no torch) ---


@pytest.mark.parametrize("cfg", [SamConfig.tiny(), SamConfig.tiny_vit()], ids=["vit", "tiny_vit"])
def test_every_model_path_has_an_official_key_that_maps_back_to_it(cfg):
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(abstract_state(cfg))]
    unmapped = []
    for path in paths:
        found = source_of(path)
        if found is None:
            unmapped.append(path)
        else:
            assert target_of(found[0]) == (path, found[1])
    assert unmapped == ["pixel_mean", "pixel_std"]  # non-persistent buffers in segment_anything


def test_written_state_dict_reads_back_bit_for_bit_with_dtypes_and_shapes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "t": rng.standard_normal((4, 6)).astype(np.float32).T,  # not C-contiguous
        "n": np.array(7, np.int64),  # 0-d, as batch-norm counters
        "e": np.zeros((0, 3), np.float32),
        "h": np.arange(5, dtype=np.float16),
        "b": np.array([True, False]),
    }
    write_state_dict(tensors, tmp_path / "x.pth")
    back = load_state_dict(tmp_path / "x.pth")
    assert list(back) == list(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key], value), key


def test_lora_merge_equals_the_low_rank_path():
    sam = build_sam(SamConfig.tiny(), seed=0)
    apply_lora(sam, rank=3, alpha=6.0, seed=1)  # scale 2
    rng = np.random.default_rng(2)
    for _, node in nnx.iter_graph(sam):
        if isinstance(node, LoRALinear):
            node.lora_b[...] = jnp.asarray(rng.standard_normal(node.lora_b.shape), jnp.float32)
    flat, merged = merged_state(sam)
    assert merged == 14
    assert not any("lora" in k for k in flat)
    proj = sam.mask_decoder.transformer.layers[0].self_attn.q_proj
    x = rng.standard_normal((5, proj.kernel.shape[0])).astype(np.float32)
    prefix = "mask_decoder.transformer.layers.0.self_attn.q_proj"
    merged_y = x @ flat[f"{prefix}.kernel"] + flat[f"{prefix}.bias"]
    np.testing.assert_allclose(merged_y, np.asarray(proj(jnp.asarray(x))), rtol=1e-5, atol=1e-5)


def test_a_trained_sum_task_table_goes_to_the_side_file_only(tmp_path, capsys):
    cfg = SamConfig.tiny()
    sam = build_sam(cfg, seed=0)
    rows = sam.prompt_encoder.task_prompt_embedding
    rows[2].weight[...] = jnp.full(rows[2].weight.shape, 0.5)
    run = tmp_path / "sum_run"
    save_sam(sam, cfg, run / "sam_finetuned", {"run": "test"})
    (run / "config.json").write_text(json.dumps({"kind": "sum", "sam": {}, "train": {}}))
    out = tmp_path / "out" / "sum.pth"
    assert main(["export-sam", str(run), str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("side file: ")
    sd = load_state_dict(out)
    assert not any("task_prompt" in k for k in sd)
    side = np.load(str(out) + EXTRA_SUFFIX)
    assert np.array_equal(
        side["prompt_encoder.task_prompt_embedding.2.weight"], np.full((1, 32), 0.5)
    )
    assert json.loads(str(side["meta"]))["kind"] == "sum"


def test_an_untrained_task_table_writes_no_side_file_and_removes_a_stale_one(tmp_path, capsys):
    cfg = SamConfig.tiny()
    save_sam(build_sam(cfg, seed=0), cfg, tmp_path / "sam", {"file": "random"})
    out = tmp_path / "sam.pth"
    stale = tmp_path / ("sam.pth" + EXTRA_SUFFIX)
    stale.write_bytes(b"old")
    assert main(["export-sam", str(tmp_path / "sam"), str(out), "--overwrite"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert out.is_file() and not stale.exists()


# --- hostile inputs: one line, exit 2, nothing written ---


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("command", ["export-sam", "export-onnx"])
def test_a_missing_directory_fails_with_one_line(tmp_path, capsys, command):
    line = _one_line_error(capsys, [command, str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "no such directory" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export-sam", "export-onnx"])
def test_a_folder_that_is_not_a_run_fails_with_one_line(tmp_path, capsys, command):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"hello": 1}')
    line = _one_line_error(capsys, [command, str(tmp_path / "notes"), str(tmp_path / "out")])
    assert "not a training workdir nor a converted SAM directory" in line
    assert not (tmp_path / "out").exists()


def test_a_file_as_source_and_a_run_without_checkpoint_fail_with_one_line(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    assert "is a file" in _one_line_error(
        capsys, ["export-sam", str(tmp_path / "f.txt"), str(tmp_path / "o.pth")]
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"sam": {}, "train": {}, "lora": {}}))
    line = _one_line_error(capsys, ["export-sam", str(run), str(tmp_path / "o.pth")])
    assert "no checkpoint" in line and not (tmp_path / "o.pth").exists()


def test_an_unwritable_or_existing_output_fails_with_one_line(tmp_path, capsys):
    cfg = SamConfig.tiny()
    save_sam(build_sam(cfg, seed=0), cfg, tmp_path / "sam", {"file": "random"})
    (tmp_path / "blocker").write_text("a file where a folder should be")
    line = _one_line_error(
        capsys, ["export-sam", str(tmp_path / "sam"), str(tmp_path / "blocker" / "x.pth")]
    )
    assert "blocker" in line
    (tmp_path / "old.pth").write_bytes(b"keep")
    line = _one_line_error(capsys, ["export-sam", str(tmp_path / "sam"), str(tmp_path / "old.pth")])
    assert "already exists" in line and (tmp_path / "old.pth").read_bytes() == b"keep"
    line = _one_line_error(
        capsys, ["export-onnx", str(tmp_path / "sam"), str(tmp_path / "blocker" / "onnx")]
    )
    assert "blocker" in line


def test_export_onnx_without_torch_names_the_extra(tmp_path, capsys, monkeypatch):
    cfg = SamConfig.tiny()
    save_sam(build_sam(cfg, seed=0), cfg, tmp_path / "sam", {"file": "random"})
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    line = _one_line_error(capsys, ["export-onnx", str(tmp_path / "sam"), str(tmp_path / "o")])
    assert f"pip install 'amsam-jax[{export_onnx_module.EXTRA}]'" in line
    assert not (tmp_path / "o").exists()


# --- the official code loads the export (torch) ---


def _predictions(ours_model, official_model, image, prompts: dict) -> None:
    """Asserts the official SamPredictor on `official_model` matches ours for every prompt."""
    ours, ref = SamPredictor(ours_model), OfficialPredictor(official_model)
    ours.set_image(image)
    ref.set_image(image)
    assert close(ours.get_image_embedding(), ref.get_image_embedding().permute(0, 2, 3, 1))
    for name, kw in prompts.items():
        for multimask in (True, False):
            o = ours.predict(**kw, multimask_output=multimask, return_logits=True)
            r = ref.predict(**kw, multimask_output=multimask, return_logits=True)
            assert close(o[2], r[2]), f"{name}: low-res logits"
            assert close(o[0], r[0]), f"{name}: logits"
            assert close(o[1], r[1]), f"{name}: IoU"


def _prompts(h: int, w: int) -> dict:
    return {
        "box": {"box": np.array([0.15 * w, 0.2 * h, 0.8 * w, 0.85 * h]).round()},
        "points": {
            "point_coords": np.array([[0.4 * w, 0.55 * h], [0.75 * w, 0.3 * h]]).round(),
            "point_labels": np.array([1, 0]),
        },
    }


@pytest.mark.slow
def test_exported_vit_loads_strictly_and_predicts_as_ours(small_vit, tmp_path, capsys):
    ref, sam_dir = small_vit
    out = tmp_path / "sam.pth"
    assert main(["export-sam", str(sam_dir), str(out)]) == 0
    assert "loads into segment_anything's Sam" in capsys.readouterr().out
    official = build_official(SMALL_VIT)
    official.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(official.state_dict()[key], value), key
    image = synthetic_image(150, 230)
    _predictions(load_sam(sam_dir), official, image, _prompts(150, 230))


@pytest.mark.slow
def test_a_full_size_vit_b_export_loads_with_the_official_registry(tmp_path):
    cfg = SamConfig.vit_b()
    sd, _, report = official_state_dict(build_sam(cfg, seed=0), cfg)
    write_state_dict(sd, tmp_path / "vit_b.pth")
    official = sam_model_registry["vit_b"](checkpoint=str(tmp_path / "vit_b.pth"))  # strict
    loaded = official.state_dict()
    assert set(loaded) == set(sd) and report["tensors"] == len(sd)
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in sd.items())


@pytest.mark.slow
def test_fewshot_run_export_merges_lora_and_predicts_as_the_run(tmp_path_factory, tmp_path):
    workdir = smoke_workdir(tmp_path_factory)
    result = export_sam(workdir, tmp_path / "run.pth", "best")
    assert result["lora_merged"] == 14 and result["side_arrays"] == ["prompt"]
    setup, state, _ = load_run_state(workdir, "best")  # the trainer's own restore
    model = TrainingModel(PromptDecoder(setup.sam), None)
    nnx.update(model, state["lower"], state["prompt"])
    lora_b = [
        np.asarray(n.lora_b[...]) for _, n in nnx.iter_graph(setup.sam) if isinstance(n, LoRALinear)
    ]
    assert max(np.abs(b).max() for b in lora_b) > 0  # training moved B: the merge matters
    official = build_official(setup.sam_cfg)
    official.load_state_dict(torch.load(tmp_path / "run.pth", weights_only=True), strict=True)
    side = np.load(str(tmp_path / "run.pth") + EXTRA_SUFFIX)
    learned = np.asarray(setup.sam.prompt_encoder.no_mask_embed.weight[...])
    assert np.array_equal(side["prompt"], learned)
    _predictions(setup.sam, official, synthetic_image(150, 230), _prompts(150, 230))


@pytest.mark.slow
def test_tiny_vit_export_loads_strictly_into_litemedsam_and_mobile_sam_code(tmp_path):
    code = litemedsam_code()
    small = randomize_(build_litemedsam_like(code, SMALL_TINY_VIT), seed=4)
    ours = to_jax(state_dict_numpy(small), SMALL_TINY_VIT)
    sd, _, _ = official_state_dict(ours, SMALL_TINY_VIT)
    write_state_dict(sd, tmp_path / "lite.pth")
    fresh = build_litemedsam_like(code, SMALL_TINY_VIT)
    fresh.load_state_dict(torch.load(tmp_path / "lite.pth", weights_only=True), strict=True)
    for key, value in small.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], value), key
    mobile = build_mobile_sam_reference(seed=6)
    cfg = SamConfig.mobile_sam()
    sd, _, report = official_state_dict(to_jax(state_dict_numpy(mobile), cfg), cfg)
    assert report["filled"]  # the classifier head the conversion drops
    write_state_dict(sd, tmp_path / "mobile.pth")
    fresh = build_mobile_sam_reference(seed=7)
    fresh.load_state_dict(torch.load(tmp_path / "mobile.pth", weights_only=True), strict=True)
    for key, value in mobile.state_dict().items():
        if not key.startswith(("image_encoder.head", "image_encoder.norm_head")):
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(fresh.state_dict()[key], value), key


# --- ONNX Runtime parity (torch) ---


def _decoder_inputs(coords: np.ndarray, labels: np.ndarray, embedding, image_hw, g: int) -> dict:
    """The decoder's feed, as segment-anything's ONNX example notebook builds it."""
    return {
        "image_embeddings": nchw(embedding),
        "point_coords": coords[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": np.zeros((1, 1, 4 * g, 4 * g), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(image_hw, np.float32),
    }


def _decoder_parity(decoder, ours: SamPredictor, image_hw, g: int) -> None:
    """Points (+ the padding point, label -1) and a box through the ONNX decoder vs ours."""
    h, w = image_hw
    prompts = _prompts(h, w)
    pts = prompts["points"]
    # In the model input frame as the predictor maps them (a "medsam" model truncates the box).
    cases = {
        "points": (
            ours.transform_coords(np.concatenate([pts["point_coords"], [[0.0, 0.0]]])),
            np.concatenate([pts["point_labels"], [-1]]),
            pts,
        ),
        "box": (ours._box(prompts["box"]["box"]).reshape(2, 2), np.array([2, 3]), prompts["box"]),
    }
    for name, (coords, labels, kw) in cases.items():
        feed = _decoder_inputs(coords, labels, ours.get_image_embedding(), image_hw, g)
        masks, iou, low_res = decoder.run(None, feed)
        single = ours.predict(**kw, multimask_output=False, return_logits=True)
        multi = ours.predict(**kw, multimask_output=True, return_logits=True)
        assert close(low_res[0, :1], single[2]) and close(low_res[0, 1:], multi[2]), name
        assert close(masks[0, :1], single[0]) and close(masks[0, 1:], multi[0]), name
        assert close(iou[0, 1:], multi[1]), name


@pytest.mark.slow
def test_onnx_encoder_and_decoder_match_ours_in_onnx_runtime(small_vit, tmp_path, capsys):
    _, sam_dir = small_vit
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(sam_dir), str(out)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["files"]) == {"sam.pth", "image_encoder.onnx", "decoder.onnx"}
    ours = load_sam(sam_dir)
    x = np.random.default_rng(1).standard_normal((1, 256, 256, 3)).astype(np.float32)
    (embedding,) = session(out / "image_encoder.onnx").run(None, {"image": nchw(x)})
    assert close(embedding, nchw(ours.image_encoder(jnp.asarray(x))))
    decoder = session(out / "decoder.onnx")
    assert [i.name for i in decoder.get_inputs()] == list(export_onnx_module.DECODER_INPUTS)
    assert [o.name for o in decoder.get_outputs()] == list(export_onnx_module.DECODER_OUTPUTS)
    predictor = SamPredictor(ours)
    predictor.set_image(synthetic_image(150, 230))
    _decoder_parity(decoder, predictor, (150, 230), SMALL_VIT.grid_size)


@pytest.mark.slow
def test_fewshot_onnx_no_prompt_model_is_the_runs_calibrated_forward(tmp_path_factory, tmp_path):
    workdir = smoke_workdir(tmp_path_factory)
    manifest = export_onnx(workdir, tmp_path / "onnx")
    assert manifest["files"]["no_prompt.onnx"]["inputs"] == {"image_embeddings": [1, 32, 16, 16]}
    setup, state, _ = load_run_state(workdir, "best")
    model = nnx.merge(setup.graphdef, state["lower"], state["prompt"], setup.frozen)
    embedding = setup.d2.embedding[:1]  # (1, G, G, C), a real image of the run
    ref = np.asarray(forward(model.decoder, jnp.asarray(embedding), None, setup.step_cfg))
    (masks,) = session(tmp_path / "onnx" / "no_prompt.onnx").run(
        None, {"image_embeddings": nchw(embedding)}
    )
    assert close(masks, ref)
    nnx.update(TrainingModel(PromptDecoder(setup.sam), None), state["lower"], state["prompt"])
    predictor = SamPredictor(setup.sam)
    predictor.set_image(synthetic_image(150, 230))
    _decoder_parity(
        session(tmp_path / "onnx" / "decoder.onnx"), predictor, (150, 230), setup.sam_cfg.grid_size
    )


@pytest.mark.slow
def test_a_three_class_run_exports_one_output_per_class(tmp_path):
    """data.num_classes=3 (the bundled 3-class sample): no_prompt.onnx gives the run's 4
    calibrated channels (background + 3 classes) as the JAX forward does."""
    cfg = am_sam("smoke")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=3))
    train(cfg, tmp_path / "run")
    export_onnx(tmp_path / "run", tmp_path / "onnx")
    setup, state, _ = load_run_state(tmp_path / "run", "best")
    model = nnx.merge(setup.graphdef, state["lower"], state["prompt"], setup.frozen)
    embedding = setup.d2.embedding[:1]
    ref = np.asarray(forward(model.decoder, jnp.asarray(embedding), None, setup.step_cfg))
    assert ref.shape[1] == 4
    (masks,) = session(tmp_path / "onnx" / "no_prompt.onnx").run(
        None, {"image_embeddings": nchw(embedding)}
    )
    assert masks.shape == ref.shape and close(masks, ref)


@pytest.mark.slow
def test_no_prompt_model_with_a_box_and_its_residual_matches_the_forward(small_vit, tmp_path):
    ref_torch, sam_dir = small_vit
    ours = load_sam(sam_dir)
    rng = np.random.default_rng(3)
    residual = BoxResidual(SMALL_VIT.prompt_embed_dim)
    residual.delta[...] = jnp.asarray(rng.standard_normal((2, 256)) * 0.3, jnp.float32)
    cfg = StepConfig(semantic_head="tokens", calibration=True, calibration_alpha=0.6)
    spec = NoPromptSpec(
        prompt=np.asarray(ours.prompt_encoder.no_mask_embed.weight[...]),
        box_residual=np.asarray(residual.delta[...]),
        boxes=True,
        semantic_head="tokens",
        calibration=True,
        alpha=0.6,
        average="batch",
        channels=SMALL_VIT.prompt_embed_dim // 8,
    )
    ns = require_torch()
    official = official_sam(ns, SMALL_VIT, ref_torch.state_dict())
    assert export_no_prompt(ns, official, spec, tmp_path / "np.onnx") == ["image_embeddings", "box"]
    embedding = rng.standard_normal((1, 16, 16, 256)).astype(np.float32)
    box = np.array([[30.0, 40.0, 200.0, 180.0]], np.float32)
    ref = forward(PromptDecoder(ours), jnp.asarray(embedding), jnp.asarray(box), cfg, residual)
    (masks,) = session(tmp_path / "np.onnx").run(
        None, {"image_embeddings": nchw(embedding), "box": box}
    )
    assert masks.shape == (1, 4, 64, 64) and close(masks, np.asarray(ref))


@pytest.mark.slow
def test_tiny_vit_onnx_export_writes_the_decoder_without_an_encoder(tmp_path, capsys):
    code = litemedsam_code()
    small = randomize_(build_litemedsam_like(code, SMALL_TINY_VIT), seed=8)
    ours = to_jax(state_dict_numpy(small), SMALL_TINY_VIT)
    save_sam(ours, SMALL_TINY_VIT, tmp_path / "sam", {"file": "random"})
    assert main(["export-onnx", str(tmp_path / "sam"), str(tmp_path / "onnx")]) == 0
    assert "image encoder: not exported" in capsys.readouterr().out
    assert not (tmp_path / "onnx" / "image_encoder.onnx").exists()
    predictor = SamPredictor(load_sam(tmp_path / "sam"))
    predictor.set_image(synthetic_image(150, 230))
    decoder = session(tmp_path / "onnx" / "decoder.onnx")
    _decoder_parity(decoder, predictor, (150, 230), SMALL_TINY_VIT.grid_size)
