"""CLI: build a dataset from its manual download and export it in the folder format."""

import argparse
import sys

from amsam_jax.data import DataError
from amsam_jax.datasets import BUILDERS, export_to_folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.datasets",
        description="Build a tfds dataset from a manual download and write DIR/{split}/"
        "{images,masks} for the trainer's data.dir.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="build and export to the folder format")
    export.add_argument("builder", choices=sorted(BUILDERS))
    export.add_argument("--manual-dir", required=True, help="the manual download")
    export.add_argument("--out", required=True, help="output folder (new or empty)")
    export.add_argument("--data-dir", default=None, help="tfds data folder")
    export.add_argument("--config", default=None, help="builder config (default: the paper's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        counts = export_to_folder(
            args.builder, args.manual_dir, args.out, data_dir=args.data_dir, config=args.config
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
