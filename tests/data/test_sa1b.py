"""The SA-1B annotation format (COCO RLE, JSON + probability sidecar) and the pseudo-label
CLI end to end on a random tiny SAM."""

import json

import numpy as np
import pytest
from PIL import Image

from amsam_jax import pseudo_labels
from amsam_jax.data.sa1b import (
    PseudoLabelError,
    iter_pseudo_labels,
    read_annotations,
    write_annotations,
)
from amsam_jax.sum.data import filter_annotations, label_target
from amsam_jax.utils.amg import (
    coco_rle_to_mask,
    mask_to_coco_rle,
    mask_to_counts,
    rle_counts_to_string,
    rle_string_to_counts,
)


def test_rle_hand_checked_examples():
    # Column-major [1,1,1 | 1,1,0 | 0,0,1] -> runs 0 zeros, 5 ones, 3 zeros, 1 one. The fourth
    # count is stored as 1 - 5 = -4: low 5 bits 0b11100 = 28 (sign bit 0x10 set, no more) -> 'L'.
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1]], bool)
    assert mask_to_counts(mask) == [0, 5, 3, 1]
    assert rle_counts_to_string([0, 5, 3, 1]) == "053L"
    assert rle_string_to_counts("053L") == [0, 5, 3, 1]
    np.testing.assert_array_equal(coco_rle_to_mask({"size": [3, 3], "counts": "053L"}), mask)
    # 100 = 0b11_00100: group 4 with the continuation bit (36 -> 'T'), then group 3 -> '3'.
    assert rle_counts_to_string([10, 100]) == ":T3"
    tall = np.ones((10, 11), bool)
    tall[:, 0] = False
    assert mask_to_coco_rle(tall) == {"size": [10, 11], "counts": ":T3"}


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (40, 33), (64, 64)]:
        for p in (0.0, 0.05, 0.5, 1.0):
            mask = rng.random(shape) < p
            rle = mask_to_coco_rle(mask)
            np.testing.assert_array_equal(coco_rle_to_mask(rle), mask)
    big = [0, 70000, 3, 1_000_000, 2, 5]
    assert rle_string_to_counts(rle_counts_to_string(big)) == big


def test_rle_rejects_bad_strings_and_sizes():
    with pytest.raises(ValueError, match="truncated"):
        rle_string_to_counts("T")  # a continuation bit with nothing after it
    with pytest.raises(ValueError, match="sum to"):
        coco_rle_to_mask({"size": [3, 3], "counts": "05"})


def write_example(tmp_path, k=2, h=6, w=8):
    masks = np.zeros((k, h, w), bool)
    masks[0, 1:4, 2:6] = True
    masks[1, 3:, :3] = True
    anns = [
        {
            "id": i,
            "segmentation": mask_to_coco_rle(m),
            "area": int(m.sum()),
            "bbox": [0.0, 0.0, 1.0, 1.0],
            "predicted_iou": 0.9,
            "point_coords": [[1.0, 2.0]],
            "stability_score": 0.97,
            "crop_box": [0.0, 0.0, float(w), float(h)],
        }
        for i, m in enumerate(masks)
    ]
    image = {"image_id": 1, "file_name": "a.png", "height": h, "width": w}
    prob = (masks * 200 + 20).astype(np.uint8)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "a.png")
    write_annotations(tmp_path / "a.json", image, anns, prob)
    return masks, prob


def test_annotation_file_round_trip_and_folder_reader(tmp_path):
    masks, prob = write_example(tmp_path)
    ann = read_annotations(tmp_path / "a.json")
    np.testing.assert_array_equal(ann.masks(), masks)
    np.testing.assert_array_equal(ann.load_prob(), prob)
    np.testing.assert_array_equal(ann.load_prob([1]), prob[[1]])
    (tmp_path / "a.prob.npz").unlink()  # real SA-1B: binary masks -> p_SAM = 255 * mask
    np.testing.assert_array_equal(ann.load_prob(), masks * np.uint8(255))
    items = list(iter_pseudo_labels(tmp_path))
    assert [i.image_path.name for i in items] == ["a.png"] and not items[0].has_alpha()
    kept = filter_annotations(ann, np.random.default_rng(0), min_ratio=0.001)
    np.testing.assert_array_equal(kept.indices, [0, 1])
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_or_mismatched_annotation_files_raise_one_line_errors(tmp_path):
    write_example(tmp_path)
    path = tmp_path / "a.json"
    good = path.read_text()
    data = json.loads(good)
    path.write_text('{"image": {')
    with pytest.raises(PseudoLabelError, match=r"a\.json: corrupt JSON") as e:
        read_annotations(path)
    assert "\n" not in str(e.value)
    data["annotations"][1]["segmentation"]["size"] = [5, 8]
    path.write_text(json.dumps(data))
    with pytest.raises(PseudoLabelError, match=r"a\.json: annotation 1 segmentation size"):
        read_annotations(path)
    del data["annotations"][1]["crop_box"]
    path.write_text(json.dumps(data))
    with pytest.raises(PseudoLabelError, match="lacks crop_box"):
        read_annotations(path)
    path.write_text(good)
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(PseudoLabelError, match=r"b\.json: missing annotation file"):
        list(iter_pseudo_labels(tmp_path))


def test_pseudo_label_cli_writes_sa1b_files_resumes_and_reports_corrupt_images(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"x.png": (40, 56), "y.jpg": (48, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / "z.png").write_bytes(b"not a png")
    argv = [
        "--images", str(images), "--out", str(out), "--random-tiny", "--points-per-side", "4",
        "--points-per-batch", "8", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
    ]  # fmt: skip
    assert pseudo_labels.main(argv) == 1
    captured = capsys.readouterr()
    assert "RANDOM" in captured.err
    assert [line for line in captured.err.splitlines() if "z.png" in line] == [
        line for line in captured.err.splitlines() if line.startswith("error:")
    ]
    assert not (out / "z.json").exists() and not (out / "z.prob.npz").exists()
    for stem, size in (("x", (40, 56)), ("y", (48, 32))):
        ann = read_annotations(out / f"{stem}.json")
        assert ann.size == size and ann.image["file_name"].startswith(stem)
        prob = ann.load_prob()
        assert prob.shape == (len(ann.annotations), *size)
        np.testing.assert_array_equal(label_target(prob), ann.masks())
        for a, m in zip(ann.annotations, ann.masks(), strict=True):
            assert a["area"] == int(m.sum())
    (images / "z.png").unlink()
    before = (out / "x.json").stat().st_mtime_ns
    assert pseudo_labels.main(argv) == 0
    assert "skip x.png" in capsys.readouterr().out
    assert (out / "x.json").stat().st_mtime_ns == before
