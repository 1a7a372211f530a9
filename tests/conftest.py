"""Shared test setup: float32 matmuls on every backend, as the parity tolerances assume."""

import jax

jax.config.update("jax_default_matmul_precision", "float32")
