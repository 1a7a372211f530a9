"""CLI: build one of the paper's datasets from its manual download, export the folder format.

    python -m amsam_jax.datasets export tiktok --manual-dir ~/Downloads/tiktok --out data/tiktok

Needs the `data` extra (tensorflow-datasets); the builders are `amsam_jax.data.tfds`. Prints the
image/mask pairs found per split (the download as it is, not its README's count).
"""

import argparse
import sys

from amsam_jax.utils.cli import guarded

try:  # the `data` extra
    from amsam_jax.data.tfds import export_to_folder
except ModuleNotFoundError as missing:
    export_to_folder, MISSING = None, missing
else:
    MISSING = None

NAMES = ("human_seg", "isic2018", "tiktok")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.datasets",
        description="Build a tfds dataset from a manual download and write DIR/{split}/"
        "{images,masks} for the trainer's data.dir.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="build and export to the folder format")
    export.add_argument("builder", choices=NAMES)
    export.add_argument("--manual-dir", required=True, help="the manual download")
    export.add_argument("--out", required=True, help="output folder (new or empty)")
    export.add_argument("--data-dir", default=None, help="tfds data folder")
    export.add_argument("--config", default=None, help="builder config (default: the paper's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if MISSING is not None:
        print(
            f"error: {MISSING.name} is not installed; install the data extra: "
            'pip install -e ".[data]"',
            file=sys.stderr,
        )
        return 2

    def body() -> int:
        counts = export_to_folder(
            args.builder, args.manual_dir, args.out, data_dir=args.data_dir, config=args.config
        )
        splits = ", ".join(f"{split} {n}" for split, n in counts.items())
        print(f"{args.out}: {splits} ({sum(counts.values())} image/mask pairs found)")
        return 0

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
