"""Fast tier: the shared-image and folded forms of the decoder attention equal the plain ones.

`Attention.token_to_image` / `image_to_token` reassociate the cross-attention sums so that the
image side (HW rows) is not projected (docs/sum.md §2.2); an image side of batch 1 is projected
once for every prompt row. Same values up to float32 rounding, fewer flops, and the plain form
wherever folding does not apply (LoRA-wrapped projections, many tokens).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amsam_jax import SamConfig, build_sam
from amsam_jax import automatic_mask_generator as amg
from amsam_jax.fewshot.lora import LoRALinear
from amsam_jax.modeling.mask_decoder import MaskDecoder
from amsam_jax.modeling.transformer import Attention, TwoWayTransformer

# The SAM decoder's sizes (the same for ViT-B/L/H): C = 256, 8 heads, internal width 128.
C, HEADS, RATE = 256, 8, 2
HW = 64  # an 8 x 8 image grid (SAM's is 64 x 64; the sums do not depend on it)
TOKENS = 7  # iou + 4 mask tokens + one point + the padding point, as in the AMG


def randomize(module: nnx.Module, seed: int, scale: float = 0.05) -> nnx.Module:
    """Every parameter plus N(0, scale²) noise, so that biases and norms are not 0 / 1."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(module, jax.tree.unflatten(treedef, noisy))
    return module


def normal(seed: int, *shape: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.fixture(scope="module")
def attention() -> Attention:
    return randomize(Attention(C, HEADS, RATE, rngs=nnx.Rngs(0)), 1)


@pytest.mark.parametrize("image_batch", [1, 3])
def test_token_to_image_equals_plain_attention_with_fewer_flops(attention, image_batch):
    tokens, image, image_v = (
        normal(0, 3, TOKENS, C),
        normal(1, image_batch, HW, C),
        normal(2, 1, HW, C),
    )
    image_v = jnp.broadcast_to(image_v, image.shape)
    full = (3, HW, C)
    want = attention(tokens, jnp.broadcast_to(image, full), jnp.broadcast_to(image_v, full))
    got = attention.token_to_image(tokens, image, image_v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if image_batch > 1:  # per-prompt image side: folded, fewer flops
        assert attention._foldable(TOKENS, attention.k_proj, attention.v_proj)
        folded = flops(attention.token_to_image, tokens, image, image_v)
        assert folded < 0.7 * flops(attention, tokens, image, image_v)


@pytest.mark.parametrize("image_batch", [1, 3])
def test_image_to_token_equals_plain_attention_with_fewer_flops(attention, image_batch):
    image, tokens, tokens_v = (
        normal(3, image_batch, HW, C),
        normal(4, 3, TOKENS, C),
        normal(5, 3, TOKENS, C),
    )
    want = attention(jnp.broadcast_to(image, (3, HW, C)), tokens, tokens_v)
    got = attention.image_to_token(image, tokens, tokens_v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    plain = flops(
        lambda q, k, v: attention(jnp.broadcast_to(q, (3, HW, C)), k, v), image, tokens, tokens_v
    )
    assert flops(attention.image_to_token, image, tokens, tokens_v) < 0.7 * plain


def test_a_shared_image_is_projected_once(attention):
    # Batch-1 keys in the plain form: the same values as the broadcast keys, a third of the
    # key/value projection flops for three prompt rows.
    tokens, image = normal(6, 3, TOKENS, C), normal(7, 1, HW, C)
    broadcast = jnp.broadcast_to(image, (3, HW, C))
    np.testing.assert_allclose(
        np.asarray(attention(tokens, image, image)),
        np.asarray(attention(tokens, broadcast, broadcast)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert flops(attention, tokens, image, image) < 0.5 * flops(
        lambda t, x: attention(t, jnp.broadcast_to(x, (3, HW, C)), jnp.broadcast_to(x, (3, HW, C))),
        tokens,
        image,
    )


def test_folding_falls_back_to_the_plain_form_for_lora_and_for_many_tokens():
    att = randomize(Attention(C, HEADS, RATE, rngs=nnx.Rngs(1)), 2)
    rng = np.random.default_rng(0)
    att.q_proj = LoRALinear(att.q_proj, 4, 1.0, rng)
    att.v_proj = LoRALinear(att.v_proj, 4, 1.0, rng)
    for lora in (att.q_proj, att.v_proj):  # B != 0: the wrapper's weight is not its kernel
        lora.lora_b[...] = normal(8, *lora.lora_b.shape)
    tokens, image = normal(9, 3, TOKENS, C), normal(10, 3, HW, C)
    np.testing.assert_array_equal(
        np.asarray(att.token_to_image(tokens, image, image)), np.asarray(att(tokens, image, image))
    )
    np.testing.assert_array_equal(
        np.asarray(att.image_to_token(image, tokens, tokens)),
        np.asarray(att(image, tokens, tokens)),
    )
    plain = randomize(Attention(C, HEADS, RATE, rngs=nnx.Rngs(2)), 3)
    many = normal(11, 3, 2 * C // (RATE * HEADS), C)  # h·n >= C/r: folding would cost more
    assert not plain._foldable(many.shape[1], plain.k_proj, plain.v_proj)
    np.testing.assert_array_equal(
        np.asarray(plain.token_to_image(many, image, image)), np.asarray(plain(many, image, image))
    )


@pytest.fixture(scope="module")
def decoder() -> MaskDecoder:
    rngs = nnx.Rngs(0)
    transformer = TwoWayTransformer(
        depth=2, embedding_dim=C, num_heads=HEADS, mlp_dim=2048, rngs=rngs
    )
    return randomize(MaskDecoder(transformer_dim=C, transformer=transformer, rngs=rngs), 4)


def test_decoder_with_one_shared_image_row_and_folding_equals_the_broadcast_decoder(decoder):
    b, g = 5, 8
    features, pe = normal(12, 1, g, g, C), normal(13, g, g, C)
    sparse, dense = normal(14, b, 2, C), jnp.broadcast_to(normal(15, 1, 1, 1, C), (b, g, g, C))
    want = nnx.jit(lambda d, *a: d.predict_masks(*a))(decoder, features, pe, sparse, dense)
    got = nnx.jit(lambda d, *a: d.predict_masks(*a, fold_projections=True))(
        decoder, features, pe, sparse, dense[:1]
    )
    for name, x, y in zip(("masks", "iou", "hyper", "upscaled"), got, want, strict=True):
        assert x.shape == y.shape, name
        scale = float(jnp.abs(y).max())
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5 * scale, err_msg=name)


def test_amg_decodes_a_point_batch_in_chunks_as_one_plain_decoder_pass(monkeypatch):
    model = build_sam(SamConfig.tiny(), seed=0)
    graphdef, state = nnx.split(model)
    g, c = model.prompt_encoder.image_embedding_size[0], model.prompt_encoder.embed_dim
    features = normal(16, 1, g, g, c)
    coords = jnp.asarray(np.random.default_rng(1).uniform(0, 256, (7, 2)).astype(np.float32))
    # Chunks of 3 prompts: 3 + 3 + 1 padded.
    monkeypatch.setattr(amg, "_DECODE_CHUNK_FLOATS", 3 * 16 * g * g * (c // 8))
    assert amg._decode_chunk(features.shape, 7) == 3
    decode = jax.jit(amg._decode_points.__wrapped__, static_argnums=(0, 4))
    low_res, iou = decode(graphdef, state, features, coords, None)

    @functools.partial(jax.jit, static_argnums=0)
    def plain(graphdef, state, features, coords):
        m = nnx.merge(graphdef, state)
        labels = jnp.ones((coords.shape[0], 1), jnp.int32)
        sparse, dense = m.prompt_encoder((coords[:, None, :], labels), None, None)
        return m.mask_decoder(features, m.prompt_encoder.get_dense_pe(), sparse, dense, True)

    want_low, want_iou = plain(graphdef, state, features, coords)
    assert low_res.shape == want_low.shape and iou.shape == want_iou.shape == (7, 3)
    np.testing.assert_allclose(np.asarray(low_res), np.asarray(want_low), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(iou), np.asarray(want_iou), rtol=1e-5, atol=1e-5)


def test_vit_b_point_batches_decode_two_prompts_per_pass():
    # SAM's 64 x 64 x 256 embedding: the upscaled map of two prompts is 16 MiB.
    assert amg._decode_chunk((1, 64, 64, 256), 64) == 2
    assert amg._decode_chunk((1, 64, 64, 256), 1) == 1
