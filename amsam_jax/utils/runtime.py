"""Process-wide JAX settings of the command-line entry points."""

import os
from pathlib import Path

import jax

from amsam_jax.utils import program_cache


def enable_compilation_cache() -> None:
    """Reuse XLA compilations across runs (a decoder step compiles in ~1 min on 2 CPU cores).

    The cache lives in `$AMSAM_XLA_CACHE`, else `~/.cache/amsam_jax/xla`; traced programs that
    are kept (`utils.program_cache`) in the folder of that name + `-programs`.
    """
    default = Path.home() / ".cache" / "amsam_jax" / "xla"
    cache = os.environ.get("AMSAM_XLA_CACHE", str(default))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    program_cache.enable(cache)


# XLA:CPU hands dots, elementwise ops and reductions to YNNPACK. In the few-shot decoder
# programs (a step is ~2,800 kernels on 3 tokens against a 16 x 16 grid) its elementwise and
# reduction kernels cost up to ~1 ms each where XLA's own loops take ~10 us; its dots stay the
# fastest. Measured on the exact bi-level step (bench train): 36.4 -> 28-31 ms per iteration.
# The image encoder's large programs are faster with all three, so this is set per program.
DECODER_PROGRAM_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def decoder_program_options() -> dict:
    """`jax.jit(..., compiler_options=...)` of the small decoder-only programs (the few-shot
    step, epoch and evaluation; docs/fewshot.md §5.3): YNNPACK for dots only, on the CPU.

    Empty on other backends, and where `XLA_FLAGS` already sets the YNNPACK fusion types (the
    user's setting wins).
    """
    if "ynn_fusion_type" in os.environ.get("XLA_FLAGS", "") or jax.default_backend() != "cpu":
        return {}
    return dict(DECODER_PROGRAM_OPTIONS)
