"""`python tests/scale/peer_abort.py ACTION`: one process of a test's run, under `supervised`.

ACTION `die:K`: the processes join the `jax.distributed` run of the environment, meet once, then
process K SIGKILLs itself and the others wait without any collective, so only JAX's heartbeat
abort can stop them (tests/scale/test_supervisor.py). `exit:N` returns N, `signal:S` sends
itself signal S, `echo` writes two lines to stderr and returns 0, `fatal:abort` and
`fatal:exit` write a copy of JAX's fatal message and then abort, or print the project's one line
and return 3 (a collective's error that came first), all without joining.
"""

import os
import signal
import sys
import time

from amsam_jax.training import mesh
from amsam_jax.training.supervisor import supervised
from amsam_jax.utils.cli import guarded

HINT = "run it again"
# What JAX writes when the coordination service reports a dead process (then SIGABRT).
FATAL = (
    b"F1203 client.h:80] Terminating process because the JAX distributed service detected fatal "
    b"errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
    b"heartbeats):\n1\n\nRPC: /xla.coordination.CoordinationService/PollForError\n"
    b"*** Check failure stack trace: ***\n    @     0x7f8b4f840634  absl::LogMessage::Flush()\n"
)
WAIT_S = 120


def body(action: str, arg: str) -> int:
    if action == "exit":
        return int(arg)
    if action == "signal":
        os.kill(os.getpid(), int(arg))
        return 0
    if action == "echo":
        print("first line\nsecond line", file=sys.stderr, flush=True)
        return 0
    if action == "fatal":
        print("before", file=sys.stderr, flush=True)
        os.write(2, FATAL)
        if arg == "abort":
            os.abort()
        print(f"error: process 0: {mesh.PEER_FAILED} (Gloo); {HINT}", file=sys.stderr, flush=True)
        return mesh.EXIT_PEER_FAILED
    mesh.initialize()
    mesh.sync("up")
    if mesh.process_index() == int(arg):
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    while time.monotonic() - start < WAIT_S:
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    action, _, arg = sys.argv[1].partition(":")
    run = mesh.stop_on_peer_failure(lambda: body(action, arg), HINT)
    sys.exit(supervised(lambda: guarded(run, HINT), HINT))
