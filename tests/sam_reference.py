"""The official segment-anything model with random weights, and the same weights in amsam_jax.

Test-only: imports torch and segment_anything (the `test` extra).
"""

import numpy as np
import torch
from flax import nnx
from segment_anything.modeling.common import LayerNorm2d

from amsam_jax.build_sam import SamConfig, abstract_sam
from amsam_jax.conversion.convert_sam import convert_state_dict
from weights_conversion.make_golden import build_official


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
