"""A training run's directory, shared by every trainer (few-shot, SUM, refiner).

    workdir/config.json      the resolved config; a different config on the same workdir is refused
    workdir/metrics.jsonl    one JSON object per line; on resume, lines after the checkpoint go
    workdir/ckpt/<kind>/     Orbax checkpoints (`training.state`): latest, best, final
    workdir/summary.json     written last: its presence means the run is complete

Every trainer drives its loop through a `Run`: it restores `latest`, replays deterministically
from there, saves `latest` at most every `checkpoint_every_s` seconds, stops with a one-line
`TrainError` on a non-finite loss, and finishes with `final` and the summary. `save_best` keeps
the newest `best` (a host copy) and writes it just before the next `latest` or `final` save, a
stop, a NaN report or `wait_for_saves`: a run whose validation score improves in many epochs
writes `best` once per save interval, not once per improvement. A kill loses at most the `best`
found since `latest`, and the resumed run's deterministic replay finds it again. With
`background_saves`, a save copies the state to the host and writes it in a worker thread, one save
at a time and in order, while training goes on; `wait_for_saves` (called before a stop, a NaN
report and the summary) makes every save requested so far complete.

In a run of several processes (docs/scale.md §4) every process makes the same calls: Orbax writes
each checkpoint from process 0 with all of them in its barriers. The choices a process could make
alone are agreed: a `latest` due by the clock is process 0's decision, a stop asked of any process
stops all of them at the same step. Saves are then written in the calling thread: Orbax's
barriers are collectives over the devices, which a worker thread would issue in another order
than the step's all-reduce on some process.
"""

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from amsam_jax.training import mesh as meshlib
from amsam_jax.training.state import (
    clone_state,
    host_copy,
    restore_state,
    save_state,
    saved_step,
)
from amsam_jax.utils.errors import AmsamError, first_line
from amsam_jax.utils.io import atomic_write, write_json

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class TrainError(AmsamError):
    """A run that cannot start or continue; one line naming the file or setting and the problem."""


class Interrupted(TrainError):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run at a step boundary, after saving `latest`."""

    exit_code = 130  # the shell's code for a process stopped by SIGINT


def log(msg: str) -> None:
    """Progress and notes go to stderr (stdout carries a command's result)."""
    print(msg, file=sys.stderr, flush=True)


def read_run_config(workdir: str | os.PathLike) -> dict:
    """The `config.json` of a run directory.

    Raises:
        TrainError: missing (not a training workdir) or unreadable.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise TrainError(Path(workdir), f"no {CONFIG_FILE} (not a training workdir)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(path, f"unreadable ({e})") from None
    if not isinstance(config, dict):
        raise TrainError(path, "not a config object")
    return config


class JsonlWriter:
    """The default metrics writer: one JSON object per line in `path`.

    Args:
        path: the file.
        keep_until_step: None starts a fresh file; an int keeps the records with
            `step <= keep_until_step` (a resumed run replays from its checkpoint). A truncated or
            unparsable line, which a kill in mid-write leaves, is dropped.
    """

    def __init__(self, path: str | os.PathLike, keep_until_step: int | None = None):
        self.path = Path(path)
        if keep_until_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [r for r in self.records() if r.get("step", 0) <= keep_until_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def records(self) -> list[dict]:
        """Every complete record, in order."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out


def config_difference(previous: dict, config: dict, prefix: str = "") -> str:
    """The first setting where two stored configs differ, as `key: old in the workdir, new now`."""
    for key in sorted(set(previous) | set(config)):
        name = prefix + key
        if key not in config:
            return f"{name}: {previous[key]!r} in the workdir, no such setting now"
        if key not in previous:
            return f"{name}: not in the workdir's config, {config[key]!r} now"
        old, new = previous[key], config[key]
        if isinstance(old, dict) and isinstance(new, dict):
            if old != new:
                return config_difference(old, new, name + ".")
        elif old != new:
            return f"{name}: {old!r} in the workdir, {new!r} now"
    return "none"


def added_defaults(previous: dict, config: dict, defaults: dict, prefix: str = "") -> str | None:
    """Whether `config` is `previous` plus settings introduced since, each at its default.

    A workdir's `config.json` predates settings added to the code later; such a setting at its
    default (the behaviour of the code that wrote the workdir) does not make the run different.

    Returns:
        the added settings (comma-separated) when that is the only difference, else None.
    """
    added = []
    for key in sorted(set(previous) | set(config)):
        name = prefix + key
        if key not in config:
            return None
        if key not in previous:
            if key not in defaults or defaults[key] != config[key]:
                return None
            added.append(name)
            continue
        old, new = previous[key], config[key]
        if isinstance(old, dict) and isinstance(new, dict):
            sub = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            inner = added_defaults(old, new, sub, name + ".")
            if inner is None:
                return None
            added += [inner] if inner else []
        elif old != new:
            return None
    return ", ".join(added)


class MemoryWriter:
    """The metrics writer of processes other than 0: records kept in memory, no file."""

    def __init__(self):
        self._records: list[dict] = []

    def write(self, record: Mapping[str, Any]) -> None:
        self._records.append(dict(record))

    def records(self) -> list[dict]:
        return list(self._records)


class Run:
    """One run directory. See the module docstring for the layout.

    Args:
        workdir: the directory (created).
        config: the resolved config as a JSON-able dict.
        defaults: the config class's defaults (same layout): a workdir whose `config.json` lacks
            settings added to the code since, with `config` holding them at these defaults, is
            the same run (its `config.json` is then rewritten in full).
        checkpoint_every_s: minimum seconds between two `latest` saves (0: every call).
        background_saves: write checkpoints in a worker thread (see the module docstring);
            False [default], and always in a run of several processes, writes them before
            `save` returns.

    Raises:
        TrainError: the workdir holds a run with a different (or unreadable) config, or cannot be
            written.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        config: dict,
        checkpoint_every_s: float = 30.0,
        background_saves: bool = False,
        defaults: dict | None = None,
    ):
        self.workdir = Path(workdir).absolute()
        self.checkpoint_every_s = checkpoint_every_s
        self._background = background_saves and meshlib.process_count() == 1
        self._saver: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._best: tuple[Any, dict] | None = None  # `save_best`'s, not written yet
        self._last_save = time.perf_counter()
        self._stop: str | None = None  # the signal that asked the run to stop
        if self.workdir.exists() and not self.workdir.is_dir():
            raise TrainError(self.workdir, "is a file, not a workdir; use another --workdir")
        self._created = not self.workdir.exists()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._before = {p.name for p in self.workdir.iterdir()}
        except OSError as e:
            raise TrainError(self.workdir, f"cannot create the workdir ({e.strerror})") from None
        config = json.loads(json.dumps(config))  # tuples as lists, as stored
        path = self.workdir / CONFIG_FILE
        previous = None
        if path.exists() and self.started():
            unusable = "it belongs to the run in this workdir: fix or remove the workdir"
            try:
                previous = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
                raise TrainError(path, f"unreadable ({first_line(e)}); {unusable}") from None
            if not isinstance(previous, dict):
                raise TrainError(path, f"not a config object; {unusable}")
            if previous != config:
                added = added_defaults(previous, config, json.loads(json.dumps(defaults or {})))
                if added is None:
                    what = config_difference(previous, config)
                    raise TrainError(
                        self.workdir,
                        f"holds a run with a different config ({what}); use another --workdir",
                    )
                log(f"{path}: settings added since this run began take their defaults: {added}")
        if previous != config:
            try:
                write_json(path, config)
            except OSError as e:
                raise TrainError(path, f"cannot write ({e.strerror})") from None

    def started(self) -> bool:
        """Whether this workdir holds checkpoints or a summary of an earlier run."""
        return (self.workdir / "ckpt").exists() or (self.workdir / SUMMARY_FILE).exists()

    @contextlib.contextmanager
    def setting_up(self) -> Iterator[None]:
        """Wraps a run's setup: a failed start leaves no trace of itself.

        When the setup fails (bad data, no weights, Ctrl-C) before it wrote anything, the
        `config.json` this run wrote is removed, and so is the workdir if this run created it.
        Work the setup already saved (pseudo-labels, a refiner) stays, with its config, for the
        next attempt.
        """
        try:
            yield
        except BaseException:
            entries = {p.name for p in self.workdir.iterdir()} if self.workdir.is_dir() else set()
            if entries - self._before == {CONFIG_FILE}:  # the setup itself wrote nothing
                (self.workdir / CONFIG_FILE).unlink(missing_ok=True)
                if self._created:
                    with contextlib.suppress(OSError):
                        self.workdir.rmdir()
            raise

    # ------------------------------------------------------------------ interrupts

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """While the block runs, Ctrl-C (SIGINT) and SIGTERM ask the run to stop.

        The loop calls `stop_if_requested` after each step, which saves `latest` and raises
        `Interrupted`: the run stops at a consistent point and resumes from it. A second Ctrl-C
        stops at once (KeyboardInterrupt); every save is atomic, so that is safe too.
        """
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def request(signum, frame):
            if self._stop is not None:
                raise KeyboardInterrupt
            self._stop = signal.Signals(signum).name
            log(f"{self._stop}: stopping after this step (Ctrl-C again to stop at once)")

        previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_if_requested(self, state: dict, meta: dict, where: str) -> None:
        """After a step: when a stop was asked for (of any process), saves `latest` and raises
        `Interrupted`."""
        if not meshlib.agree_any(self._stop is not None):
            return
        self._stop = self._stop or "another process was asked to stop"
        self.save("latest", state, meta)
        self.wait_for_saves()
        raise Interrupted(
            None,
            f"{self._stop}: stopped at {where}, saved {self.workdir / 'ckpt' / 'latest'}; run "
            "the same command again to resume",
        )

    # ------------------------------------------------------------------ resume

    def restore(self, template: dict, kind: str = "latest") -> tuple[dict, dict] | None:
        """(state, meta) of checkpoint `kind` in the structure of `template`, or None."""
        return restore_state(self.workdir, kind, template)

    def metrics(self, resumed_step: int | None) -> JsonlWriter:
        """The metrics writer: fresh for a new run, truncated to `resumed_step` on resume."""
        return JsonlWriter(self.workdir / METRICS_FILE, resumed_step)

    def summary(self) -> dict | None:
        """The summary of a complete run, or None."""
        path = self.workdir / SUMMARY_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged summary is rewritten by finishing the run again

    # ------------------------------------------------------------------ saving

    def save(self, kind: str, state: dict, meta: dict) -> None:
        """Writes checkpoint `kind` (see `training.state.save_state`): now, or with
        `background_saves` from a host copy taken now, after the saves requested before it.
        A `latest` or `final` save first writes the `best` that `save_best` holds."""
        if kind in ("latest", "final"):
            self._write_held_best()
        self._write(kind, state, meta)

    def save_best(self, state: dict, meta: dict) -> None:
        """Holds a copy of `state` taken now as checkpoint `best`, written with the next
        `latest` or `final` save, a stop, a NaN report or `wait_for_saves` (module docstring).

        The copy is a host one with `background_saves`, else a device one (a run of several
        processes saves its arrays as they are); every process makes the same calls, so each
        writes the held `best` at the same point.
        """
        held = host_copy(state) if self._background else clone_state(state)
        self._best = (held, dict(meta))

    def _write_held_best(self) -> None:
        if self._best is not None:
            (state, meta), self._best = self._best, None
            self._write("best", state, meta)

    def _write(self, kind: str, state: dict, meta: dict) -> None:
        if self._background:
            if self._saver is None:
                self._saver = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
            self._pending = [f for f in self._pending if not f.done() or f.exception()]
            job = self._saver.submit(save_state, self.workdir, kind, host_copy(state), dict(meta))
            self._pending.append(job)
        else:
            save_state(self.workdir, kind, state, meta)
        if kind == "latest":
            self._last_save = time.perf_counter()

    def wait_for_saves(self) -> None:
        """Returns when every save requested so far, and the `best` that `save_best` holds, is on
        disk (re-raises a failed save)."""
        self._write_held_best()
        pending, self._pending = self._pending, []
        for job in pending:
            job.result()

    def save_latest(self, state: dict, meta: dict, force: bool = False) -> bool:
        """Saves `latest` if `checkpoint_every_s` passed since the last save (or `force`).

        A killed run replays from `latest` deterministically, so the result does not depend on
        when it was saved; the interval only bounds the work a kill loses. With several processes
        the decision is process 0's.

        Returns:
            whether it saved.
        """
        due = force or time.perf_counter() - self._last_save >= self.checkpoint_every_s
        if meshlib.agree(due):
            self.save("latest", state, meta)
            return True
        return False

    def write_summary(self, summary: dict) -> None:
        """Writes the summary (after every pending save: its presence means the run is done)."""
        self.wait_for_saves()
        write_json(self.workdir / SUMMARY_FILE, summary)

    # ------------------------------------------------------------------ guards

    def check_finite(self, values: Mapping[str, float], where: str) -> None:
        """Stops the run when a value is NaN or infinite, saying what can be resumed.

        Args:
            values: the losses (and norms) of one step.
            where: e.g. "step 12" or "iteration 3".

        Raises:
            TrainError: naming the non-finite values and the checkpoint that really exists.
        """
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if not bad:
            return
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        self.wait_for_saves()  # with the `best` held by `save_best`
        step = saved_step(self.workdir, "latest")
        if step is None:
            there = "no checkpoint was saved yet"
        else:
            there = f"the last good checkpoint is {self.workdir / 'ckpt' / 'latest'} (step {step})"
        raise TrainError(
            None,
            f"non-finite loss at {where} ({shown}); the run stopped, {there}; lower the learning "
            "rate or check the data, in a new --workdir",
        )
