"""Image encoder: numerics traps (fast, no torch) and live parity with the official PyTorch encoder.

Parity bound: max |jax - torch| <= 1e-4 * max |torch| on the encoder output, in float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amsam_jax.build_sam import SamConfig, abstract_sam
from amsam_jax.modeling import image_encoder
from amsam_jax.modeling.image_encoder import (
    Attention,
    Block,
    window_partition,
    window_unpartition,
)

PARITY_RTOL = 1e-4
BF16_RTOL = 5e-2


def randomize(module: nnx.Module, seed: int, std: float = 0.3) -> nnx.Module:
    """Replaces every parameter by N(0, std^2) noise (zero biases and tables would hide bugs)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module)
    noisy = jax.tree.map(lambda a: jnp.asarray(std * rng.standard_normal(a.shape), a.dtype), state)
    nnx.update(module, noisy)
    return module


def abstract_encoder(cfg: SamConfig) -> nnx.Module:
    """The image encoder for `cfg` with shapes only (filled by `randomize` or `nnx.update`)."""
    return abstract_sam(cfg).image_encoder


def encode(module: nnx.Module, x: np.ndarray | jax.Array) -> np.ndarray:
    """Jitted forward of an NNX module (split: graphdef static, weights traced).

    One compile instead of one per primitive in eager mode, which is what makes small tests slow.
    """
    graphdef, state = nnx.split(module)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return np.asarray(forward(state, jnp.asarray(x)))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_attention(
    attn: Attention, x: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """Slow float64 attention over one (H, W, C) window or grid, one logit at a time.

    logit(i, j) = <q_i, k_j> / sqrt(d) + <q_i, Th[i_h - j_h + H - 1]> + <q_i, Tw[i_w - j_w + W - 1]>
    with the unscaled query in the relative terms. Keys with `valid == False` are masked out when
    `valid` is given (which the reference does NOT do; used to show that masking would differ).
    """
    h, w, c = x.shape
    n = attn.num_heads
    d = c // n
    f64 = functools.partial(np.asarray, dtype=np.float64)
    qkv = x.reshape(h * w, c).astype(np.float64) @ f64(attn.qkv.kernel[...])
    qkv += f64(attn.qkv.bias[...])
    q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
    table_h, table_w = f64(attn.rel_pos_h[...]), f64(attn.rel_pos_w[...])
    out = np.zeros((h * w, c))
    for head in range(n):
        hs = slice(head * d, (head + 1) * d)
        for i in range(h * w):
            i_h, i_w = divmod(i, w)
            logits = np.empty(h * w)
            for j in range(h * w):
                j_h, j_w = divmod(j, w)
                logits[j] = (
                    q[i, hs] @ k[j, hs] * d**-0.5
                    + q[i, hs] @ table_h[i_h - j_h + h - 1]
                    + q[i, hs] @ table_w[i_w - j_w + w - 1]
                )
            if valid is not None:
                logits = np.where(valid.reshape(-1), logits, -np.inf)
            out[i, hs] = softmax(logits) @ v[:, hs]
    out = out @ f64(attn.proj.kernel[...]) + f64(attn.proj.bias[...])
    return out.reshape(h, w, c)


# ---------------------------------------------------------------- fast tier: no torch


@functools.partial(jax.jit, static_argnums=1)
def partition_round_trip(x: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    windows, pad_hw = window_partition(x, window)
    return windows, window_unpartition(windows, window, pad_hw, x.shape[1:3])


@pytest.mark.parametrize("hw, window", [((16, 16), 14), ((14, 28), 14), ((10, 13), 7), ((5, 3), 4)])
def test_window_partition_unpartition_round_trip_is_exact_and_pads_with_zeros(hw, window):
    h, w = hw
    x = np.random.default_rng(0).standard_normal((2, h, w, 3)).astype(np.float32)
    windows, back = partition_round_trip(x, window)
    hp, wp = -(-h // window) * window, -(-w // window) * window
    assert windows.shape == (2 * (hp // window) * (wp // window), window, window, 3)
    # Window (b, r, c) holds rows r*window.. and cols c*window.. of the zero-padded image.
    padded = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    grid = np.asarray(windows).reshape(2, hp // window, wp // window, window, window, 3)
    for r in range(hp // window):
        for c in range(wp // window):
            np.testing.assert_array_equal(
                grid[:, r, c],
                padded[:, r * window : (r + 1) * window, c * window : (c + 1) * window],
            )
    np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize("hw", [(5, 5), (4, 6)])
def test_decomposed_rel_pos_attention_equals_explicit_index_formula(hw):
    h, w = hw
    attn = randomize(Attention(8, 2, (h, w), rngs=nnx.Rngs(0)), seed=1)
    x = np.random.default_rng(2).standard_normal((1, h, w, 8)).astype(np.float32)
    got = encode(attn, x)[0]
    want = reference_attention(attn, x[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The relative terms matter here: without them the output is clearly different.
    attn.rel_pos_h[...] = jnp.zeros_like(attn.rel_pos_h[...])
    attn.rel_pos_w[...] = jnp.zeros_like(attn.rel_pos_w[...])
    assert np.abs(encode(attn, x)[0] - want).max() > 1e-2


# 6x6 grid, 2 heads, batch 2: 4 (image, head) pairs. One row of queries has 4 * 6 * 36 bytes of
# float32 logits, one grid 6 times that.
STEP_ROW_BYTES = 4 * 6 * 36


@pytest.mark.parametrize(
    "budget, steps",
    [
        (None, (4, 6)),  # one step: every pair, every row
        (2 * 6 * STEP_ROW_BYTES, (2, 6)),  # two steps of two whole grids
        (2 * STEP_ROW_BYTES, (1, 2)),  # one pair and two rows at a time: 12 steps
    ],
)
def test_attention_in_steps_equals_explicit_index_formula(monkeypatch, budget, steps):
    if budget is not None:
        monkeypatch.setattr(image_encoder, "LOGITS_BYTES", budget)
    assert image_encoder.attention_steps(4, 6, 6) == steps
    attn = randomize(Attention(8, 2, (6, 6), rngs=nnx.Rngs(0)), seed=8)
    x = np.random.default_rng(9).standard_normal((2, 6, 6, 8)).astype(np.float32)
    got = encode(attn, x)
    for i in range(2):  # the (image, head) pairs of both images are kept apart
        np.testing.assert_allclose(got[i], reference_attention(attn, x[i]), rtol=1e-5, atol=1e-5)


def test_attention_steps_at_vit_b_sizes():
    # 1024 px: global blocks one head and 4 of 64 rows at a time (4 MiB of logits); windows 25 of
    # the 25 x 12 (window, head) pairs; 256 px: all in one step, windows in two.
    assert image_encoder.attention_steps(12, 64, 64) == (1, 4)
    assert image_encoder.attention_steps(25 * 12, 14, 14) == (25, 14)
    assert image_encoder.attention_steps(12, 16, 16) == (12, 16)
    assert image_encoder.attention_steps(4 * 12, 14, 14) == (24, 14)


@pytest.mark.parametrize(
    "hw, grids_per_step",
    [
        ((10, 10), None),  # padded to 14x14: three of the four windows hold padding
        ((10, 10), 3),  # the same in steps of 2 (window, head) pairs
        ((10, 16), None),  # 14x21: full, right-cut, bottom-cut and corner windows
        ((5, 9), None),  # fewer rows than a window: only cut windows along that side
        ((13, 13), None),  # 14x14, 14 % padding: below TRIM_PADDED_QUERIES, all queries kept
    ],
)
def test_padded_window_tokens_take_part_in_attention_unmasked(monkeypatch, hw, grids_per_step):
    h, w = hw
    window, dim = 7, 16
    hp, wp = -(-h // window) * window, -(-w // window) * window
    trimmed = 1 - h * w / (hp * wp) >= image_encoder.TRIM_PADDED_QUERIES
    assert trimmed == (hw != (13, 13))
    if grids_per_step is not None:  # 4 windows x 2 heads, 2 (window, head) pairs per step
        monkeypatch.setattr(image_encoder, "LOGITS_BYTES", grids_per_step * 4 * 49 * 49)
        assert image_encoder.attention_steps(8, 7, 7) == (2, 7)
    block = randomize(Block(dim, 2, 2.0, window, (h, w), rngs=nnx.Rngs(0)), seed=3)
    x = np.random.default_rng(4).standard_normal((1, h, w, dim)).astype(np.float32)
    got = encode(block, x)[0]

    normed = np.pad(encode(block.norm1, x)[0], ((0, hp - h), (0, wp - w), (0, 0)))
    valid = np.pad(np.ones((h, w), bool), ((0, hp - h), (0, wp - w)))

    def reference_block(mask_padding: bool) -> np.ndarray:
        attended = np.zeros_like(normed, dtype=np.float64)
        for r in range(0, hp, window):
            for c in range(0, wp, window):
                win = (slice(r, r + window), slice(c, c + window))
                mask = valid[win] if mask_padding else None
                attended[win] = reference_attention(block.attn, normed[win], mask)
        y = x[0] + attended[:h, :w]
        return y + encode(block.mlp, encode(block.norm2, y.astype(np.float32)))

    np.testing.assert_allclose(got, reference_block(mask_padding=False), rtol=1e-4, atol=1e-4)
    assert np.abs(got - reference_block(mask_padding=True)).max() > 1e-2


def test_window_groups_cover_each_side_in_runs_of_equal_real_tokens():
    assert image_encoder.window_groups(16, 14) == [(0, 1, 14), (1, 1, 2)]
    assert image_encoder.window_groups(64, 14) == [(0, 4, 14), (4, 1, 8)]
    assert image_encoder.window_groups(28, 14) == [(0, 2, 14)]
    assert image_encoder.window_groups(5, 7) == [(0, 1, 5)]


def test_bfloat16_encoder_runs_and_stays_close_to_float32():
    cfg = SamConfig.tiny()
    fp32 = randomize(abstract_encoder(cfg), seed=5, std=0.1)
    bf16 = abstract_encoder(dataclasses.replace(cfg, encoder_dtype="bfloat16"))
    nnx.update(bf16, nnx.state(fp32))
    x = np.random.default_rng(6).standard_normal((1, 256, 256, 3)).astype(np.float32)
    want = encode(fp32, x)
    got = encode(bf16, x)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert relative_error(got, want) <= BF16_RTOL


# ---------------------------------------------------------------- slow tier: official PyTorch


@pytest.fixture(scope="module")
def official():
    """Memoised `official_pair(cfg)`: each (torch, jax) pair is built once per module."""
    from sam_reference import official_pair

    return functools.cache(official_pair)


def torch_encode(ref, x_nchw: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref.image_encoder(torch.from_numpy(x_nchw)).numpy()


def assert_encoder_parity(official, cfg: SamConfig, seed: int = 0) -> np.ndarray:
    ref, model = official(cfg)
    s = cfg.image_size
    x = np.random.default_rng(seed).standard_normal((1, 3, s, s)).astype(np.float32)
    want = torch_encode(ref, x)  # (1, 256, G, G)
    got = encode(model.image_encoder, x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    err = relative_error(got, want)
    assert err <= PARITY_RTOL, f"max|delta| / max|ref| = {err:.2e} > {PARITY_RTOL:.0e}"
    return want


VIT_B_256 = SamConfig.vit_b(image_size=256)

PARITY_CONFIGS = {
    "tiny": SamConfig.tiny(),
    "vit_b_256": VIT_B_256,
    "vit_b_1024": SamConfig.vit_b(image_size=1024),
    # Real global-attention lists truncated to the reduced depth.
    "vit_l_depth6_256": SamConfig.vit_l(
        encoder_depth=6, encoder_global_attn_indexes=(5,), image_size=256
    ),
    "vit_h_depth8_256": SamConfig.vit_h(
        encoder_depth=8, encoder_global_attn_indexes=(7,), image_size=256
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_encoder_matches_official_pytorch(official, name):
    assert_encoder_parity(official, PARITY_CONFIGS[name])


@pytest.mark.slow
def test_bfloat16_vit_b_256_stays_close_to_official_float32(official):
    ref, model = official(VIT_B_256)
    bf16 = abstract_encoder(dataclasses.replace(VIT_B_256, encoder_dtype="bfloat16"))
    nnx.update(bf16, nnx.state(model.image_encoder))
    x = np.random.default_rng(7).standard_normal((1, 3, 256, 256)).astype(np.float32)
    want = torch_encode(ref, x)
    got = encode(bf16, x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert relative_error(got, want) <= BF16_RTOL
