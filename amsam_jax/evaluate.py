"""CLI: `python -m amsam_jax.evaluate --workdir W [--checkpoint best|final|latest] [--data DIR]
[--split test]`.

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
    parser.add_argument("--workdir", required=True, help="training workdir (config.json, ckpt/)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "final", "latest"))
    parser.add_argument(
        "--data", help="folder-format data (default: the run's data.dir or the bundled set)"
    )
    parser.add_argument("--split", default="test", help="split folder under --data")
    parser.add_argument(
        "--overlays", type=int, default=None, help="overlays to write (default: all, 0: none)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from amsam_jax.boxes import BoxError
    from amsam_jax.checkpoint import CheckpointError
    from amsam_jax.data import DataError
    from amsam_jax.train import enable_compilation_cache
    from amsam_jax.trainer import TrainError

    enable_compilation_cache()
    try:
        result = evaluate_workdir(
            args.workdir, args.checkpoint, args.data, args.split, args.overlays, quiet=False
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
