"""A multi-process command under a parent that turns JAX's abort into one line (docs/scale.md §5).

When a process of a `jax.distributed` run dies, the coordination service notices its missing
heartbeats and JAX terminates every other process from a C++ thread: a `client.h` fatal log
line, a C++ stack trace, SIGABRT. Python cannot catch that, and nothing in JAX's Python API
replaces it (its missed-heartbeat callback cannot be given a Python function). A survivor that is
in a collective sees Gloo's reset connection first and stops with the project's one line
(`mesh.stop_on_peer_failure`); a survivor waiting at an Orbax barrier, or in a long compile,
meets the abort instead, and which comes first is a race.

`supervised(main)` therefore runs the command itself as a child process when it joins a
multi-process run (and `main()` directly otherwise). The parent forwards the child's stderr as
it comes, holding back JAX's fatal message and the stack trace after it; if the child then
aborts, the parent prints the one line and exits with status 3, as a survivor that saw the reset
connection does (if the child printed that line itself before the abort took it, only its line
is kept). Any other end is passed on: the child's exit status, or its death by a signal
(the parent kills itself with the same one). SIGINT, SIGTERM and SIGHUP sent to the parent are
forwarded to the child, which runs in its own process group so a terminal's Ctrl-C reaches it
once; on Linux the child dies with the parent.
"""

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from amsam_jax.training import mesh

ENV_CHILD = "AMSAM_SUPERVISED"  # set in the child: it runs the command itself
JAX_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_FORWARDED = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def needs_parent() -> bool:
    """Whether this command joins a multi-process run and is not already the supervised child.
    An invalid setting is not one: the command itself reports it in one line."""
    try:
        return os.environ.get(ENV_CHILD) != "1" and mesh.joins_processes()
    except mesh.MeshError:
        return False


def _child_setup() -> None:
    """Runs in the child before it starts: its own process group; on Linux, SIGKILL when the
    parent dies (PR_SET_PDEATHSIG)."""
    os.setpgid(0, 0)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _status(fatal: bytes) -> str:
    """The first sentence of the absl::Status in JAX's fatal message, on one line."""
    text = fatal.decode("utf-8", "replace").split("absl::Status:", 1)[-1]
    text = " ".join(text.split("\n\nRPC:", 1)[0].split())
    sentence = text.split(". ", 1)[0].rstrip(".")
    return sentence[:200] or "the JAX coordination service reported an error"


def run_child(argv: list[str], hint: str) -> int:
    """Runs `argv` (this command again) as the supervised child; returns its exit status."""
    env = {**os.environ, ENV_CHILD: "1"}
    child = subprocess.Popen(
        argv,
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=_child_setup,
    )
    previous = {s: signal.signal(s, lambda sig, _frame: child.send_signal(sig)) for s in _FORWARDED}
    fatal = b""
    try:
        assert child.stderr is not None
        while chunk := os.read(child.stderr.fileno(), 65536):  # PEP 475: retried after a signal
            if fatal:
                fatal += chunk
                continue
            at = chunk.find(JAX_FATAL)
            if at >= 0:  # forward up to the start of the fatal line, hold back the rest
                start = chunk.rfind(b"\n", 0, at) + 1
                _write(chunk[:start])
                fatal = chunk[start:]
            else:
                _write(chunk)
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if fatal:
        # The child may still have printed its own one line (a collective failed while JAX's
        # abort was under way) and exited: that line stays, JAX's message and trace go.
        own = [line for line in fatal.splitlines(keepends=True) if line.startswith(b"error:")]
        if code >= 0 and own:
            _write(b"".join(own))
            return code
        index = os.environ.get(mesh.ENV_PROCESS_ID) or os.environ.get("SLURM_PROCID") or "?"
        reason = f"JAX coordination service: {_status(fatal)}"
        print(mesh.peer_failure_line(index, reason, hint), file=sys.stderr, flush=True)
        return code if code > 0 else mesh.EXIT_PEER_FAILED
    if code < 0:  # the child died by a signal: so does the parent
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP keep their default
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # the shell's status for it, if the signal did not end this process
    return code


def _write(data: bytes) -> None:
    """The child's bytes to this process's stderr, all of them (a pipe may take part of a
    write); a closed stderr drops them, and the child is still read to its end."""
    with contextlib.suppress(OSError):
        sys.stderr.flush()
        view = memoryview(data)
        while view:
            view = view[os.write(sys.stderr.fileno(), view) :]


def supervised(main: Callable[[], int], hint: str) -> int:
    """`main()`, or in a multi-process run this very command as a supervised child (see the
    module docstring). `hint` ends the one line, as in `mesh.stop_on_peer_failure`."""
    if not needs_parent():
        return main()
    return run_child([sys.executable, *sys.orig_argv[1:]], hint)
