"""CLI: train SUM's mask-refinement module, or write its maps for a pseudo-labelled folder.

    python -m amsam_jax.refine train --config train/configs/sum.py --workdir runs/refiner
    python -m amsam_jax.refine apply --refiner runs/refiner --images DIR [--labels DIR] --out DIR

See docs/sum.md §3.2. `train` resumes a killed run in the same workdir.
"""

import argparse
import json
import sys
from pathlib import Path

from amsam_jax.sum.config import SumConfig
from amsam_jax.sum.recipes import sum_recipe
from amsam_jax.sum.refiner import REFINER_SAM, refine_folder, train_refiner
from amsam_jax.training.config import apply_overrides, load_config
from amsam_jax.training.embedder import Embedder
from amsam_jax.training.sam import resolve_sam
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.runtime import enable_compilation_cache


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m amsam_jax.refine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a refiner on the config's labelled data")
    tr.add_argument("--config", help="train/configs/sum.py[:smoke] (default: sum)")
    tr.add_argument("--workdir", required=True)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap = sub.add_parser("apply", help="write <stem>.refined.npz for a pseudo-labelled folder")
    ap.add_argument("--refiner", required=True, help="a refiner workdir (or its refiner_sam/)")
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", help="SA-1B-format json folder (default: next to the images)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-masks", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    enable_compilation_cache()

    def body() -> int:
        if args.command == "train":
            base = load_config(args.config, (SumConfig,)) if args.config else sum_recipe()
            cfg = apply_overrides(base, args.set).validate()
            sam, sam_cfg, key, weights = resolve_sam(cfg)
            embedder = Embedder(sam.image_encoder, key)
            out = train_refiner(cfg, Path(args.workdir), sam, sam_cfg, embedder, weights)
            print(json.dumps({"refiner_sam": str(out)}))
        else:
            ref = Path(args.refiner)
            ref = ref / REFINER_SAM if (ref / REFINER_SAM).is_dir() else ref
            n = refine_folder(ref, args.images, args.labels, args.out, args.batch_masks)
            print(json.dumps({"written": n, "out": args.out}))
        return 0

    return guarded(body, "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
