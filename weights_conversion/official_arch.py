"""The official constructor arguments of a SAM for a `SamConfig` (segment_anything's
build_sam.py), written once for every place that builds the official PyTorch model: the golden
fixtures (make_golden.py) and the ONNX export (export_onnx.py). Torch-free: the classes come in.
"""

from functools import partial

from amsam_jax.build_sam import SamConfig


def vit_encoder(cfg: SamConfig, image_encoder_vit: type, layer_norm: type):
    """segment_anything's `ImageEncoderViT` for `cfg` (layer_norm: `torch.nn.LayerNorm`)."""
    return image_encoder_vit(
        depth=cfg.encoder_depth,
        embed_dim=cfg.encoder_embed_dim,
        img_size=cfg.image_size,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(layer_norm, eps=1e-6),
        num_heads=cfg.encoder_num_heads,
        patch_size=cfg.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=cfg.encoder_global_attn_indexes,
        window_size=cfg.window_size,
        out_chans=cfg.prompt_embed_dim,
    )


def prompt_side(cfg: SamConfig, prompt_encoder: type, mask_decoder: type, transformer: type):
    """`prompt_encoder=` and `mask_decoder=` for `cfg`, from segment_anything-style classes."""
    grid = cfg.grid_size
    return {
        "prompt_encoder": prompt_encoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        "mask_decoder": mask_decoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=transformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
    }
