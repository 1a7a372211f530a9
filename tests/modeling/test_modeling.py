"""Fast tier: numerics traps, shapes and compile behaviour of the Flax SAM (no torch)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amsam_jax import SamConfig, SamPredictor, build_sam
from amsam_jax.build_sam import _construct, abstract_sam
from amsam_jax.checkpoint import resize_pos_embed, resize_rel_pos
from amsam_jax.modeling.common import (
    ConvTranspose2x2,
    LayerNorm2d,
    gelu,
    layer_norm,
    resize_bilinear,
    resize_linear,
)
from amsam_jax.predictor import _decode, _encode
from amsam_jax.utils.transforms import ResizeLongestSide


@pytest.fixture(scope="module")
def tiny():
    return build_sam(SamConfig.tiny(), seed=0)


@pytest.mark.parametrize("model_type", ["tiny", "litemedsam", "tiny_vit"])
def test_abstract_sam_without_rng_streams_has_the_graph_and_shapes_of_nnx_rngs(model_type):
    """`abstract_sam` draws every parameter from one fixed key instead of `nnx.Rngs` (its
    quadratic tracing): the same modules, variable types, shapes and dtypes."""
    cfg = SamConfig.preset(model_type)
    expected = nnx.split(nnx.eval_shape(lambda: _construct(cfg, nnx.Rngs(0))))
    graphdef, state = nnx.split(abstract_sam(cfg))
    assert graphdef == expected[0]

    def spec(x):
        return type(x).__name__, x.shape, x.dtype

    flat = [(path, spec(v)) for path, v in nnx.to_flat_state(state)]
    assert flat == [(path, spec(v)) for path, v in nnx.to_flat_state(expected[1])]
    assert len(flat) > 50


def test_random_weights_have_torch_default_init_distributions(tiny):
    """Linear kernels U(±1/sqrt(fan_in)) in float32 (mean 0, std bound/sqrt(3)), distinct per
    layer and per seed; LayerNorm scale 1."""
    kernel = np.asarray(tiny.mask_decoder.output_hypernetworks_mlps[0].layers[0].kernel[...])
    bound = 1 / math.sqrt(kernel.shape[0])
    assert kernel.dtype == np.float32
    assert -bound <= kernel.min() < -0.95 * bound and 0.95 * bound < kernel.max() < bound
    assert abs(kernel.mean()) < 0.05 * bound
    assert abs(kernel.std() - bound / math.sqrt(3)) < 0.05 * bound
    other = np.asarray(tiny.mask_decoder.output_hypernetworks_mlps[1].layers[0].kernel[...])
    reseeded = build_sam(SamConfig.tiny(), seed=1).mask_decoder.output_hypernetworks_mlps[0]
    assert not np.array_equal(kernel, other)
    assert not np.array_equal(kernel, np.asarray(reseeded.layers[0].kernel[...]))
    assert np.all(np.asarray(tiny.mask_decoder.transformer.norm_final_attn.scale[...]) == 1)


def test_gelu_is_exact_erf_form_not_tanh():
    x = np.linspace(-4, 4, 101)
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x, jnp.float32))), exact, atol=1e-6)
    assert np.abs(np.asarray(nnx.gelu(jnp.asarray(x, jnp.float32))) - exact).max() > 1e-4


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layer_norm_uses_given_eps_and_two_pass_variance(eps):
    ln = layer_norm(8, eps, rngs=nnx.Rngs(0))
    # A large offset makes E[x^2] - E[x]^2 (flax's fast variance) lose precision.
    x = np.random.default_rng(0).normal(1000.0, 1e-2, (4, 8)).astype(np.float32)
    mean = x.astype(np.float64).mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    ref = (x - mean) / np.sqrt(var + eps)
    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), ref, atol=2e-2)
    assert ln.epsilon == eps


def test_layer_norm_2d_equals_per_pixel_channel_layer_norm():
    x = np.random.default_rng(1).normal(size=(2, 5, 6, 8)).astype(np.float32)
    ln2d = LayerNorm2d(8, rngs=nnx.Rngs(0))
    ln2d.weight[...] = jnp.arange(8.0) / 8 + 0.5
    ln2d.bias[...] = -jnp.arange(8.0) / 16
    mean = x.mean(-1, keepdims=True)
    ref = (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    ref = ref * np.asarray(ln2d.weight[...]) + np.asarray(ln2d.bias[...])
    np.testing.assert_allclose(np.asarray(ln2d(jnp.asarray(x))), ref, atol=1e-5)


def test_conv_transpose_2x2_equals_explicit_loop():
    conv = ConvTranspose2x2(3, 4, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 3)).astype(np.float32)
    w = np.asarray(conv.weight[...])  # (I, O, 2, 2), PyTorch layout
    b = np.asarray(conv.bias[...])
    ref = np.zeros((2, 6, 10, 4), np.float32) + b
    for i in range(3):
        for j in range(5):
            for di in range(2):
                for dj in range(2):
                    ref[:, 2 * i + di, 2 * j + dj] += x[:, i, j] @ w[:, :, di, dj]
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), ref, atol=1e-5)


def _torch_linear_reference(x: np.ndarray, out: int) -> np.ndarray:
    """PyTorch's align_corners=False linear interpolation along axis 0, written out."""
    n = x.shape[0]
    res = []
    for i in range(out):
        s = max((i + 0.5) * n / out - 0.5, 0.0)
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, n - 1)
        lam = s - i0
        res.append((1 - lam) * x[i0] + lam * x[i1])
    return np.stack(res)


@pytest.mark.parametrize("n_in,n_out", [(127, 31), (64, 16), (16, 64), (7, 5)])
def test_resize_linear_matches_formula_without_antialias(n_in, n_out):
    x = np.random.default_rng(3).normal(size=(n_in, 3)).astype(np.float32)
    ref = _torch_linear_reference(x.astype(np.float64), n_out)
    # Source coordinates are computed in float32, as PyTorch does: ~1e-5 from the float64 formula.
    np.testing.assert_allclose(resize_linear(x, n_out, axis=0), ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(resize_linear(jnp.asarray(x), n_out, 0)), ref, atol=1e-4)
    if n_out < n_in:  # jax.image.resize antialiases when downsampling: a different result
        aa = np.asarray(jax.image.resize(jnp.asarray(x), (n_out, 3), "linear"))
        assert np.abs(aa - ref).max() > 1e-3


def test_pos_embed_64_to_16_is_central_2x2_mean_per_block():
    x = np.random.default_rng(4).normal(size=(1, 64, 64, 5)).astype(np.float32)
    out = resize_pos_embed(x, 16)
    blocks = x[0].reshape(16, 4, 16, 4, 5)
    central = blocks[:, 1:3, :, 1:3].mean(axis=(1, 3))
    np.testing.assert_allclose(out[0], central, atol=1e-6)


def test_global_rel_pos_127_to_31_matches_spec_formula():
    t = np.random.default_rng(5).normal(size=(127, 4)).astype(np.float64)
    out = resize_rel_pos(t.astype(np.float32), 31)
    ref = []
    for i in range(31):
        s = max((i + 0.5) * 127 / 31 - 0.5, 0.0)
        i0 = math.floor(s)
        i1 = min(i0 + 1, 126)
        ref.append((1 - (s - i0)) * t[i0] + (s - i0) * t[i1])
    np.testing.assert_allclose(out, np.stack(ref), atol=1e-4)


def test_resize_bilinear_same_on_numpy_and_jax():
    x = np.random.default_rng(6).normal(size=(1, 2, 16, 16)).astype(np.float32)
    a = resize_bilinear(x, (40, 24), axes=(2, 3))
    b = np.asarray(resize_bilinear(jnp.asarray(x), (40, 24), axes=(2, 3)))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_shapes_of_tiny_model_with_box_and_points(tiny):
    cfg = SamConfig.tiny()
    g, c, k = cfg.grid_size, cfg.prompt_embed_dim, cfg.num_multimask_outputs + 1

    @nnx.jit
    def run(model, x, boxes):
        emb = model.image_encoder(x)
        sparse, dense = model.prompt_encoder(None, boxes, None)
        pe = model.prompt_encoder.get_dense_pe()
        both = model.mask_decoder.predict_masks(emb, pe, sparse, dense)
        alone = model.mask_decoder.predict_masks(emb[1:], pe, sparse[1:], dense[1:])
        return emb, pe, sparse, dense, both, alone[0]

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, cfg.image_size, cfg.image_size, 3)))
    boxes = jnp.asarray([[10.0, 20.0, 100.0, 120.0], [0.0, 0.0, 255.0, 255.0]])
    emb, pe, sparse, dense, (masks, iou, hyper, up), alone = run(tiny, x, boxes)
    assert emb.shape == (2, g, g, c) and pe.shape == (g, g, c)
    assert sparse.shape == (2, 2, c) and dense.shape == (2, g, g, c)
    assert masks.shape == (2, k, 4 * g, 4 * g) and iou.shape == (2, k)
    assert hyper.shape == (2, k, c // 8) and up.shape == (2, 4 * g, 4 * g, c // 8)
    # Each image is paired with its own box (no B^2 expansion): sample 1 alone gives the same.
    np.testing.assert_allclose(np.asarray(masks[1:]), np.asarray(alone), atol=1e-5)


def test_box_corner_encoding_is_pe_of_shifted_normalised_corner_plus_type(tiny):
    pe = tiny.prompt_encoder
    box = jnp.asarray([[10.0, 20.0, 100.0, 120.0]])
    sparse, _ = pe(None, box, None)
    s = SamConfig.tiny().image_size
    corner = jnp.asarray([[[10.5 / s, 20.5 / s], [100.5 / s, 120.5 / s]]])
    ref = pe.pe_layer._pe_encoding(corner)[0]
    ref = ref + jnp.concatenate(
        [pe.point_embeddings[2].weight[...], pe.point_embeddings[3].weight[...]]
    )
    np.testing.assert_allclose(np.asarray(sparse[0]), np.asarray(ref), atol=1e-6)


def test_predictor_compiles_encoder_once_across_image_sizes(tiny):
    predictor = SamPredictor(tiny)
    rng = np.random.default_rng(0)
    _encode.clear_cache()
    _decode.clear_cache()
    for h, w in [(120, 200), (300, 170), (256, 256)]:
        predictor.set_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        masks, iou, low = predictor.predict(box=np.array([5, 5, w - 10, h - 10]))
        assert masks.shape == (3, h, w) and masks.dtype == bool
        assert iou.shape == (3,) and low.shape == (3, 64, 64)
    assert _encode._cache_size() == 1
    assert _decode._cache_size() == 1


def test_predictor_rejects_bad_inputs(tiny):
    predictor = SamPredictor(tiny)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([0, 0, 5, 5]))
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.zeros((10, 10, 3), np.float32))
    predictor.set_image(np.zeros((64, 80, 3), np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(point_coords=np.array([[1, 2]]))
    with pytest.raises(ValueError, match="mask_input"):
        predictor.predict(box=np.array([0, 0, 5, 5]), mask_input=np.zeros((1, 32, 32)))


def test_resize_longest_side_shapes_and_coordinate_mapping():
    t = ResizeLongestSide(1024)
    assert t.get_preprocess_shape(480, 640, 1024) == (768, 1024)
    assert t.get_preprocess_shape(1001, 333, 1024) == (1024, 341)
    img = np.zeros((480, 640, 3), np.uint8)
    assert t.apply_image(img).shape == (768, 1024, 3)
    coords = t.apply_coords(np.array([[640.0, 480.0], [320.0, 240.0]]), (480, 640))
    np.testing.assert_allclose(coords, [[1024.0, 768.0], [512.0, 384.0]])
    boxes = t.apply_boxes(np.array([[0.0, 0.0, 640.0, 480.0]]), (480, 640))
    np.testing.assert_allclose(boxes, [[0.0, 0.0, 1024.0, 768.0]])
