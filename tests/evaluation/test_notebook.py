"""notebooks/evaluate.ipynb runs top to bottom on a smoke run (nbclient, ipykernel)."""

import json
from pathlib import Path

import nbclient
import nbformat
import pytest
from smoke_workdir import smoke_workdir

pytestmark = pytest.mark.slow  # the whole module: it needs nbclient (the `test` extra)

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "evaluate.ipynb"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return smoke_workdir(tmp_path_factory)


def test_evaluate_notebook_runs_and_shows_metrics_curves_and_overlays(workdir, monkeypatch):
    monkeypatch.setenv("AMSAM_WORKDIR", str(workdir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o.get("output_type") != "error" for c in code for o in c.outputs)
    text = "".join(o.get("text", "") for o in code[1].outputs if o.output_type == "stream")
    summary = json.loads(text[: text.rindex("}") + 1])
    saved = json.loads((workdir / "eval_test.json").read_text())
    assert summary["dice"] == saved["dice"] and summary["checkpoint"] == "best"
    images = [o for c in code[2:] for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # curves, overlays
