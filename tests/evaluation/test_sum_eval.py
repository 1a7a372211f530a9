"""Interactive evaluation (docs/sum.md §8) through `python -m amsam_jax.evaluate`."""

import json

import numpy as np
import pytest

from amsam_jax import evaluate
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.checkpoint import load_sam, save_sam
from amsam_jax.data.synthetic import bundled_synthetic_dir
from amsam_jax.evaluation.interactive import EvalImage, evaluate_interactive


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    cfg = SamConfig.tiny()
    out = tmp_path_factory.mktemp("sam") / "tiny"
    save_sam(build_sam(cfg, seed=2), cfg, out, {"random": True})
    return out


def test_cli_writes_miou_and_mbiou_per_click_and_a_plot(tiny_sam_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = evaluate.main(
        [
            "--protocol", "interactive", "--sam", str(tiny_sam_dir),
            "--data", f"{bundled_synthetic_dir()}:salient", "--split", "test",
            "--clicks", "3", "--max-images", "2", "--output", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    for t in ("task_0", "task_matched"):
        assert len(result[t]["miou"]) == 3 and len(result[t]["mbiou"]) == 3
        assert result[t]["num_masks"] == 2
        assert all(0.0 <= v <= 100.0 for v in result[t]["miou"] + result[t]["mbiou"])
    # With the untrained (zero) task table, the matched id (1, salient) gives task 0's numbers.
    assert result["task_0"]["miou"] == result["task_matched"]["miou"]
    assert {r["task_id"] for r in result["per_mask"]} == {0, 1}
    assert (tmp_path / "eval.png").stat().st_size > 0
    printed = json.loads(capsys.readouterr().out)
    assert "per_mask" not in printed and printed["output"] == str(out)


def test_cli_errors_are_one_line(tiny_sam_dir, tmp_path, capsys):
    code = evaluate.main(
        ["--protocol", "interactive", "--sam", str(tiny_sam_dir), "--data", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "no such split folder" in err
    assert evaluate.main(["--protocol", "interactive", "--data", str(tmp_path)]) == 2
    assert "needs --sam" in capsys.readouterr().err


def test_a_model_that_predicts_nothing_scores_zero(tiny_sam_dir):
    """Zero hypernetwork outputs give logits 0 everywhere (not > 0): an empty prediction."""
    sam = load_sam(tiny_sam_dir)
    gt = np.ones((1, 40, 60), bool)
    img = np.zeros((40, 60, 3), np.uint8)
    for mlp in sam.mask_decoder.output_hypernetworks_mlps:
        last = mlp.layers[-1]
        last.kernel[...] = last.kernel[...] * 0
        last.bias[...] = last.bias[...] * 0
    empty = evaluate_interactive(sam, [EvalImage("x", img, gt, 1)], clicks=2, tasks=("0",))
    assert empty["task_0"]["miou"] == [0.0, 0.0]
