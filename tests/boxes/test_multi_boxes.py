"""Several boxes per image (docs/fewshot.md §6.4): box lists in the box file, padding and the
validity mask, the merge of per-box predictions, the unchanged one-box path, and a few-shot run
with `boxes.max_per_image=2` through the trainer and the evaluation of its workdir."""

import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from amsam_jax.boxes.box_file import box_file_from_masks, entry_boxes, write_box_file
from amsam_jax.boxes.detector import BoxError
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.evaluation.workdir import evaluate_workdir
from amsam_jax.fewshot import trainer
from amsam_jax.fewshot.blo import (
    StepConfig,
    TrainingModel,
    forward,
    make_loss_fn,
    split_trainable,
)
from amsam_jax.fewshot.calibration import calibrate_masks
from amsam_jax.fewshot.lora import apply_lora, mark_trainable
from amsam_jax.fewshot.preprocessing import Split, assign_boxes
from amsam_jax.fewshot.recipes import am_sam
from amsam_jax.training.prompt_decoder import PromptDecoder
from amsam_jax.utils.errors import AmsamError

SIZE = 64  # model frame of the box-mapping tests
OFF = StepConfig(calibration=False)


def _split(stems, sizes) -> Split:
    n = len(stems)
    return Split(tuple(stems), np.zeros((n, 1, 1, 3)), np.zeros((n, 1, 1)), np.array(sizes), (),
                 embedding=np.zeros((n, 1, 1, 1)))  # fmt: skip


BOX_FILE = {
    "detector": {"policy": "all"},
    "boxes": {
        # --policy all: `box` is the top box, `boxes_all` every box (sorted by score here).
        "det": {"box": [0, 0, 64, 32], "score": 0.9, "class": 0, "fallback": False,
                "boxes_all": [{"box": [64, 0, 128, 16], "score": 0.5, "class": 0},
                              {"box": [0, 0, 64, 32], "score": 0.9, "class": 0},
                              {"box": [32, 8, 96, 24], "score": 0.7, "class": 1}]},
        "hand": {"boxes": [[10, 4, 20, 8], [0, 0, 128, 32]]},  # written by hand, no `box`
        "top1": {"box": [12, 6, 36, 30], "score": 0.8, "class": 0, "fallback": False},
        "miss": {"box": None, "score": 0.0, "class": -1, "fallback": True, "boxes_all": []},
    },
}  # fmt: skip


def _frame(box):
    """(H, W) = (32, 128) original pixels to the 64 x 64 model frame."""
    x0, y0, x1, y1 = box
    return [x0 * SIZE / 128, y0 * SIZE / 32, x1 * SIZE / 128, y1 * SIZE / 32]


def test_box_lists_of_both_forms_are_sorted_cut_to_m_padded_and_masked():
    split = _split(["det", "hand", "top1", "miss"], [(32, 128)] * 4)
    cut = assign_boxes(split, BOX_FILE, "b.json", SIZE, max_per_image=2)
    assert cut == ["det"]
    np.testing.assert_allclose(split.boxes[0], [_frame([0, 0, 64, 32]), _frame([32, 8, 96, 24])])
    np.testing.assert_allclose(split.boxes[1], [_frame([10, 4, 20, 8]), _frame([0, 0, 128, 32])])
    np.testing.assert_allclose(split.boxes[2], [_frame([12, 6, 36, 30])] * 2)  # padded: box 0
    np.testing.assert_allclose(split.boxes[3], [[0, 0, SIZE, SIZE]] * 2)  # no box: full frame
    assert split.box_valid.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    b = split.batch(np.array([2, 3]))
    assert b["box"].shape == (2, 2, 4) and b["box_valid"].tolist() == [[True, False]] * 2
    assert split.eval_data().box_valid is split.box_valid
    # M = 4: nothing cut, three slots of "det" valid, sorted by score (0.9, 0.7, 0.5).
    assert assign_boxes(split, BOX_FILE, "b.json", SIZE, max_per_image=4) == []
    assert split.box_valid[0].tolist() == [True, True, True, False]
    np.testing.assert_allclose(split.boxes[0, 2], _frame([64, 0, 128, 16]))


def test_one_box_per_image_reads_the_entry_box_and_ignores_the_lists():
    split = _split(["det", "top1", "miss"], [(32, 128)] * 3)
    assert assign_boxes(split, BOX_FILE, "b.json", SIZE) == []
    assert split.box_valid is None and split.boxes.shape == (3, 4)
    expected = [_frame([0, 0, 64, 32]), _frame([12, 6, 36, 30]), [0, 0, SIZE, SIZE]]
    np.testing.assert_array_equal(split.boxes, np.asarray(expected, np.float32))
    assert "box_valid" not in split.batch(np.array([0])) and split.eval_data().box_valid is None


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"box": [0, 0, 1, 1], "boxes": [], "boxes_all": []}, "both 'boxes_all' and 'boxes'"),
        ({"boxes": {"a": 1}}, "'boxes' is not a list of boxes"),
        ({"boxes": [[0, 0, 1]]}, "boxes[0] is not [x0, y0, x1, y1]"),
        ({"boxes": [[0, 0, 1, 1], [0, 0, "1", 1]]}, "boxes[1] is not [x0, y0, x1, y1]"),
        ({"boxes": [[0, 0, float("nan"), 1]]}, "four finite numbers"),
        ({"boxes": [[5, 0, 1, 1]]}, "x1 < x0 or y1 < y0"),
        ({"boxes_all": [{"score": 0.3}]}, "boxes_all[0] has no 'box'"),
        ({"boxes_all": [{"box": [0, 0, 1, 1], "score": "high"}]}, "score that is not a number"),
        ([[0, 0, 1, 1]], "the entry is not an object"),
    ],
)
def test_bad_box_entries_are_one_line_errors_naming_the_file_and_image(entry, needle):
    data = {"detector": {}, "boxes": {"img7": entry}}
    with pytest.raises(BoxError) as info:
        assign_boxes(_split(["img7"], [(32, 128)]), data, "my_boxes.json", SIZE, 2)
    message = str(info.value)
    assert isinstance(info.value, AmsamError) and "\n" not in message
    assert message.startswith("my_boxes.json: image 'img7'") and needle in message


def test_a_list_without_box_at_one_box_per_image_says_how_to_use_it():
    data = {"detector": {}, "boxes": {"img7": {"boxes": [[0, 0, 1, 1]]}}}
    with pytest.raises(BoxError, match=r"b.json: image 'img7': no 'box' .*max_per_image > 1"):
        assign_boxes(_split(["img7"], [(32, 128)]), data, "b.json", SIZE)


def test_oracle_boxes_per_connected_component(tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "train/images/a.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:6] = 255  # small blob
    mask[10:18, 12:28] = 255  # large blob
    Image.fromarray(mask).save(tmp_path / "train/masks/a.png")
    one = box_file_from_masks(tmp_path)["boxes"]["a"]
    each = box_file_from_masks(tmp_path, components=True)["boxes"]["a"]
    assert one["box"] == each["box"] == [3.0, 2.0, 28.0, 18.0]
    assert [b["box"] for b in one["boxes_all"]] == [[3.0, 2.0, 28.0, 18.0]]
    assert entry_boxes(each, "f", "a") == [[12.0, 10.0, 28.0, 18.0], [3.0, 2.0, 6.0, 5.0]]


# ---------------------------------------------------------------------------------------------
# The merge (one decoder pass per box, compared with M boxes in one pass)


@pytest.fixture(scope="module")
def models():
    """Tiny LoRA prompt decoders split as a step splits them: 2 (background + 1 class) and 3
    output channels."""
    out = {}
    for n in (2, 3):
        sam = build_sam(SamConfig.tiny(num_multimask_outputs=n - 1), seed=n)
        apply_lora(sam, rank=2, seed=n)
        mark_trainable(sam)
        out[n] = split_trainable(TrainingModel(PromptDecoder(sam), None))
    return out


@partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, cfg, lower, prompt, frozen, embeddings, boxes, valid):
    model = nnx.merge(graphdef, lower, prompt, frozen)
    return forward(model.decoder, embeddings, boxes, cfg, box_valid=valid)


def run(t, cfg, embeddings, boxes, valid=None):
    """`forward` of the split model `t`, jitted (eager dispatch would dominate the test)."""
    return _forward(t.graphdef, cfg, t.lower, t.prompt, t.frozen, embeddings, boxes, valid)


def _inputs(seed: int, b: int, m: int):
    rng = np.random.default_rng(seed)
    g, c = 16, 32
    embeddings = jnp.asarray(rng.standard_normal((b, g, g, c)), jnp.float32)
    corners = rng.uniform(0, 256, (b, m, 2, 2))
    boxes = np.concatenate([corners.min(2), corners.max(2)], axis=-1)  # (B, M, 4) x0 y0 x1 y1
    return embeddings, jnp.asarray(boxes, jnp.float32)


@pytest.mark.parametrize(("n", "head"), [(2, "tokens"), (3, "tokens"), (2, "single_mask")])
def test_merged_logits_are_the_max_over_boxes_of_each_single_box_log_odds(models, n, head):
    t = models[n]
    cfg = dataclasses.replace(OFF, semantic_head=head)
    embeddings, boxes = _inputs(0, 2, 3)
    merged = run(t, cfg, embeddings, boxes)
    singles = jnp.stack([run(t, cfg, embeddings, boxes[:, m]) for m in range(3)], 1)
    odds = singles[:, :, 1:] - singles[:, :, :1]  # (B, M, n - 1, h, w)
    channels = 2 if head == "single_mask" else n
    assert merged.shape == (2, channels, 64, 64)
    np.testing.assert_array_equal(merged[:, 0], 0.0)
    np.testing.assert_allclose(merged[:, 1:], odds.max(axis=1), atol=1e-5)
    if channels == 2:  # one class: the union of the per-box masks
        union = jnp.argmax(singles, axis=2).max(axis=1)  # (B, h, w)
        agree = np.asarray(jnp.argmax(merged, axis=1) == union)
        assert agree.mean() > 0.999  # (a logit within float error of a tie may flip)
        assert 0.05 < float(union.mean()) < 0.95  # both classes occur: the check is not vacuous
    if head == "single_mask":  # background 0 in every box: the max of the foreground logits
        np.testing.assert_allclose(merged[:, 1], singles[:, :, 1].max(axis=1), atol=1e-5)


@pytest.mark.parametrize("average", ["batch", "sample"])
def test_calibration_acts_on_the_merged_logits(models, average):
    t = models[2]
    on = StepConfig(calibration=True, calibration_average=average)
    embeddings, boxes = _inputs(1, 2, 2)
    raw = run(t, OFF, embeddings, boxes)
    np.testing.assert_allclose(
        run(t, on, embeddings, boxes),
        calibrate_masks(raw, 4, on.calibration_alpha, average),  # c = 32 / 8 channels of U
        atol=1e-5,
    )


def test_padded_boxes_change_neither_the_prediction_nor_the_gradient(models):
    t = models[2]
    cfg = StepConfig()  # calibration on, batch mean: padding must not enter it
    embeddings, boxes = _inputs(2, 2, 3)
    valid = jnp.asarray([[True, False, True], [True, False, False]])
    garbage = boxes.at[:, 1].set(jnp.asarray([3.0, 200.0, 9.0, 250.0]))
    garbage = garbage.at[1, 2].set(jnp.asarray([0.0, 0.0, 256.0, 256.0]))
    a = run(t, cfg, embeddings, boxes, valid)
    np.testing.assert_array_equal(a, run(t, cfg, embeddings, garbage, valid))  # bitwise
    # Equal to the same images with only their real boxes (image 0: boxes 0 and 2; image 1:
    # box 0 twice, as padding repeats it).
    real = jnp.stack([boxes[0, jnp.array([0, 2])], boxes[1, jnp.array([0, 0])]])
    np.testing.assert_allclose(run(t, cfg, embeddings, real), a, atol=1e-5)

    grad = jax.jit(jax.grad(make_loss_fn(t.graphdef, cfg), argnums=(0, 1)))
    label = jnp.asarray(np.random.default_rng(5).integers(0, 2, (2, 64, 64)), jnp.int32)
    batches = [{"embedding": embeddings, "label": label, "box": x, "box_valid": valid}
               for x in (boxes, garbage)]  # fmt: skip
    grads = [grad(t.lower, t.prompt, t.frozen, b) for b in batches]
    jax.tree.map(np.testing.assert_array_equal, grads[0], grads[1])
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[0]))


@partial(jax.jit, static_argnums=(0,))
def _one_box_by_hand(graphdef, lower, prompt, frozen, embeddings, boxes):
    """The one-box decoder call: box tokens, `no_mask_embed`, the decoder, calibration."""
    pe = nnx.merge(graphdef, lower, prompt, frozen).decoder.prompt_encoder
    decoder = nnx.merge(graphdef, lower, prompt, frozen).decoder.mask_decoder
    dense = jnp.broadcast_to(pe.no_mask_embed.weight[...].reshape(1, 1, 1, -1), (2, 16, 16, 32))
    masks, _, hyper, _ = decoder.predict_masks(
        embeddings, pe.get_dense_pe(), pe._embed_boxes(boxes), dense
    )
    return calibrate_masks(masks, hyper.shape[-1], 0.7, "batch")


def test_one_box_per_image_keeps_the_one_box_forward(models):
    """(B, 4) boxes run the decoder exactly as before the several-box path existed; (B, 1, 4)
    boxes take the merge and give the same probabilities and argmax."""
    t = models[2]
    embeddings, boxes = _inputs(3, 2, 1)
    one = run(t, StepConfig(), embeddings, boxes[:, 0])
    by_hand = _one_box_by_hand(t.graphdef, t.lower, t.prompt, t.frozen, embeddings, boxes[:, 0])
    np.testing.assert_array_equal(one, by_hand)
    merged = run(t, StepConfig(), embeddings, boxes)
    np.testing.assert_allclose(jax.nn.softmax(merged, 1), jax.nn.softmax(one, 1), atol=1e-5)
    np.testing.assert_array_equal(jnp.argmax(merged, 1), jnp.argmax(one, 1))


# ---------------------------------------------------------------------------------------------
# A few-shot run with two boxes per image


def _blobs_folder(root):
    """4 train + 2 test images, each mask three rectangles (one box per component)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            mask = np.zeros((48, 64), np.uint8)
            for y, x in ((4, 4), (26, 10), (8, 40)):
                y, x = y + int(rng.integers(0, 6)), x + int(rng.integers(0, 6))
                mask[y : y + 12, x : x + 14] = 255
                image[y : y + 12, x : x + 14] = 230
            Image.fromarray(image).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{split}{i}.png")
    return root


def test_fewshot_run_and_evaluation_with_two_boxes_per_image(tmp_path):
    data = _blobs_folder(tmp_path / "data")
    box_path = tmp_path / "boxes.json"
    write_box_file(box_file_from_masks(data, components=True), box_path)
    assert all(len(e["boxes_all"]) == 3 for e in json.loads(box_path.read_text())["boxes"].values())
    cfg = am_sam("smoke")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, dir=str(data)),
        boxes=dataclasses.replace(cfg.boxes, file=str(box_path), max_per_image=2),
        train=dataclasses.replace(cfg.train, epochs=1, checkpoint_every_s=0, num_samples=1),
    )
    summary = trainer.train(cfg, tmp_path / "run")
    assert summary["steps"] == 2 and np.isfinite(summary["final_d2_dice"])
    assert "up to 2 per image, 4 image(s) with more cut to 2" in summary["boxes"]
    setup, state, _ = trainer.load_run_state(tmp_path / "run", "final")
    assert setup.d1.boxes.shape == (2, 2, 4) and setup.d1.box_valid.all()
    result = evaluate_workdir(tmp_path / "run", "final", overlays=0)
    assert len(result["per_image"]) == 2 and np.isfinite(result["dice"])
