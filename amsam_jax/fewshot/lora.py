"""LoRA on the mask decoder's attention projections and the trainable/frozen partition.

docs/fewshot.md §3.

Trainable sets are Variable types: `nnx.LoRAParam` and `LowerParam` form the lower level (w),
`PromptParam` the upper level (a); everything left as `nnx.Param`/`Buffer` is frozen.
"""

import jax
import numpy as np
from flax import nnx

from amsam_jax.modeling.sam import Sam


class PromptParam(nnx.Param):
    """Upper-level parameter: the learnable prompt embedding (and the optional box residual)."""


class LowerParam(nnx.Param):
    """Lower-level parameter that is not a LoRA matrix (decoder tokens, upscaling, heads)."""


LOWER = nnx.Any(nnx.LoRAParam, LowerParam)


class LoRALinear(nnx.Module):
    """y = x W + b + scale * (x A) B with A (in, r), B (r, out); W and b keep their paths.

    The base kernel and bias are the same Variables as the wrapped `nnx.Linear`, so checkpoint
    paths (`...q_proj.kernel`) are unchanged and B = 0 reproduces the base layer bit for bit.
    """

    def __init__(self, base: nnx.Linear, rank: int, scale: float, rng: np.random.Generator):
        self.kernel = base.kernel
        self.bias = base.bias
        in_features, out_features = base.kernel.shape
        bound = 1.0 / np.sqrt(in_features)  # torch kaiming_uniform_(a=sqrt(5)) on A
        self.lora_a = nnx.LoRAParam(
            rng.uniform(-bound, bound, (in_features, rank)).astype(np.float32)
        )
        self.lora_b = nnx.LoRAParam(np.zeros((rank, out_features), np.float32))
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        # The same dot_general + bias as nnx.Linear, then the low-rank path.
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = jax.lax.dot_general(x, self.kernel[...], dims) + self.bias[...]
        return y + self.scale * ((x @ self.lora_a[...]) @ self.lora_b[...])


def decoder_attentions(sam: Sam) -> list[nnx.Module]:
    """The 7 attention modules of the two-way transformer (docs/fewshot.md §3.1)."""
    transformer = sam.mask_decoder.transformer
    attns = []
    for layer in transformer.layers:
        attns += [layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    return attns + [transformer.final_attn_token_to_image]


def apply_lora(sam: Sam, rank: int = 4, alpha: float | None = None, seed: int = 0) -> Sam:
    """Wraps q_proj and v_proj of every decoder attention in `LoRALinear` (in place).

    Args:
        sam: the model.
        rank: LoRA rank r.
        alpha: scale numerator; the low-rank path is multiplied by alpha / r (None: scale 1, the
            reference's setting).
        seed: seed of the A initialisation.

    Returns:
        the same model.
    """
    rng = np.random.default_rng(seed)
    scale = 1.0 if alpha is None else alpha / rank
    for attn in decoder_attentions(sam):
        attn.q_proj = LoRALinear(attn.q_proj, rank, scale, rng)
        attn.v_proj = LoRALinear(attn.v_proj, rank, scale, rng)
    return sam


def _retype(module: nnx.Module, cls: type[nnx.Param]) -> None:
    """Turns every plain `nnx.Param` under `module` into `cls` (values unchanged)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if type(value) is nnx.Param:
                    setattr(node, name, cls(value[...]))


def mark_trainable(sam: Sam, train_iou_head: bool = False) -> Sam:
    """Assigns the docs/fewshot.md §3.2 partition by Variable type (in place).

    Lower (w): LoRA matrices (already `nnx.LoRAParam`), `iou_token`, `mask_tokens`,
    `output_upscaling`, the hypernetwork MLPs and, only with `train_iou_head`, the IoU head (it
    receives no gradient from any loss, and optax would still decay it). Upper (a):
    `prompt_encoder.no_mask_embed`. Everything else stays frozen.
    """
    decoder = sam.mask_decoder
    lower = [
        decoder.iou_token,
        decoder.mask_tokens,
        decoder.output_upscaling,
        decoder.output_hypernetworks_mlps,
    ]
    if train_iou_head:
        lower.append(decoder.iou_prediction_head)
    for module in lower:
        _retype(module, LowerParam)
    _retype(sam.prompt_encoder.no_mask_embed, PromptParam)
    return sam


def count_params(state: nnx.State) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
