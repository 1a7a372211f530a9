"""CLI: SAM pseudo-labels (SA-1B JSON + uint8 probabilities) for a folder of images.

    python -m amsam_jax.pseudo_labels --images DIR --out DIR (--sam CONVERTED_DIR | --random-tiny)
        [--points-per-side 32] [--points-per-batch 64] [--pred-iou-thresh 0.88] [...]

Resumable: an image whose `<stem>.json` exists is skipped. Several processes (docs/scale.md)
share the missing images; a rerun on any number of processes labels only what is missing. An
unreadable image prints one line naming it, writes nothing for it, and makes the exit status 1
(the other images are labelled). Settings, folders and the SAM are checked before the first
image; a run that fails (a full disk, Ctrl-C) keeps the images it finished and leaves no
half-written one, and a folder it created and wrote nothing into is removed.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

from amsam_jax.automatic_mask_generator import AmgSettingError, check_generator_settings
from amsam_jax.build_sam import SamConfig, build_sam
from amsam_jax.data.sa1b import prob_path
from amsam_jax.pretrained import PRETRAINED
from amsam_jax.pretrained import load as load_pretrained
from amsam_jax.sum.pseudo_labels import label_folder, pending_images
from amsam_jax.training import mesh
from amsam_jax.training.supervisor import supervised
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.errors import AmsamError
from amsam_jax.utils.image import list_images, max_image_pixels
from amsam_jax.utils.io import check_output_folder

# The generator settings given on the command line (`--points-per-side` is `points_per_side`).
AMG_SETTINGS = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
)


class UsageError(AmsamError):
    """A bad command-line setting; one line naming the flag."""


# The end of the one line a survivor prints when another process of the run dies.
PEER_HINT = "images already labelled are kept; run it again to label the rest"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.pseudo_labels",
        description="SAM automatic-mask-generator pseudo-labels in SA-1B format (+ probabilities).",
    )
    parser.add_argument("--images", required=True, help="folder of unlabelled images")
    parser.add_argument("--out", required=True, help="output folder for <stem>.json/.prob.npz")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--sam", help="converted SAM directory or a pretrained name: " + ", ".join(PRETRAINED)
    )
    model.add_argument(
        "--random-tiny", action="store_true", help="random tiny SAM, for smoke tests only"
    )
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--stability-score-offset", type=float, default=1.0)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--crop-nms-thresh", type=float, default=0.7)
    parser.add_argument("--crop-n-points-downscale-factor", type=int, default=1)
    parser.add_argument("--min-mask-region-area", type=int, default=0)
    parser.add_argument("--no-probabilities", action="store_true", help="skip the .prob.npz")
    mesh.add_mesh_flag(parser)
    return parser.parse_args(argv)


def generator_settings(args: argparse.Namespace) -> dict:
    """The generator settings of the command line, checked.

    Raises:
        UsageError: a setting out of range, named as its flag (`--points-per-side: ...`).
    """
    settings = {name: getattr(args, name) for name in AMG_SETTINGS}
    try:
        check_generator_settings(**settings)
    except AmgSettingError as e:
        raise UsageError("--" + e.setting.replace("_", "-"), e.problem) from None
    return settings


def _missing_folders(out: Path) -> list[Path]:
    """`out` and the folders above it that do not exist yet, outermost first."""
    return [p for p in (*reversed(out.absolute().parents), out.absolute()) if not p.exists()]


def _remove_unfinished(
    out: Path, before: set[str], created: list[Path], mine: set[str] | None = None
) -> None:
    """Removes what a failed run left that no resume would use: probability sidecars written
    for an image whose JSON (written last) is missing, and the folders it created, if empty.
    `mine`: the stems this process labels (several processes: never another's files)."""
    if out.is_dir():
        for path in out.glob("*.prob.npz"):
            json_path = path.with_name(path.name.removesuffix(".prob.npz") + ".json")
            if mine is not None and json_path.stem not in mine:
                continue
            if path.name not in before and prob_path(json_path) == path and not json_path.exists():
                with contextlib.suppress(OSError):
                    path.unlink()
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def run(args: argparse.Namespace) -> list[str]:
    """Checks everything cheap, loads the SAM, labels the folder; returns per-image errors."""
    settings = generator_settings(args)
    mesh.limit_devices(args.mesh_data)
    max_image_pixels()  # an invalid AMSAM_MAX_IMAGE_PIXELS is named once, not once per image
    list_images(args.images)  # a missing or empty folder: one line, exit 2
    out = check_output_folder(args.out)
    if args.random_tiny:
        print(
            "WARNING: --random-tiny uses a RANDOMLY INITIALISED tiny SAM; the pseudo-labels "
            "are meaningless (smoke test only).",
            file=sys.stderr,
        )
        model = build_sam(SamConfig.tiny())
    else:
        model = load_pretrained(args.sam)
    created = _missing_folders(out) if mesh.process_count() == 1 else []
    before = set(os.listdir(out)) if out.is_dir() else set()
    mine = None
    if mesh.process_count() > 1:  # the share `label_folder` gives this process
        mine = {p.stem for p in mesh.process_shard(pending_images(args.images, out))}
    points_per_side = settings.pop("points_per_side")
    try:
        errors = label_folder(
            model, args.images, out, points_per_side, not args.no_probabilities, **settings
        )
    except BaseException:  # AmsamError (a full disk, ...) or Ctrl-C: clean up, then report
        _remove_unfinished(out, before, created, mine)
        raise
    if errors:
        _remove_unfinished(out, before, created, mine)
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        mesh.initialize()
        errors = run(args)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1 if errors else 0

    return guarded(mesh.stop_on_peer_failure(body, PEER_HINT), PEER_HINT)


if __name__ == "__main__":
    sys.exit(supervised(main, PEER_HINT))
