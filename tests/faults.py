"""Runs a CLI with a fault placed at an exact moment: `python tests/faults.py SPEC -- CLI ARGS`.

SPEC is `module:Qualified.name:N:when[:arg]`: the process SIGKILLs itself (or, with `when`
`sigint`, sends itself SIGINT and carries on) at the N-th call of that function, `before` or
`after` the call (`sigint` acts after it), counting only calls that have `arg` among their
positional arguments when given. With `when` `nan` the N-th call returns as a diverged step's: its
result is (state, metrics) and every metric comes back NaN. Examples:

    amsam_jax.training.run:Run.save:1:after:best      killed right after the first `best` save
    amsam_jax.training.run:Run.write_summary:1:before killed after `final`, before the summary
    orbax.checkpoint._src.path.atomicity:AtomicRenameTemporaryPath.finalize:2:before
                                                      killed mid-save: files written, not renamed
    amsam_jax.training.run:JsonlWriter.write:3:sigint Ctrl-C after the third metrics line
    amsam_jax.fewshot.trainer:run_iterations:2:nan    the second epoch's iterations diverge

The CLI is `amsam_jax.train` unless ARGS start with `-m MODULE`. The kill/resume tests use it to
kill at chosen moments instead of after a sleep, so each moment is hit every time.
"""

import functools
import importlib
import os
import signal
import sys

import numpy as np

from amsam_jax.training.supervisor import supervised


def install(spec: str) -> None:
    module_name, qualname, n, when, *arg = spec.split(":")
    n, match = int(n), arg[0] if arg else None
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        counted = match is None or match in args or match in kwargs.values()
        calls += counted
        hit = counted and calls == n
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        if hit and when == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        if hit and when == "nan":
            state, metrics = result
            return state, {k: np.full_like(v, np.nan, dtype=float) for k, v in metrics.items()}
        return result

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    specs, cli = argv[:sep], argv[sep + 1 :]
    module = "amsam_jax.train"
    if cli[:1] == ["-m"]:
        module, cli = cli[1], cli[2:]
    entry = importlib.import_module(module)  # imported first: the patches see its names
    for spec in specs:
        install(spec)
    if not hasattr(entry, "PEER_HINT"):
        return entry.main(cli)
    # As the CLI's own `__main__`: in a multi-process run, this command again as a supervised
    # child (training.supervisor), which installs the same faults.
    return supervised(lambda: entry.main(cli), entry.PEER_HINT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
