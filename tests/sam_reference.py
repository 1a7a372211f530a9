"""The official segment-anything model with random weights, and the same weights in amsam_jax.

Test-only: imports torch and segment_anything (the `test` extra).
"""

from functools import partial

import numpy as np
import torch
from flax import nnx
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d

from amsam_jax.build_sam import SamConfig, abstract_sam
from weights_conversion.convert_sam import convert_state_dict


def build_official(cfg: SamConfig) -> Sam:
    """segment_anything's Sam for `cfg` (same constructor arguments as its build_sam.py)."""
    grid = cfg.grid_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.image_size,
            mlp_ratio=cfg.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    ).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives every parameter a non-trivial random value.

    SAM's own init leaves pos_embed, rel-pos tables and LayerNorms at constants, which would hide
    mapping errors; here every tensor is random at a scale that keeps activations O(1).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(mean + std * torch.randn(p.shape, generator=g))

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm | LayerNorm2d):
            randn(module.weight, 0.1, mean=1.0)
            randn(module.bias, 0.1)
        elif isinstance(module, torch.nn.ConvTranspose2d):
            randn(module.weight, module.in_channels**-0.5)
            randn(module.bias, 0.05)
        elif isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            randn(module.weight, module.weight[0].numel() ** -0.5)
            if module.bias is not None:
                randn(module.bias, 0.05)
        elif isinstance(module, torch.nn.Embedding):
            randn(module.weight, 1.0)
    for name, p in model.named_parameters():
        if "rel_pos" in name:
            randn(p, 0.2)
        elif name.endswith("pos_embed"):
            randn(p, 0.1)
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def to_jax(sd: dict[str, np.ndarray], cfg: SamConfig, **kw):
    """Converts a numpy state dict into an amsam_jax Sam through the real converter."""
    nested, _ = convert_state_dict(sd, cfg, **kw)
    graphdef, state = nnx.split(abstract_sam(cfg))
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def official_pair(cfg: SamConfig, seed: int = 0):
    """(official torch Sam, amsam_jax Sam) with identical random weights."""
    torch.manual_seed(seed)
    ref = randomize_(build_official(cfg), seed)
    return ref, to_jax(state_dict_numpy(ref), cfg)
