"""Official segment-anything state-dict keys -> amsam_jax NNX paths (data, not code)."""

import enum
import re

import numpy as np


class Transform(enum.Enum):
    """How a PyTorch tensor becomes the NNX array."""

    NONE = "none"  # copied as is (embeddings, buffers, LayerNorm, ConvTranspose2x2 in torch layout)
    LINEAR = "linear"  # (out, in) -> (in, out)
    CONV = "conv"  # (O, I, kh, kw) -> (kh, kw, I, O); grouped convs too (I = in / groups)
    DROP = "drop"  # read and deliberately unused (batch-norm counters, MobileSAM's classifier head)

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self is Transform.LINEAR:
            return np.ascontiguousarray(x.T)
        if self is Transform.CONV:
            return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
        return x


_ATTN = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
# TinyViT (MobileSAM, LiteMedSAM): every conv is a `Conv2d_BN` with children `c` and `bn`.
_TV_CONV = (
    r"image_encoder\.(layers\.\d+\.blocks\.\d+\.(?:conv[123]|local_conv)"
    r"|layers\.\d+\.downsample\.conv[123])"
)
_BN = r"(weight|bias|running_mean|running_var)"
_PROJ = r"(q_proj|k_proj|v_proj|out_proj)"

# Full-match regex on the torch key -> (NNX path template with \1.. backrefs, transform).
# Torch nn.Sequential indices that hold activations have no parameters, so the NNX lists skip
# them: mask_downscaling 0,1,3,4,6 -> 0..4 and output_upscaling 0,1,3 -> 0..2.
MAPPING: dict[str, tuple[str, Transform]] = {
    # image encoder
    r"image_encoder\.patch_embed\.proj\.weight": ("image_encoder.patch_embed.proj.kernel", Transform.CONV),
    r"image_encoder\.patch_embed\.proj\.bias": ("image_encoder.patch_embed.proj.bias", Transform.NONE),
    r"image_encoder\.pos_embed": ("image_encoder.pos_embed", Transform.NONE),
    r"image_encoder\.blocks\.(\d+)\.norm([12])\.weight": (r"image_encoder.blocks.\1.norm\2.scale", Transform.NONE),
    r"image_encoder\.blocks\.(\d+)\.norm([12])\.bias": (r"image_encoder.blocks.\1.norm\2.bias", Transform.NONE),
    r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.weight": (r"image_encoder.blocks.\1.attn.\2.kernel", Transform.LINEAR),
    r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.bias": (r"image_encoder.blocks.\1.attn.\2.bias", Transform.NONE),
    r"image_encoder\.blocks\.(\d+)\.attn\.(rel_pos_[hw])": (r"image_encoder.blocks.\1.attn.\2", Transform.NONE),
    r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.weight": (r"image_encoder.blocks.\1.mlp.\2.kernel", Transform.LINEAR),
    r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.bias": (r"image_encoder.blocks.\1.mlp.\2.bias", Transform.NONE),
    r"image_encoder\.neck\.([02])\.weight": (r"image_encoder.neck.\1.kernel", Transform.CONV),
    r"image_encoder\.neck\.([13])\.(weight|bias)": (r"image_encoder.neck.\1.\2", Transform.NONE),
    # TinyViT image encoder. Torch's patch_embed.seq has a GELU at index 1: seq.2 is entry 1.
    r"image_encoder\.patch_embed\.seq\.0\.c\.weight": ("image_encoder.patch_embed.seq.0.c.kernel", Transform.CONV),
    r"image_encoder\.patch_embed\.seq\.2\.c\.weight": ("image_encoder.patch_embed.seq.1.c.kernel", Transform.CONV),
    rf"image_encoder\.patch_embed\.seq\.0\.bn\.{_BN}": (r"image_encoder.patch_embed.seq.0.bn.\1", Transform.NONE),
    rf"image_encoder\.patch_embed\.seq\.2\.bn\.{_BN}": (r"image_encoder.patch_embed.seq.1.bn.\1", Transform.NONE),
    r"image_encoder\.patch_embed\.seq\.[02]\.bn\.num_batches_tracked": ("", Transform.DROP),
    rf"{_TV_CONV}\.c\.weight": (r"image_encoder.\1.c.kernel", Transform.CONV),
    rf"{_TV_CONV}\.bn\.{_BN}": (r"image_encoder.\1.bn.\2", Transform.NONE),
    rf"{_TV_CONV}\.bn\.num_batches_tracked": ("", Transform.DROP),
    r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.(attn|mlp)\.norm\.weight": (r"image_encoder.layers.\1.blocks.\2.\3.norm.scale", Transform.NONE),
    r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.(attn|mlp)\.norm\.bias": (r"image_encoder.layers.\1.blocks.\2.\3.norm.bias", Transform.NONE),
    r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight": (r"image_encoder.layers.\1.blocks.\2.\3.kernel", Transform.LINEAR),
    r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.bias": (r"image_encoder.layers.\1.blocks.\2.\3.bias", Transform.NONE),
    r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.attention_biases": (r"image_encoder.layers.\1.blocks.\2.attn.attention_biases", Transform.NONE),
    # MobileSAM keeps TinyViT's ImageNet classifier head; SAM never runs it.
    r"image_encoder\.(norm_head|head)\.(weight|bias)": ("", Transform.DROP),
    # prompt encoder
    r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix": ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", Transform.NONE),
    r"prompt_encoder\.point_embeddings\.([0-3])\.weight": (r"prompt_encoder.point_embeddings.\1.weight", Transform.NONE),
    r"prompt_encoder\.not_a_point_embed\.weight": ("prompt_encoder.not_a_point_embed.weight", Transform.NONE),
    r"prompt_encoder\.no_mask_embed\.weight": ("prompt_encoder.no_mask_embed.weight", Transform.NONE),
    # SUM checkpoints only (Kangningthu/SUM); official SAM has no task table and it is zero-filled.
    r"prompt_encoder\.task_prompt_embedding\.([0-9])\.weight": (r"prompt_encoder.task_prompt_embedding.\1.weight", Transform.NONE),
    r"prompt_encoder\.mask_downscaling\.0\.weight": ("prompt_encoder.mask_downscaling.0.kernel", Transform.CONV),
    r"prompt_encoder\.mask_downscaling\.0\.bias": ("prompt_encoder.mask_downscaling.0.bias", Transform.NONE),
    r"prompt_encoder\.mask_downscaling\.1\.(weight|bias)": (r"prompt_encoder.mask_downscaling.1.\1", Transform.NONE),
    r"prompt_encoder\.mask_downscaling\.3\.weight": ("prompt_encoder.mask_downscaling.2.kernel", Transform.CONV),
    r"prompt_encoder\.mask_downscaling\.3\.bias": ("prompt_encoder.mask_downscaling.2.bias", Transform.NONE),
    r"prompt_encoder\.mask_downscaling\.4\.(weight|bias)": (r"prompt_encoder.mask_downscaling.3.\1", Transform.NONE),
    r"prompt_encoder\.mask_downscaling\.6\.weight": ("prompt_encoder.mask_downscaling.4.kernel", Transform.CONV),
    r"prompt_encoder\.mask_downscaling\.6\.bias": ("prompt_encoder.mask_downscaling.4.bias", Transform.NONE),
    # mask decoder: two-way transformer
    rf"mask_decoder\.transformer\.layers\.(\d+)\.{_ATTN}\.{_PROJ}\.weight": (r"mask_decoder.transformer.layers.\1.\2.\3.kernel", Transform.LINEAR),
    rf"mask_decoder\.transformer\.layers\.(\d+)\.{_ATTN}\.{_PROJ}\.bias": (r"mask_decoder.transformer.layers.\1.\2.\3.bias", Transform.NONE),
    r"mask_decoder\.transformer\.layers\.(\d+)\.(norm[1-4])\.weight": (r"mask_decoder.transformer.layers.\1.\2.scale", Transform.NONE),
    r"mask_decoder\.transformer\.layers\.(\d+)\.(norm[1-4])\.bias": (r"mask_decoder.transformer.layers.\1.\2.bias", Transform.NONE),
    r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.weight": (r"mask_decoder.transformer.layers.\1.mlp.\2.kernel", Transform.LINEAR),
    r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.bias": (r"mask_decoder.transformer.layers.\1.mlp.\2.bias", Transform.NONE),
    rf"mask_decoder\.transformer\.final_attn_token_to_image\.{_PROJ}\.weight": (r"mask_decoder.transformer.final_attn_token_to_image.\1.kernel", Transform.LINEAR),
    rf"mask_decoder\.transformer\.final_attn_token_to_image\.{_PROJ}\.bias": (r"mask_decoder.transformer.final_attn_token_to_image.\1.bias", Transform.NONE),
    r"mask_decoder\.transformer\.norm_final_attn\.weight": ("mask_decoder.transformer.norm_final_attn.scale", Transform.NONE),
    r"mask_decoder\.transformer\.norm_final_attn\.bias": ("mask_decoder.transformer.norm_final_attn.bias", Transform.NONE),
    # mask decoder: tokens, upscaling, heads
    r"mask_decoder\.(iou_token|mask_tokens)\.weight": (r"mask_decoder.\1.weight", Transform.NONE),
    r"mask_decoder\.output_upscaling\.0\.(weight|bias)": (r"mask_decoder.output_upscaling.0.\1", Transform.NONE),
    r"mask_decoder\.output_upscaling\.1\.(weight|bias)": (r"mask_decoder.output_upscaling.1.\1", Transform.NONE),
    r"mask_decoder\.output_upscaling\.3\.(weight|bias)": (r"mask_decoder.output_upscaling.2.\1", Transform.NONE),
    r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)\.weight": (r"mask_decoder.output_hypernetworks_mlps.\1.layers.\2.kernel", Transform.LINEAR),
    r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)\.bias": (r"mask_decoder.output_hypernetworks_mlps.\1.layers.\2.bias", Transform.NONE),
    r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight": (r"mask_decoder.iou_prediction_head.layers.\1.kernel", Transform.LINEAR),
    r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.bias": (r"mask_decoder.iou_prediction_head.layers.\1.bias", Transform.NONE),
}  # fmt: skip

# The decoder heads whose shapes depend on the number of mask tokens (docs/fewshot.md §2.3).
HEAD_PREFIXES = (
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)

_COMPILED = [(re.compile(k), v) for k, v in MAPPING.items()]


def target_of(torch_key: str) -> tuple[str, Transform] | None:
    """The NNX path (dotted) and transform for a torch key, or None if no rule matches."""
    for pattern, (template, transform) in _COMPILED:
        m = pattern.fullmatch(torch_key)
        if m:
            return m.expand(template), transform
    return None


# NNX path prefix of the SUM task table (zero-filled when a checkpoint has none).
TASK_PREFIX = "prompt_encoder.task_prompt_embedding."


# ----------------------------------------------------------------------------------------------
# The inverse table (amsam_jax NNX path -> official key), derived from MAPPING, for the export


def _capture_groups(pattern: str) -> list[str]:
    """The sub-patterns of the capturing groups of `pattern`, in order (none may nest)."""
    groups, stack, i = [], [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":  # a character class: no groups inside
            i = pattern.index("]", i + 1) + 1
            continue
        if char == "(":
            capturing = not pattern.startswith("(?", i)
            if capturing and any(stack):
                raise ValueError(f"{pattern}: nested capturing groups cannot be inverted")
            stack.append(i + 1 if capturing else 0)
        elif char == ")":
            start = stack.pop()
            if start:
                groups.append(pattern[start:i])
        i += 1
    return groups


def _invert(pattern: str, template: str) -> tuple[re.Pattern, str]:
    """(regex on the NNX path, template of the torch key) of one MAPPING rule."""
    groups = _capture_groups(pattern)
    parts = re.split(r"\\(\d)", template)  # literal, group number, literal, ...
    order = [int(n) for n in parts[1::2]]  # original group numbers in template order
    regex = "".join(
        re.escape(p) if i % 2 == 0 else f"({groups[int(p) - 1]})" for i, p in enumerate(parts)
    )
    # The torch pattern with each group replaced by a backreference to its place in `regex`.
    torch_template, count, i = "", 0, 0
    while i < len(pattern):
        if pattern[i] == "(" and not pattern.startswith("(?", i):
            count += 1
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(pattern[j], 0) if pattern[j - 1] != "\\" else 0
                j += 1
            if count not in order:
                raise ValueError(f"{pattern}: group {count} is not in the template {template}")
            torch_template += f"\\{order.index(count) + 1}"
            i = j
        elif pattern.startswith("\\.", i):
            torch_template += "."
            i += 2
        elif pattern[i] in "\\[]()|*+?{}^$.":
            raise ValueError(f"{pattern}: {pattern[i]!r} outside a group cannot be inverted")
        else:
            torch_template += pattern[i]
            i += 1
    return re.compile(regex), torch_template


# NNX path regex -> (torch key template, transform); DROP rules have no NNX side.
INVERSE = [
    (*_invert(pattern, template), transform)
    for pattern, (template, transform) in MAPPING.items()
    if transform is not Transform.DROP
]


def source_of(nnx_path: str) -> tuple[str, Transform] | None:
    """The official torch key and the transform of the conversion for an NNX path (dotted).

    The inverse of `target_of`: `target_of(key)` gives back `(nnx_path, transform)` (checked).
    None when no rule produces the path.
    """
    for pattern, template, transform in INVERSE:
        m = pattern.fullmatch(nnx_path)
        if m:
            key = m.expand(template)
            if target_of(key) == (nnx_path, transform):
                return key, transform
    return None
