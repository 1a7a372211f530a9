"""CLI: `python -m amsam_jax.evaluate --workdir W [--checkpoint best|final|latest] [--data DIR]
[--split test]` (few-shot runs), or `python -m amsam_jax.evaluate --protocol interactive
--clicks 9 (--sam SAM_DIR | --workdir SUM_RUN) --data DIR[:task] [--split test]` (SUM spec §8).

Evaluates a training run's checkpoint (spec §4.4 Dice and IoU, ×100, per image and mean) with the
run's SAM, preprocessing and box prompts, writes `W/eval_<split>.json` and the overlays
`W/eval_<split>/<stem>.png` (image | ground truth | prediction), and prints the result without the
per-image rows (they are in the JSON file). Bad inputs print one `error: ...` line, exit 2.
"""

import argparse
import json
import sys
import types

from amsam_jax.run_evaluation import EvaluateError, evaluate_workdir

__all__ = ["evaluate_workdir", "main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.evaluate",
        description="Evaluate a training run's checkpoint on a data split.",
    )
    parser.add_argument("--protocol", choices=("fewshot", "interactive"), default="fewshot")
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
    inter = parser.add_argument_group("interactive protocol")
    inter.add_argument("--sam", help="converted SAM directory (default: a SUM run's model)")
    inter.add_argument("--clicks", type=int, default=9)
    inter.add_argument(
        "--task",
        action="append",
        help="none | 0..3 | matched (repeatable; default: 0 and matched)",
    )
    inter.add_argument("--max-images", type=int, default=None)
    inter.add_argument(
        "--output", help="result JSON (default: WORKDIR or . /eval_interactive_<split>.json)"
    )
    inter.add_argument("--plot", help="metric-vs-clicks PNG (default: next to the JSON)")
    return parser.parse_args(argv)


def run_interactive(args: argparse.Namespace) -> dict:
    """The interactive protocol; returns the result without the per-mask rows."""
    from pathlib import Path

    from amsam_jax.checkpoint import load_sam
    from amsam_jax.interactive import plot_metric_vs_clicks
    from amsam_jax.interactive_eval import evaluate_interactive, labelled_eval_masks

    sam_dir = args.sam
    if sam_dir is None and args.workdir:
        sam_dir = str(Path(args.workdir) / "sam_finetuned")
        if not Path(sam_dir).is_dir():
            raise EvaluateError(
                f"{args.workdir}: no sam_finetuned/ (not a finished SUM run); use --sam"
            )
    if sam_dir is None:
        raise EvaluateError("--protocol interactive needs --sam SAM_DIR or --workdir SUM_RUN")
    if not args.data:
        if not args.workdir:
            raise EvaluateError("--protocol interactive needs --data DIR[:task]")
        import json as _json

        from amsam_jax.sum_config import SumConfig
        from amsam_jax.sum_trainer import labelled_specs

        cfg = SumConfig.from_dict(_json.loads((Path(args.workdir) / "config.json").read_text()))
        args.data = list(labelled_specs(cfg))
    if args.clicks < 1:
        raise EvaluateError(f"--clicks must be >= 1, got {args.clicks}")
    tasks = tuple(args.task or ("0", "matched"))
    for t in tasks:
        if t not in ("none", "matched", "0", "1", "2", "3"):
            raise EvaluateError(f"--task {t!r}: expected none, 0, 1, 2, 3 or matched")
    for spec in args.data:
        folder = spec.rpartition(":")[0] if ":" in spec else spec
        if not (Path(folder or spec) / args.split).is_dir():
            raise EvaluateError(f"{Path(folder or spec) / args.split}: no such split folder")
    images = labelled_eval_masks(args.data, args.split, args.max_images)
    if not images:
        raise EvaluateError(f"no images with masks in {', '.join(args.data)} ({args.split})")
    result = evaluate_interactive(load_sam(sam_dir), images, args.clicks, tasks)
    result.update({"sam": str(sam_dir), "data": list(args.data), "split": args.split})
    out = Path(args.output or Path(args.workdir or ".") / f"eval_interactive_{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    plot = Path(args.plot or out.with_suffix(".png"))
    plot_metric_vs_clicks(result[f"task_{tasks[0]}"], plot)
    summary = {k: v for k, v in result.items() if k != "per_mask"}
    summary.update({"output": str(out), "plot": str(plot)})
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from amsam_jax.boxes import BoxError
    from amsam_jax.checkpoint import CheckpointError
    from amsam_jax.data import DataError
    from amsam_jax.train import enable_compilation_cache
    from amsam_jax.trainer import TrainError

    enable_compilation_cache()
    if args.protocol == "interactive":
        try:
            summary = run_interactive(args)
        except (EvaluateError, DataError, CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        return 0
    if not args.workdir:
        print("error: --workdir is required for the few-shot protocol", file=sys.stderr)
        return 2
    data = args.data[0] if args.data else None
    try:
        result = evaluate_workdir(
            args.workdir, args.checkpoint, data, args.split, args.overlays, quiet=False
        )
    except (EvaluateError, TrainError, DataError, CheckpointError, BoxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k != "per_image"}
    summary["images"] = len(result["per_image"])
    print(json.dumps(summary, indent=2))
    return 0


class _CallableModule(types.ModuleType):
    """`amsam_jax.evaluate` is both this CLI module and the pure `evaluation.evaluate` function.

    Importing the submodule rebinds the package attribute `amsam_jax.evaluate` to the module;
    making the module callable keeps `amsam_jax.evaluate(...)` working either way.
    """

    def __call__(self, *args, **kwargs):
        from amsam_jax.evaluation import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    sys.exit(main())
