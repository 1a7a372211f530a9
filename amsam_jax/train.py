"""CLI: `python -m amsam_jax.train [--config FILE[:ARG]] [--workdir DIR] [--set key=value]...`.

With no arguments it runs the embedded default, the `am_sam` recipe on the bundled synthetic
few-shot dataset. Re-running the same command on the same workdir resumes from `latest`.
The config's type picks the trainer: `FewShotConfig` (AM-SAM, BLO-SAM, SAMed) or `SumConfig`.
Several processes join from the environment (`training.mesh.initialize`, docs/scale.md); when one
of them dies the others stop with one line within the heartbeat timeout, and the same command
resumes from the last checkpoint on any number of processes.
"""

import argparse
import json
import sys
from pathlib import Path

from amsam_jax.fewshot.config import FewShotConfig
from amsam_jax.fewshot.recipes import embedded_default
from amsam_jax.fewshot.trainer import train
from amsam_jax.sum.config import SumConfig
from amsam_jax.sum.trainer import train_sum
from amsam_jax.training import mesh
from amsam_jax.training.config import apply_overrides, load_config
from amsam_jax.training.supervisor import supervised
from amsam_jax.utils.cli import guarded
from amsam_jax.utils.runtime import enable_compilation_cache

# The end of the one line a survivor prints when another process of the run dies.
PEER_HINT = "run the same command again to resume from the last checkpoint"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m amsam_jax.train",
        description="SAM fine-tuning: few-shot (AM-SAM / BLO-SAM / SAMed) and SUM recipes.",
    )
    parser.add_argument("--config", help="train/configs/<recipe>.py[:arg] (default: am_sam)")
    parser.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.epochs=10"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    enable_compilation_cache()

    def body() -> int:
        mesh.initialize()
        base = (
            load_config(args.config, (FewShotConfig, SumConfig))
            if args.config
            else embedded_default()
        )
        cfg = apply_overrides(base, args.set)
        workdir = Path(args.workdir or f"runs/{cfg.name}")
        summary = train_sum(cfg, workdir) if isinstance(cfg, SumConfig) else train(cfg, workdir)
        if mesh.is_main_process():
            print(json.dumps(summary, indent=2))
        return 0

    return guarded(mesh.stop_on_peer_failure(body, PEER_HINT), PEER_HINT)


if __name__ == "__main__":
    sys.exit(supervised(main, PEER_HINT))
