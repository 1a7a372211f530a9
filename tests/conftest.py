"""Shared test setup: float32 matmuls on every backend, as the parity tolerances assume."""

import os
import sys
from pathlib import Path

import jax
import pytest
from PIL import Image

jax.config.update("jax_default_matmul_precision", "float32")
# XLA compiles are slow on a 2-core CPU; reuse them across test processes and runs.
_CACHE = Path.home() / ".cache/amsam_jax/jax-tests"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
# CLI subprocesses (`python -m amsam_jax.train ...`) share it: the same recipe compiled in-process
# by one test is a cache hit for another test's subprocess.
# The matmul precision is part of the cache key, so subprocesses get the same setting.
os.environ.setdefault("AMSAM_XLA_CACHE", str(_CACHE))
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "float32")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def pil_open_without_ultralytics_patch(monkeypatch):
    """Importing ultralytics (YOLO tests) replaces `PIL.Image.open` by a wrapper that, on a file
    PIL cannot identify, tries to install pi-heif (ModuleNotFoundError offline). amsam_jax never
    imports ultralytics: undo the patch for every test that runs after such an import."""
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None:
        monkeypatch.setattr(Image, "open", patches._image_open)
