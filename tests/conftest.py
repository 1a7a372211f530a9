"""Shared test setup: float32 matmuls on every backend, as the parity tolerances assume."""

from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "float32")
# XLA compiles are slow on a 2-core CPU; reuse them across test processes and runs.
jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache/amsam_jax/jax-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
