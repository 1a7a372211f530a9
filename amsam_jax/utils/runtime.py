"""Process-wide JAX settings of the command-line entry points."""

import os
from pathlib import Path

import jax


def enable_compilation_cache() -> None:
    """Reuse XLA compilations across runs (a decoder step compiles in ~1 min on 2 CPU cores).

    The cache lives in `$AMSAM_XLA_CACHE`, else `~/.cache/amsam_jax/xla`.
    """
    default = Path.home() / ".cache" / "amsam_jax" / "xla"
    jax.config.update("jax_compilation_cache_dir", os.environ.get("AMSAM_XLA_CACHE", str(default)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
