"""`training.supervisor`: a multi-process command's survivor stops with one line and status 3
when JAX's heartbeat abort, not a collective, meets the dead peer (docs/scale.md §5).

The processes of tests/scale/peer_abort.py meet once, one SIGKILLs itself and the others wait
without a collective: the abort is certain, not a race. The same run unsupervised (the child's
environment variable set from the start) aborts with JAX's C++ stack trace, so the test can fail.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amsam_jax.training.mesh import EXIT_PEER_FAILED, PEER_FAILED
from amsam_jax.training.supervisor import ENV_CHILD

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "tests" / "scale" / "peer_abort.py")
HEARTBEAT_S = 4
TIMEOUT_S = 100  # well below the script's 120 s wait: a survivor that was not stopped fails


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(action: str, extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": address,
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
               "AMSAM_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S), **(extra_env or {})}  # fmt: skip
        argv = [sys.executable, SCRIPT, action]
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    out = [(p, *p.communicate(timeout=TIMEOUT_S)) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, o, e in out]


def one_line(stderr: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and PEER_FAILED in errors[0] and errors[0].endswith("run it again")
    assert "client.h" not in stderr and "stack trace" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_survivor_of_the_heartbeat_abort_prints_one_line_and_exits_3(victim):
    start = time.monotonic()
    out = two_processes(f"die:{victim}")
    assert out[victim].returncode == -signal.SIGKILL, out[victim].stderr[-2000:]
    survivor = out[1 - victim]
    assert survivor.returncode == EXIT_PEER_FAILED, survivor.stderr[-3000:]
    one_line(survivor.stderr)
    assert time.monotonic() - start < TIMEOUT_S


def test_unsupervised_survivor_meets_the_c_plus_plus_abort():
    out = two_processes("die:1", {ENV_CHILD: "1"})
    assert out[0].returncode == -signal.SIGABRT
    assert "client.h" in out[0].stderr and "error:" not in out[0].stderr


def supervised_alone(action: str) -> subprocess.CompletedProcess:
    """One process whose environment names a coordinator: supervised, but never joining."""
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "0"}  # fmt: skip
    return subprocess.run([sys.executable, SCRIPT, action], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip


def test_jax_fatal_message_gives_way_to_one_line_whether_the_child_aborts_or_exits():
    aborted = supervised_alone("fatal:abort")
    assert aborted.returncode == EXIT_PEER_FAILED
    assert aborted.stderr.startswith("before\n") and aborted.stderr.count("\n") == 2
    one_line(aborted.stderr)
    assert "stopped sending heartbeats): 1" in aborted.stderr  # the status, on the one line
    exited = supervised_alone("fatal:exit")
    assert exited.returncode == EXIT_PEER_FAILED and exited.stderr.startswith("before\n")
    one_line(exited.stderr)
    assert "(Gloo)" in exited.stderr  # the child's own line, not the parent's


def test_the_child_exit_status_signal_and_stderr_pass_through():
    assert supervised_alone("exit:7").returncode == 7
    env = {**os.environ, "AMSAM_DISTRIBUTED": "bogus"}  # reported by the command, unsupervised
    bad = subprocess.run([sys.executable, SCRIPT, "die:1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.startswith("error: AMSAM_DISTRIBUTED")
    assert "Traceback" not in bad.stderr
    assert supervised_alone(f"signal:{int(signal.SIGTERM)}").returncode == -signal.SIGTERM
    echoed = supervised_alone("echo")
    assert echoed.returncode == 0 and echoed.stderr == "first line\nsecond line\n"
