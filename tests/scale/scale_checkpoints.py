"""Test helper shared by test_processes.py and devices_worker.py (run as a script)."""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def final_leaves(workdir: Path) -> list[np.ndarray]:
    """The leaves of a run's `final` checkpoint (LoRA, prompt, optimisers, step), by name."""
    mngr = ocp.CheckpointManager(workdir / "ckpt" / "final")
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        named = mngr.restore(mngr.latest_step(), args=args)["state"]
    finally:
        mngr.close()
    return [np.asarray(x) for x in jax.tree.leaves(dict(named))]
