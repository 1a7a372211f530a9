"""One smoke training run per test process, shared by the evaluation, notebook and interop tests.

Test-only helper: `am_sam:smoke` (tiny random SAM, bundled synthetic data, 2 epochs) trained once
with `fewshot.trainer.train` into a pytest temporary folder; the first caller pays the run.
"""

from pathlib import Path

from amsam_jax.fewshot.recipes import am_sam
from amsam_jax.fewshot.trainer import train

_RUN: dict[str, Path] = {}


def smoke_workdir(tmp_path_factory) -> Path:
    """The workdir of the shared smoke run (trained on first use)."""
    if "workdir" not in _RUN:
        workdir = tmp_path_factory.mktemp("smoke_run") / "run"
        train(am_sam("smoke"), workdir)
        _RUN["workdir"] = workdir
    return _RUN["workdir"]
