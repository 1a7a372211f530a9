"""SUM task prompt (docs/sum.md §4, §9 item 12): zero init, per-mask ids, frozen id 0, loading."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import FORMAT, load_sam, save_params
from amsam_jax.conversion.convert_sam import ConversionError, convert_state_dict
from amsam_jax.modeling.prompt_encoder import TaskParam, task_id
from amsam_jax.predictor import SamPredictor
from tests.sam_reference import official_pair, state_dict_numpy

CFG = SamConfig.tiny()


@pytest.fixture(scope="module")
def model():
    return build_sam(CFG, seed=3)


def _prompts(rng, b=3):
    coords = jnp.asarray(rng.uniform(0, CFG.image_size, (b, 2, 2)), jnp.float32)
    labels = jnp.asarray([[1, 0]] * b, jnp.int32)
    masks = jnp.asarray(rng.standard_normal((b, 64, 64, 1)), jnp.float32)
    return (coords, labels), masks


@nnx.jit(static_argnums=(3,))
def _decode(model, points, masks, task):
    sparse, dense = model.prompt_encoder(points, None, masks, task)
    emb = jnp.ones((points[0].shape[0], CFG.grid_size, CFG.grid_size, CFG.prompt_embed_dim))
    low, iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    return dense, low, iou


def test_zero_table_gives_identical_outputs_for_every_task_and_equals_plain_sam(model):
    points, masks = _prompts(np.random.default_rng(0))
    dense0, low0, iou0 = _decode(model, points, masks, None)
    assert dense0.shape == (3, CFG.grid_size, CFG.grid_size, CFG.prompt_embed_dim)
    for t in range(4):
        dense, low, iou = _decode(model, points, masks, t)
        np.testing.assert_array_equal(np.asarray(low), np.asarray(low0))
        np.testing.assert_array_equal(np.asarray(iou), np.asarray(iou0))
        np.testing.assert_array_equal(np.asarray(dense), np.asarray(dense0))


def test_per_mask_ids_add_their_own_row_and_row_zero_reads_zero():
    m = build_sam(CFG, seed=3)
    rng = np.random.default_rng(1)
    table = rng.standard_normal((4, CFG.prompt_embed_dim)).astype(np.float32)
    for i, e in enumerate(m.prompt_encoder.task_prompt_embedding):
        e.weight[...] = jnp.asarray(table[i : i + 1])
    points, masks = _prompts(rng)
    base = m.prompt_encoder(points, None, masks, None)[1]
    ids = jnp.asarray([2, 0, 3], jnp.int32)
    dense = m.prompt_encoder(points, None, masks, ids)[1]
    expect = (
        np.asarray(base) + np.stack([table[2], np.zeros_like(table[0]), table[3]])[:, None, None, :]
    )
    np.testing.assert_allclose(np.asarray(dense), expect, rtol=0, atol=1e-6)
    # Without a mask prompt: no_mask_embed + row.
    d1 = m.prompt_encoder(points, None, None, 1)[1]
    no_mask = np.asarray(m.prompt_encoder.no_mask_embed.weight[...])[0]
    np.testing.assert_allclose(
        np.asarray(d1)[:, 5, 7], np.broadcast_to(no_mask + table[1], (3, 32))
    )


@pytest.mark.parametrize("freeze", [True, False])
def test_gradient_of_row_zero_is_masked_when_frozen(freeze):
    m = build_sam(dataclasses.replace(CFG, freeze_task0=freeze), seed=3)
    points, masks = _prompts(np.random.default_rng(2))
    graphdef, task, rest = nnx.split(m, TaskParam, ...)

    def loss(task, ids):
        mm = nnx.merge(graphdef, task, rest)
        return jnp.sum(jnp.sin(mm.prompt_encoder(points, None, masks, ids)[1]))

    grads = jax.grad(loss)(task, jnp.asarray([0, 1, 0], jnp.int32))
    g = np.stack(
        [
            np.asarray(e["weight"][...])[0]
            for e in grads["prompt_encoder"]["task_prompt_embedding"].values()
        ]
    )
    assert np.abs(g[1]).max() > 0 and np.abs(g[2:]).max() == 0  # only used rows get gradient
    if freeze:
        assert np.abs(g[0]).max() == 0
    else:
        assert np.abs(g[0]).max() > 0


def test_conversion_of_plain_sam_zero_fills_and_sum_checkpoint_maps_rows():
    cfg = CFG
    ref, _ = official_pair(cfg, seed=0)
    sd = state_dict_numpy(ref)
    nested, report = convert_state_dict(sd, cfg)
    assert report["task_prompt"] == "zeros"
    rows = nested["prompt_encoder"]["task_prompt_embedding"]
    assert all(np.array_equal(rows[i]["weight"], np.zeros((1, 32))) for i in range(4))
    # A SUM checkpoint (Kangningthu/SUM key names) keeps its rows.
    sum_sd = dict(sd)
    values = np.random.default_rng(0).standard_normal((4, 1, 32)).astype(np.float32)
    for i in range(4):
        sum_sd[f"prompt_encoder.task_prompt_embedding.{i}.weight"] = values[i]
    nested, report = convert_state_dict(sum_sd, cfg)
    assert report["task_prompt"] == "checkpoint"
    for i in range(4):
        np.testing.assert_array_equal(
            nested["prompt_encoder"]["task_prompt_embedding"][i]["weight"], values[i]
        )
    # Half a task table is a broken checkpoint, not a plain SAM.
    del sum_sd["prompt_encoder.task_prompt_embedding.3.weight"]
    with pytest.raises(ConversionError, match="task_prompt_embedding.3.weight"):
        convert_state_dict(sum_sd, cfg)


def test_directory_converted_before_the_task_table_loads_with_zeros(model, tmp_path):
    nested = jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())
    del nested["prompt_encoder"]["task_prompt_embedding"]
    save_params(tmp_path / "old" / "params", nested)
    meta = {"format": FORMAT, "model": dataclasses.asdict(CFG), "source": {}}
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = load_sam(tmp_path / "old")
    assert np.array_equal(np.asarray(loaded.prompt_encoder.task_embeddings()), np.zeros((4, 32)))
    np.testing.assert_array_equal(
        np.asarray(loaded.mask_decoder.iou_token.weight[...]),
        np.asarray(model.mask_decoder.iou_token.weight[...]),
    )


def test_predictor_accepts_task_names_and_ids(model):
    image = (np.random.default_rng(0).uniform(0, 255, (48, 80, 3))).astype(np.uint8)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    args = dict(point_coords=np.asarray([[30.0, 20.0]]), point_labels=np.asarray([1]))
    plain = predictor.predict(**args, return_logits=True)[0]
    for task in ("unspecified", "salient", 2, "part"):
        np.testing.assert_array_equal(
            predictor.predict(**args, return_logits=True, task=task)[0], plain
        )
    assert task_id("entity") == 2 and task_id(None) is None
    with pytest.raises(ValueError, match="unknown task 'sky'"):
        predictor.predict(**args, task="sky")
    with pytest.raises(ValueError, match="out of range"):
        task_id(4)
