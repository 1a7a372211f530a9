"""CLI: `python -m amsam_jax.train [--config FILE[:ARG]] [--workdir DIR] [--set key=value]...`.

With no arguments it runs the embedded default, the `am_sam` recipe on the bundled synthetic
few-shot dataset. Re-running the same command on the same workdir resumes from `latest`.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from amsam_jax.configs import TrainConfig, apply_overrides


class ConfigError(Exception):
    """A config file or override that cannot be used; one line."""


def load_config(spec: str | None):
    """Loads `get_config(arg)` from `path[:arg]`; None gives the embedded default recipe."""
    if spec is None:
        from amsam_jax.recipes import embedded_default

        return embedded_default()
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such config file")
    module_spec = importlib.util.spec_from_file_location(f"amsam_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
    from amsam_jax.sum_config import SumConfig

    if not isinstance(cfg, TrainConfig | SumConfig):
        raise ConfigError(
            f"{path}: get_config() returned {type(cfg).__name__}, not TrainConfig or SumConfig"
        )
    return cfg


def enable_compilation_cache() -> None:
    """Reuse XLA compilations across runs (a decoder step compiles in ~1 min on 2 CPU cores)."""
    import os

    import jax

    default = Path.home() / ".cache" / "amsam_jax" / "xla"
    jax.config.update("jax_compilation_cache_dir", os.environ.get("AMSAM_XLA_CACHE", str(default)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.train",
        description="SAM fine-tuning: few-shot (AM-SAM / BLO-SAM / SAMed) and SUM recipes.",
    )
    parser.add_argument("--config", help="train/configs/<recipe>.py[:arg] (default: am_sam)")
    parser.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.epochs=10"
    )
    args = parser.parse_args(argv)
    enable_compilation_cache()

    from amsam_jax.checkpoint import CheckpointError
    from amsam_jax.data import DataError
    from amsam_jax.trainer import TrainError, train

    try:
        cfg = apply_overrides(load_config(args.config), args.set)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or f"runs/{cfg.name}")
    from amsam_jax.sum_config import SumConfig

    try:
        if isinstance(cfg, SumConfig):
            from amsam_jax.sum_trainer import train_sum

            summary = train_sum(cfg, workdir)
        else:
            summary = train(cfg, workdir)
    except (TrainError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
