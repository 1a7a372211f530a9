"""`utils.runtime.decoder_program_options`: the XLA option of the few-shot decoder programs."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from amsam_jax.utils.runtime import DECODER_PROGRAM_OPTIONS, decoder_program_options


def _layer_norm_then_dot(x, w):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return jnp.tanh((x - mean) / jnp.sqrt(var + 1e-6)) @ w


def _ynn_fusion_bodies(text: str) -> list[str]:
    """The fused computations that the compiled module hands to YNNPACK."""
    called = re.findall(r"fusion\([^)]*\), kind=kCustom, calls=%([\w.\-]+)", text)
    bodies = dict(re.findall(r"\n%?([\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", text, re.S))
    return [bodies[name] for name in called if name in bodies]


def test_on_the_cpu_the_options_ask_for_ynnpack_dots_only(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert jax.default_backend() == "cpu"
    assert decoder_program_options() == DECODER_PROGRAM_OPTIONS
    assert decoder_program_options() is not DECODER_PROGRAM_OPTIONS  # a copy: callers may edit


def test_a_user_setting_in_xla_flags_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert decoder_program_options() == {}


def test_compiled_with_the_options_every_library_kernel_holds_a_dot():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256), np.float32))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((256, 128), np.float32))
    fn = jax.jit(_layer_norm_then_dot, compiler_options=decoder_program_options())
    compiled = fn.lower(x, w).compile()
    bodies = _ynn_fusion_bodies(compiled.as_text())
    assert all(" dot(" in body for body in bodies)  # no elementwise- or reduce-only kernels
    default = jax.jit(_layer_norm_then_dot)(x, w)
    np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(default), rtol=1e-5, atol=1e-4)
