"""Model presets and constructors. Port of segment_anything/build_sam.py (Apache-2.0)."""

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from amsam_jax.modeling.common import ConvTranspose2x2, LayerNorm2d
from amsam_jax.modeling.image_encoder import ImageEncoderViT
from amsam_jax.modeling.mask_decoder import MaskDecoder
from amsam_jax.modeling.prompt_encoder import Embedding, PositionEmbeddingRandom, PromptEncoder
from amsam_jax.modeling.sam import Sam
from amsam_jax.modeling.tiny_vit import BatchNorm2d, TinyViT, tiny_vit_grid
from amsam_jax.modeling.transformer import TwoWayTransformer

# SAM's pixel normalisation of 0-255 RGB inputs (ImageNet statistics).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "mobile_sam", "litemedsam", "tiny", "tiny_vit")
# Global-attention block indices per official size (docs/fewshot.md §1.1). Never derived from names.
GLOBAL_ATTN_INDEXES = {
    "vit_b": (2, 5, 8, 11),
    "vit_l": (5, 11, 17, 23),
    "vit_h": (7, 15, 23, 31),
}


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Everything that determines the SAM architecture (and so the checkpoint's shapes)."""

    model_type: str = "vit_b"
    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = GLOBAL_ATTN_INDEXES["vit_b"]
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    # SUM task prompt (docs/sum.md §4): rows of the zero-initialised table; row 0 frozen at zero.
    num_tasks: int = 4
    freeze_task0: bool = True
    # Compute dtype of the frozen image encoder ("float32" or "bfloat16"); params stay float32.
    encoder_dtype: str = "float32"
    # Image encoder family: "vit" (SAM's ViT-B/L/H) or "tiny_vit" (MobileSAM, LiteMedSAM).
    encoder: str = "vit"
    # TinyViT (docs/fewshot.md §1.6): four stages; merge strides after stages 0-2; patch stride 4
    # (MobileSAM: two 3x3 stride-2 convs) or 1 (LiteMedSAM: two 1x1 convs).
    tiny_vit_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    tiny_vit_depths: tuple[int, ...] = (2, 2, 6, 2)
    tiny_vit_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    tiny_vit_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    tiny_vit_merge_strides: tuple[int, ...] = (2, 2, 1)
    tiny_vit_patch_stride: int = 4
    tiny_vit_mbconv_expand_ratio: float = 4.0
    tiny_vit_local_conv_size: int = 3
    # How `SamPredictor` turns a uint8 image into the model input: "sam" (longest side resized
    # with PIL bilinear, (x - pixel_mean) / pixel_std, zero padding) or "medsam" (LiteMedSAM
    # upstream: longest side resized with OpenCV's area interpolation, min-max scaled to [0, 1],
    # zero padding; pixel_mean/std unused).
    preprocess: str = "sam"

    @classmethod
    def vit_b(cls, **kw) -> "SamConfig":
        return cls(**kw)

    @classmethod
    def vit_l(cls, **kw) -> "SamConfig":
        base = dict(
            model_type="vit_l",
            encoder_embed_dim=1024,
            encoder_depth=24,
            encoder_num_heads=16,
            encoder_global_attn_indexes=GLOBAL_ATTN_INDEXES["vit_l"],
        )
        return cls(**{**base, **kw})

    @classmethod
    def vit_h(cls, **kw) -> "SamConfig":
        base = dict(
            model_type="vit_h",
            encoder_embed_dim=1280,
            encoder_depth=32,
            encoder_num_heads=16,
            encoder_global_attn_indexes=GLOBAL_ATTN_INDEXES["vit_h"],
        )
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, **kw) -> "SamConfig":
        """A small model for logic tests: same code paths, a fraction of the compute."""
        base = dict(
            model_type="tiny",
            image_size=256,
            encoder_embed_dim=64,
            encoder_depth=2,
            encoder_num_heads=2,
            encoder_global_attn_indexes=(1,),
            prompt_embed_dim=32,
            decoder_num_heads=2,
            decoder_mlp_dim=64,
            iou_head_hidden_dim=32,
        )
        return cls(**{**base, **kw})

    @classmethod
    def mobile_sam(cls, **kw) -> "SamConfig":
        """MobileSAM (`vit_t`): TinyViT-5M at 1024 px with SAM's prompt encoder and decoder."""
        base = dict(model_type="mobile_sam", encoder="tiny_vit", image_size=1024)
        return cls(**{**base, **kw})

    @classmethod
    def litemedsam(cls, **kw) -> "SamConfig":
        """LiteMedSAM: MobileSAM's TinyViT without patch downsampling, at 256 px (64x64 grid,
        256x256 low-res masks), fed min-max scaled images."""
        base = dict(
            model_type="litemedsam",
            encoder="tiny_vit",
            image_size=256,
            tiny_vit_patch_stride=1,
            preprocess="medsam",
            pixel_mean=(0.0, 0.0, 0.0),
            pixel_std=(1.0, 1.0, 1.0),
        )
        return cls(**{**base, **kw})

    @classmethod
    def tiny_vit(cls, **kw) -> "SamConfig":
        """A small TinyViT SAM for logic tests (partial windows, both merge strides)."""
        base = dict(
            model_type="tiny_vit",
            encoder="tiny_vit",
            image_size=256,
            tiny_vit_embed_dims=(16, 32, 48, 64),
            tiny_vit_depths=(1, 1, 2, 1),
            tiny_vit_num_heads=(1, 2, 3, 4),
            tiny_vit_window_sizes=(7, 7, 7, 7),
            prompt_embed_dim=32,
            decoder_num_heads=2,
            decoder_mlp_dim=64,
            iou_head_hidden_dim=32,
        )
        return cls(**{**base, **kw})

    @classmethod
    def preset(cls, model_type: str, **kw) -> "SamConfig":
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model type {model_type!r} ({', '.join(MODEL_TYPES)})")
        return getattr(cls, model_type)(**kw)

    @property
    def grid_size(self) -> int:
        """Side G of the image embedding (the low-res masks are 4G)."""
        if self.encoder == "tiny_vit":
            return tiny_vit_grid(
                self.image_size, self.tiny_vit_patch_stride, self.tiny_vit_merge_strides
            )
        return self.image_size // self.patch_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamConfig":
        d = dict(d)
        for key, value in d.items():
            if isinstance(value, list):
                d[key] = tuple(value)
        return cls(**d)


def _image_encoder(cfg: SamConfig, rngs: nnx.Rngs) -> ImageEncoderViT | TinyViT:
    if cfg.encoder == "tiny_vit":
        return TinyViT(
            img_size=cfg.image_size,
            patch_stride=cfg.tiny_vit_patch_stride,
            embed_dims=cfg.tiny_vit_embed_dims,
            depths=cfg.tiny_vit_depths,
            num_heads=cfg.tiny_vit_num_heads,
            window_sizes=cfg.tiny_vit_window_sizes,
            merge_strides=cfg.tiny_vit_merge_strides,
            mlp_ratio=cfg.mlp_ratio,
            mbconv_expand_ratio=cfg.tiny_vit_mbconv_expand_ratio,
            local_conv_size=cfg.tiny_vit_local_conv_size,
            out_chans=cfg.prompt_embed_dim,
            dtype=jnp.dtype(cfg.encoder_dtype),
            rngs=rngs,
        )
    if cfg.encoder != "vit":
        raise ValueError(f"unknown image encoder {cfg.encoder!r} (vit, tiny_vit)")
    return ImageEncoderViT(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.prompt_embed_dim,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.encoder_global_attn_indexes,
        dtype=jnp.dtype(cfg.encoder_dtype),
        rngs=rngs,
    )


def _construct(cfg: SamConfig, rngs: nnx.Rngs) -> Sam:
    grid = cfg.grid_size
    image_encoder = _image_encoder(cfg, rngs)
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans,
        num_tasks=cfg.num_tasks,
        freeze_task0=cfg.freeze_task0,
        rngs=rngs,
    )
    transformer = TwoWayTransformer(
        depth=cfg.decoder_depth,
        embedding_dim=cfg.prompt_embed_dim,
        num_heads=cfg.decoder_num_heads,
        mlp_dim=cfg.decoder_mlp_dim,
        rngs=rngs,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim,
        transformer=transformer,
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        rngs=rngs,
    )
    return Sam(
        image_encoder, prompt_encoder, mask_decoder, cfg.pixel_mean, cfg.pixel_std, cfg.preprocess
    )


def _pytorch_default_init(model: Sam, rng: np.random.Generator) -> dict[tuple, np.ndarray]:
    """Values with the distributions of an untrained official SAM, by module type.

    Linear/Conv: weight and bias U(±1/sqrt(fan_in)); ConvTranspose: fan_in = O·k·k (torch's
    convention); LayerNorm: 1 and 0; BatchNorm: weight 1, bias 0, mean 0, variance 1; Embedding
    and the Fourier matrix: N(0, 1); pos_embed, rel-pos and attention-bias tables: zeros (SAM's
    and TinyViT's own init).
    """
    values: dict[tuple, np.ndarray] = {}

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear | nnx.Conv):
            shape = node.kernel.shape
            fan_in = int(np.prod(shape[:-1]))
            values[(*path, "kernel")] = uniform(shape, fan_in)
            if node.bias is not None:
                values[(*path, "bias")] = uniform(node.bias.shape, fan_in)
        elif isinstance(node, ConvTranspose2x2):
            _, out_ch, kh, kw = node.weight.shape
            values[(*path, "weight")] = uniform(node.weight.shape, out_ch * kh * kw)
            values[(*path, "bias")] = uniform(node.bias.shape, out_ch * kh * kw)
        elif isinstance(node, nnx.LayerNorm):
            values[(*path, "scale")] = np.ones(node.scale.shape, np.float32)
            values[(*path, "bias")] = np.zeros(node.bias.shape, np.float32)
        elif isinstance(node, LayerNorm2d):
            values[(*path, "weight")] = np.ones(node.weight.shape, np.float32)
            values[(*path, "bias")] = np.zeros(node.bias.shape, np.float32)
        elif isinstance(node, BatchNorm2d):  # statistics of a fresh torch BatchNorm2d
            for name, fill in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
                values[(*path, name)] = np.full(node.weight.shape, fill, np.float32)
        elif isinstance(node, Embedding):
            values[(*path, "weight")] = rng.standard_normal(node.weight.shape).astype(np.float32)
        elif isinstance(node, PositionEmbeddingRandom):
            matrix = node.positional_encoding_gaussian_matrix
            values[(*path, "positional_encoding_gaussian_matrix")] = rng.standard_normal(
                matrix.shape
            ).astype(np.float32)
    return values


class _OneKey:
    """Stands in for `nnx.Rngs` in `abstract_sam`: every stream and every draw give one key.

    The abstract model's values are never computed, so the key does not matter; what matters is
    that no RNG stream state is traced. flax's stream update probes the new count's `.sharding`,
    and under a trace JAX builds that AttributeError's message by walking every equation traced
    so far: quadratic in the number of parameters (jax-ml/jax#40041). An abstract ViT-B took
    1.8 s with `nnx.Rngs`, 0.4 s with this; tests/modeling/test_modeling.py checks that both
    give the same graph and shapes.
    """

    def __call__(self) -> jax.Array:
        return jax.random.key(0)

    def __getattr__(self, name: str) -> "_OneKey":  # rngs.params, rngs.default, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return self


def abstract_sam(cfg: SamConfig, then: Callable[[Sam], Any] | None = None) -> Any:
    """The model for `cfg` with shapes only (nothing allocated, nothing compiled).

    `then(model)`, when given, runs inside the same abstract build and its result is returned
    instead (e.g. a trainer's LoRA and partition, applied to the shapes).
    """
    return nnx.eval_shape(lambda: (then or (lambda m: m))(_construct(cfg, _OneKey())))


def build_sam(cfg: SamConfig, seed: int = 0) -> Sam:
    """Builds a SAM for `cfg` with PyTorch-default random initialisation.

    Parameters are drawn on the host with NumPy: building through jax.random would compile one
    small XLA program per parameter shape (0.2–1.5 s each on a 2-core CPU).

    Args:
        cfg: architecture.
        seed: initialisation seed.

    Returns:
        the model.
    """
    abstract_model = abstract_sam(cfg)
    values = _pytorch_default_init(abstract_model, np.random.default_rng(seed))
    graphdef, state = nnx.split(abstract_model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if path in values:
            value = values[path]
        elif path in (("pixel_mean",), ("pixel_std",)):
            value = np.asarray(getattr(cfg, path[0]), np.float32)
        else:  # pos_embed, rel-pos and task tables: zeros, as SAM and SUM initialise them
            value = np.zeros(var.shape, var.dtype)
        # device_put, not jnp.asarray: that stages an identity primitive, one small XLA
        # compile per distinct shape (~20 ms each on a 2-core CPU).
        flat.append((path, var.replace(jax.device_put(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


sam_model_registry = {
    "default": lambda seed=0: build_sam(SamConfig.vit_h(), seed),
    "vit_h": lambda seed=0: build_sam(SamConfig.vit_h(), seed),
    "vit_l": lambda seed=0: build_sam(SamConfig.vit_l(), seed),
    "vit_b": lambda seed=0: build_sam(SamConfig.vit_b(), seed),
}
