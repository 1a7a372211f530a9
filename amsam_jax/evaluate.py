"""CLI: evaluate a few-shot run's checkpoint, or run the interactive click protocol.

    python -m amsam_jax.evaluate --workdir W [--checkpoint best|final|latest] [--data DIR]
        [--split test]
    python -m amsam_jax.evaluate --protocol interactive --clicks 9 (--sam SAM_DIR | --workdir
        SUM_RUN) --data DIR[:task] [--split test]
    python -m amsam_jax.evaluate --protocol box --sam litemedsam --data DIR [--boxes FILE]

Few-shot: Dice and IoU (×100, per image and mean, docs/fewshot.md §4.4; also per class for a
run with several classes, §4.5) with the run's SAM, preprocessing and box prompts; writes
`W/eval_<split>.json` and overlays `W/eval_<split>/`.
Interactive (docs/sum.md §8): mIoU and boundary IoU per click count. Box (zero-shot): SAM's
single mask for each image's box (the mask's tight box, or a box file). The result is printed
without the per-image rows. Bad inputs print one `error: ...` line and exit with status 2; flags,
folders and outputs are checked before a model is loaded, and a failed run writes nothing.
"""

import argparse
import json
import sys
from pathlib import Path

from amsam_jax.boxes.box_file import load_box_file
from amsam_jax.data.folder import list_samples
from amsam_jax.evaluation import EvaluateError
from amsam_jax.evaluation.box_prompt import evaluate_box_folder
from amsam_jax.evaluation.interactive import evaluate_interactive_folders
from amsam_jax.evaluation.workdir import evaluate_workdir
from amsam_jax.pretrained import load as load_pretrained
from amsam_jax.sum.config import SumConfig
from amsam_jax.sum.data import labelled_specs
from amsam_jax.training import mesh
from amsam_jax.training.run import read_run_config
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.image import max_image_pixels
from amsam_jax.utils.io import check_output_file
from amsam_jax.utils.runtime import enable_compilation_cache


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.evaluate",
        description="Evaluate a training run's checkpoint on a data split.",
    )
    parser.add_argument("--protocol", choices=("fewshot", "interactive", "box"), default="fewshot")
    parser.add_argument("--workdir", help="training workdir (config.json, ckpt/)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "final", "latest"))
    parser.add_argument(
        "--data",
        action="append",
        help="folder-format data (default: the run's data); interactive: DIR[:task], repeatable",
    )
    parser.add_argument("--split", default="test", help="split folder under --data")
    parser.add_argument(
        "--overlays", type=int, default=None, help="overlays to write (default: all, 0: none)"
    )
    inter = parser.add_argument_group("interactive and box protocols")
    inter.add_argument(
        "--sam",
        help="converted SAM directory or a pretrained name (default: a SUM run's model)",
    )
    inter.add_argument("--boxes", help="box protocol: a box file (default: the masks' tight boxes)")
    inter.add_argument("--clicks", type=int, default=9)
    inter.add_argument(
        "--task",
        action="append",
        help="none | 0..3 | matched (repeatable; default: 0 and matched)",
    )
    inter.add_argument("--max-images", type=int, default=None)
    inter.add_argument(
        "--output", help="result JSON (default: WORKDIR or . /eval_<protocol>_<split>.json)"
    )
    inter.add_argument("--plot", help="metric-vs-clicks PNG (default: next to the JSON)")
    mesh.add_mesh_flag(parser)  # the embedder's batch over local devices (docs/scale.md)
    return parser.parse_args(argv)


def run_interactive(args: argparse.Namespace) -> dict:
    """The interactive protocol with the CLI's defaults taken from a SUM workdir."""
    sam_dir = args.sam
    if sam_dir is None and args.workdir:
        sam_dir = Path(args.workdir) / "sam_finetuned"
        if not sam_dir.is_dir():
            raise EvaluateError(
                args.workdir, "no sam_finetuned/ (not a finished SUM run); use --sam"
            )
    if sam_dir is None:
        raise EvaluateError("--protocol interactive", "needs --sam SAM_DIR or --workdir SUM_RUN")
    data = args.data
    if not data:
        if not args.workdir:
            raise EvaluateError("--protocol interactive", "needs --data DIR[:task]")
        data = list(labelled_specs(SumConfig.from_dict(read_run_config(args.workdir))))
    output = args.output or Path(args.workdir or ".") / f"eval_interactive_{args.split}.json"
    tasks = tuple(args.task or ("0", "matched"))
    return evaluate_interactive_folders(
        sam_dir, data, args.split, args.clicks, tasks, args.max_images, output, args.plot
    )


def run_box(args: argparse.Namespace) -> dict:
    """Zero-shot box prompts of `--sam` on `--data/<split>`."""
    if not args.sam or not args.data:
        raise EvaluateError("--protocol box", "needs --sam SAM_DIR_OR_NAME and --data DIR")
    if len(args.data) > 1:
        raise EvaluateError("--data", "the box protocol takes one data folder")
    output = check_output_file(
        args.output or Path(args.workdir or ".") / f"eval_box_{args.split}.json"
    )
    list_samples(args.data[0], args.split)  # folders and box file before the model loads
    if args.boxes:
        load_box_file(args.boxes)
    return evaluate_box_folder(load_pretrained(args.sam), args.data[0], args.split, output,
                               args.boxes)  # fmt: skip


def run_fewshot(args: argparse.Namespace) -> dict:
    if not args.workdir:
        raise EvaluateError("--workdir", "is required for the few-shot protocol")
    data = args.data[0] if args.data else None
    result = evaluate_workdir(
        args.workdir, args.checkpoint, data, args.split, args.overlays, quiet=False
    )
    summary = {k: v for k, v in result.items() if k != "per_image"}
    summary["images"] = len(result["per_image"])
    return summary


def check_flags(args: argparse.Namespace) -> None:
    """The numeric flags and the pixel-limit setting, before anything is read."""
    for flag, value, low in (
        ("--clicks", args.clicks, 1),
        ("--max-images", args.max_images, 1),
        ("--overlays", args.overlays, 0),
    ):
        if value is not None and value < low:
            raise EvaluateError(flag, f"must be >= {low}, got {value}")
    max_image_pixels()  # an invalid AMSAM_MAX_IMAGE_PIXELS is named before any image is read


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    enable_compilation_cache()

    def body() -> int:
        check_flags(args)
        mesh.limit_devices(args.mesh_data)
        run = {"interactive": run_interactive, "box": run_box}.get(args.protocol, run_fewshot)
        summary = run(args)
        print(json.dumps(summary, indent=2))
        return 0

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
