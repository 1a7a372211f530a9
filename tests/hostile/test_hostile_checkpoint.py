"""Damaged converted-SAM directories: `load_sam` and the predict CLI fail with one line.

Each case copies one small saved SAM, damages `config.json` or `params/`, and loads it twice:
with `amsam_jax.checkpoint.load_sam` (a one-line `CheckpointError` naming the directory or
file) and through `python -m amsam_jax.predict --sam DIR` (exit 2, one `error:` line, no output
written). A config that disagrees with the stored shapes is refused before any value is used.
"""

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hostile import fails_cleanly
from PIL import Image

from amsam_jax import predict
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    PARAMS_DIR,
    CheckpointError,
    load_sam,
    save_params,
    save_sam,
)

CFG = SamConfig.tiny()  # 2 encoder blocks (block 1 global), 64 wide; decoder 32 wide


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    """A saved tiny SAM and its parameters by dotted path."""
    model = build_sam(CFG, seed=3)
    path = tmp_path_factory.mktemp("sam") / "tiny"
    save_sam(model, CFG, path, {"file": "random"})
    flat = {
        ".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))
    }
    return path, flat


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "photo.png"
    Image.fromarray(np.full((64, 80, 3), 127, np.uint8)).save(path)
    return path


def _config(sam: Path) -> dict:
    return json.loads((sam / CONFIG_FILE).read_text())


def _set_model(**fields):
    def damage(sam: Path) -> None:
        meta = _config(sam)
        meta["model"].update(fields)
        (sam / CONFIG_FILE).write_text(json.dumps(meta))

    return damage


def _edit(change):
    def damage(sam: Path) -> None:
        meta = _config(sam)
        change(meta)
        (sam / CONFIG_FILE).write_text(json.dumps(meta))

    return damage


def _write_config(text: str | bytes):
    def damage(sam: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (sam / CONFIG_FILE).write_bytes(data)

    return damage


def _largest_data_file(sam: Path) -> Path:
    files = [p for p in (sam / PARAMS_DIR).rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(sam: Path) -> None:
    data = _largest_data_file(sam)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _empty_data(sam: Path) -> None:
    for data in (sam / PARAMS_DIR).rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.write_bytes(b"")


def _corrupt(sam: Path) -> None:
    data = _largest_data_file(sam)
    raw = bytearray(data.read_bytes())
    raw[:64] = b"\xff" * 64
    data.write_bytes(bytes(raw))


def _truncate_manifest(sam: Path) -> None:
    manifest = sam / PARAMS_DIR / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:20])


def _empty_params(sam: Path) -> None:
    shutil.rmtree(sam / PARAMS_DIR)
    (sam / PARAMS_DIR).mkdir()


def _params_is_a_file(sam: Path) -> None:
    shutil.rmtree(sam / PARAMS_DIR)
    (sam / PARAMS_DIR).write_text("not a folder")


def _without(key: str):
    return _edit(lambda meta: meta.pop(key))


def _without_field(field: str):
    return _edit(lambda meta: meta["model"].pop(field))


# name -> (damage, strings the error must name; "{sam}" is the directory)
CASES = {
    "no_config": (lambda sam: (sam / CONFIG_FILE).unlink(), ["{sam}", "no config.json"]),
    "no_params": (lambda sam: shutil.rmtree(sam / PARAMS_DIR), ["{sam}", "no params/"]),
    "params_is_a_file": (_params_is_a_file, ["{sam}", "no params/"]),
    "config_not_json": (_write_config("{not json"), ["{sam}/config.json", "invalid JSON"]),
    "config_not_text": (_write_config(b"\xff\xfe\x00\x81" * 8), ["{sam}/config.json", "JSON"]),
    "config_empty": (_write_config(""), ["{sam}/config.json", "invalid JSON"]),
    "config_a_list": (_write_config("[1, 2]"), ["{sam}/config.json", "not a JSON object"]),
    "config_a_string": (_write_config('"sam"'), ["{sam}/config.json", "not a JSON object"]),
    "no_format": (_without("format"), ["{sam}/config.json", "format None"]),
    "other_format": (_edit(lambda m: m.update(format="orbax")), ["config.json", "'orbax'"]),
    "no_model": (_without("model"), ["{sam}/config.json", "no 'model'"]),
    "model_a_list": (_edit(lambda m: m.update(model=[768])), ["config.json", "'model' is a list"]),
    "source_a_string": (_edit(lambda m: m.update(source="x")), ["config.json", "'source'"]),
    "missing_field": (_without_field("preprocess"), ["config.json", "lacks preprocess"]),
    "unknown_field": (_set_model(embed_width=768), ["config.json", "unknown key(s) embed_width"]),
    "string_for_int": (_set_model(image_size="256"), ["model.image_size", "expected int"]),
    "bool_for_int": (_set_model(decoder_depth=True), ["model.decoder_depth", "expected int"]),
    "float_for_int": (_set_model(patch_size=16.0), ["model.patch_size", "expected int"]),
    "string_for_bool": (_set_model(freeze_task0="yes"), ["model.freeze_task0", "expected bool"]),
    "nan_for_float": (_set_model(mlp_ratio=math.nan), ["model.mlp_ratio", "expected float"]),
    "null_for_list": (_set_model(pixel_mean=None), ["model.pixel_mean", "a list of 3"]),
    "short_list": (_set_model(pixel_std=[1.0, 2.0]), ["model.pixel_std", "got a list of 2"]),
    "string_in_list": (
        _set_model(encoder_global_attn_indexes=["1"]),
        ["model.encoder_global_attn_indexes[0]", "expected int"],
    ),
    "zero_image_size": (_set_model(image_size=0), ["model.image_size", "must be positive"]),
    "negative_depth": (_set_model(encoder_depth=-2), ["model.encoder_depth", "must be positive"]),
    "zero_std": (_set_model(pixel_std=[1.0, 0.0, 1.0]), ["model.pixel_std[1]", "positive"]),
    "unknown_model_type": (_set_model(model_type="vit_x"), ["model.model_type", "'vit_x'"]),
    "unknown_dtype": (_set_model(encoder_dtype="int8"), ["model.encoder_dtype", "'int8'"]),
    "size_not_a_multiple": (_set_model(image_size=250), ["not a multiple of patch_size 16"]),
    "heads_do_not_divide": (_set_model(encoder_num_heads=3), ["not a multiple of encoder_num"]),
    "global_block_out_of_range": (
        _set_model(encoder_global_attn_indexes=[5]),
        ["encoder_global_attn_indexes [5]"],
    ),
    "wider_encoder_than_stored": (
        _set_model(encoder_embed_dim=768, encoder_num_heads=12),
        ["{sam}", "does not match params/", "image_encoder.blocks.0.attn.proj.bias", "[768]"],
    ),
    "wider_decoder_than_stored": (
        _set_model(prompt_embed_dim=64),
        ["{sam}", "does not match params/", "the config needs float32[64"],
    ),
    "other_image_size_than_stored": (
        _set_model(image_size=512),
        ["{sam}", "does not match params/", "image_encoder.pos_embed"],
    ),
    "more_mask_tokens_than_stored": (
        _set_model(num_multimask_outputs=5),
        ["{sam}", "mask_decoder.mask_tokens.weight is float32[4, 32]"],
    ),
    "deeper_encoder_than_stored": (
        _set_model(encoder_depth=3),
        ["{sam}", "image_encoder.blocks.2.", "is missing"],
    ),
    "shallower_encoder_than_stored": (
        _set_model(encoder_depth=1, encoder_global_attn_indexes=[0]),
        ["{sam}", "image_encoder.blocks.1.", "not in the model"],
    ),
    "tiny_vit_config_for_vit_params": (
        _set_model(encoder="tiny_vit"),
        ["{sam}", "does not match params/"],
    ),
    "truncated_params": (_truncate, ["{sam}/params", "cannot be read, truncated or corrupt"]),
    "emptied_params": (_empty_data, ["{sam}/params", "truncated or corrupt"]),
    "corrupt_params": (_corrupt, ["{sam}/params", "truncated or corrupt"]),
    "truncated_manifest": (_truncate_manifest, ["{sam}/params", "cannot be listed"]),
    "empty_params": (_empty_params, ["{sam}/params", "holds no arrays"]),
    "directory_is_a_file": (
        lambda sam: (shutil.rmtree(sam), sam.write_text("x")),
        ["{sam}", "is a file"],
    ),
    "directory_missing": (lambda sam: shutil.rmtree(sam), ["{sam}", "no such directory"]),
}


def _damaged(saved, tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    source, _ = saved
    sam = tmp_path / "sam"
    shutil.copytree(source, sam)
    damage, names = CASES[case]
    damage(sam)
    return sam, [n.format(sam=sam) for n in names]


@pytest.mark.parametrize("case", list(CASES))
def test_load_sam_refuses_a_damaged_directory_in_one_line(case, saved, tmp_path):
    sam, names = _damaged(saved, tmp_path, case)
    with pytest.raises(CheckpointError) as excinfo:
        load_sam(sam)
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 600, message
    for name in names:
        assert name in message, (name, message)


@pytest.mark.parametrize("case", list(CASES))
def test_predict_cli_refuses_a_damaged_directory(case, saved, image, tmp_path, capsys):
    sam, names = _damaged(saved, tmp_path, case)
    out = tmp_path / "pred" / "masks.npz"
    argv = ["--sam", str(sam), "--image", str(image), "--box", "5", "5", "40", "40"]
    fails_cleanly(
        predict.main, [*argv, "--output", str(out)], capsys, names=names, watch=[tmp_path]
    )


def test_the_undamaged_directory_loads_every_value(saved):
    path, flat = saved
    model = load_sam(path)
    loaded = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}
    assert loaded.keys() == flat.keys()
    for name, value in flat.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)


def test_a_directory_converted_before_the_task_table_loads_with_zeros(saved, tmp_path):
    """The one tolerated absence: every task-table row (docs/sum.md §4), not part of it."""
    path, flat = saved
    nested = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_sam(path))))
    rows = nested["prompt_encoder"].pop("task_prompt_embedding")
    meta = {"format": FORMAT, "model": _config(path)["model"], "source": {}}
    old = tmp_path / "old"
    save_params(old / PARAMS_DIR, nested)
    (old / CONFIG_FILE).write_text(json.dumps(meta))
    table = load_sam(old).prompt_encoder.task_embeddings()
    assert np.array_equal(np.asarray(table), np.zeros(np.asarray(table).shape))
    half = tmp_path / "half"
    nested["prompt_encoder"]["task_prompt_embedding"] = {0: rows[0]}
    save_params(half / PARAMS_DIR, nested)
    (half / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="task_prompt_embedding.1.weight is missing"):
        load_sam(half)


def test_non_finite_parameters_are_named(saved, tmp_path):
    path, _ = saved
    model = load_sam(path)
    model.mask_decoder.iou_token.weight[...] = np.full((1, 32), np.nan, np.float32)
    save_sam(model, CFG, tmp_path / "nan", {"file": "random"})
    with pytest.raises(CheckpointError, match=r"non-finite values in mask_decoder\.iou_token"):
        load_sam(tmp_path / "nan")


def test_an_encoder_dtype_override_is_checked(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="encoder_dtype: 'int8'"):
        load_sam(path, encoder_dtype="int8")
