"""The one way every command-line entry point reports failure: one `error:` line, an exit code.

`guarded(body)` runs a command's body and turns what a user can act on into a single stderr line
instead of a traceback: an `AmsamError` (exit 2, or its `exit_code`), an `OSError` from the
file system (exit 2, naming the file), and Ctrl-C (exit 130). Anything else is a bug and keeps
its traceback.
"""

import sys
from collections.abc import Callable

from amsam_jax.utils.errors import AmsamError

INTERRUPTED_EXIT = 130  # the shell's code for a process stopped by SIGINT


def guarded(body: Callable[[], int], interrupted: str = "nothing half-written was kept") -> int:
    """Runs `body()` and returns its exit code, or reports its failure in one line.

    Args:
        body: the command; returns its exit code.
        interrupted: what a Ctrl-C left, said after "interrupted (Ctrl-C); ".
    """
    try:
        return body()
    except AmsamError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\nerror: interrupted (Ctrl-C); {interrupted}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
