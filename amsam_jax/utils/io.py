"""File helpers shared by every writer: SHA-256 and atomic writes (temporary file + rename)."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any] | bytes | str) -> None:
    """Writes `path` through a temporary file in the same folder, fsyncs, then renames it over.

    A reader never sees a half-written file, and a failure (also Ctrl-C) leaves the previous
    file, if any, and no temporary file behind.

    Args:
        path: the destination; its folder must exist.
        write: the content (bytes, or str written as UTF-8), or a function that writes it to the
            binary file object it is given.

    Raises:
        OSError: the folder is missing or not writable, the disk is full, ... (the caller turns
            it into a one-line error naming `path`).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, str):
                f.write(write.encode("utf-8"))
            elif isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; keep the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """Writes `data` as JSON (plus a newline) atomically; see `atomic_write`."""
    atomic_write(path, json.dumps(data, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary sibling folder that becomes `path` when the block succeeds.

    Leftover temporary siblings of earlier interrupted attempts (`.<name>.tmp-*`) are removed
    first. On any failure (also Ctrl-C) the temporary folder is removed and `path` is untouched.

    Args:
        path: the folder to create.
        overwrite: replace an existing `path` (it is removed only once the new one is complete).

    Raises:
        FileExistsError: `path` exists and `overwrite` is off.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    for stale in path.parent.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
