"""File helpers shared by every writer: SHA-256, output checks and atomic writes.

Every write goes through a temporary sibling that is renamed into place, so a failure (also
Ctrl-C, a full disk, a read-only folder) leaves the previous file, if any, and no temporary one.
A write that fails raises `WriteError`: one line naming the output, and still an `OSError` (with
the cause's `errno` and `strerror`) for code that catches those.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from amsam_jax.utils.errors import AmsamError, first_line

Writer = Callable[[IO[bytes]], Any] | bytes | str


class WriteError(AmsamError, OSError):
    """An output that cannot be written; `str()` is one line, `<path>: <problem>`.

    Also an `OSError`: `errno` and `strerror` are those of the OS error that caused it (None when
    the problem was found before writing), so callers that catch `OSError` keep working.

    Args:
        path: the file or folder at fault.
        problem: what is wrong.
        cause: the OS error behind it, if any.
    """

    def __init__(self, path: str | os.PathLike, problem: str, cause: OSError | None = None):
        AmsamError.__init__(self, os.fspath(path), problem)
        if cause is not None:
            self.errno, self.strerror = cause.errno, cause.strerror

    def __str__(self) -> str:  # OSError's own form would be "[Errno N] ..."
        return self.problem if self.path is None else f"{self.path}: {self.problem}"

    def __reduce__(self):
        return type(self), (self.path, self.problem)


class OutputExistsError(WriteError, FileExistsError):
    """An output folder that exists when it must not (also a `FileExistsError`)."""


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


# ----------------------------------------------------------------------------------------------
# Checks before the work


def _blocking_ancestor(path: Path) -> str | None:
    """Why the folders above `path` cannot hold it (None: they can, or can be created)."""
    for parent in path.absolute().parents:
        if parent.is_dir():
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"folder {parent} is not writable"
            return None
        if parent.exists() or parent.is_symlink():
            return f"{parent} is not a folder"
    return None


def check_output_file(path: str | os.PathLike) -> Path:
    """Checks, without writing anything, that a file can be written at `path`.

    Args:
        path: the output file; missing folders above it may be created later.

    Returns:
        `Path(path)`.

    Raises:
        WriteError: `path` is a folder, a file stands where a folder above it should be, or
            the nearest existing folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(path, "is a directory; expected a file name")
    problem = _blocking_ancestor(path)
    if problem:
        raise WriteError(path, f"cannot write: {problem}")
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """Checks, without writing anything, that `path` is or can become a writable folder.

    Returns:
        `Path(path)`.

    Raises:
        WriteError: `path` is a file, a file stands where a folder above it should be, or the
            folder (or the nearest existing one above it) is not writable.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise WriteError(path, "exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise WriteError(path, "folder is not writable")
        return path
    problem = _blocking_ancestor(path)
    if problem:
        raise WriteError(path, f"cannot create: {problem}")
    return path


def _write_error(path: Path, error: OSError, verb: str = "write") -> WriteError:
    """The one-line `WriteError` for an OS error met while writing (`verb`) `path`."""
    if isinstance(error, WriteError):
        return error
    if verb == "write" and path.is_dir():
        return WriteError(path, "is a directory; expected a file name", error)
    blocked = _blocking_ancestor(path)
    if blocked is None and not path.absolute().parent.exists():
        blocked = f"no such folder {path.absolute().parent}"
    if blocked:
        return WriteError(path, f"cannot {verb}: {blocked}", error)
    return WriteError(path, f"cannot {verb} ({_reason(error)})", error)


def _reason(error: OSError) -> str:
    return error.strerror or first_line(error)


def _make_folders(path: Path) -> list[Path]:
    """Creates the folder `path` and the missing ones above it; returns those it created,
    outermost first."""
    path = path.absolute()
    missing = [p for p in (*reversed(path.parents), path) if not p.exists()]
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
    return missing


def ensure_folder(path: str | os.PathLike) -> Path:
    """Creates the folder `path` and the missing ones above it (`mkdir -p`).

    Returns:
        `Path(path)`.

    Raises:
        WriteError: a file is in the way, or a folder cannot be created.
    """
    path = Path(path)
    if path.is_dir():
        return path
    try:
        _make_folders(path)
    except OSError as e:
        raise _write_error(path, e, "create") from None
    return path


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


# ----------------------------------------------------------------------------------------------
# Atomic writes


def _write_temporary(path: Path, write: Writer) -> Path:
    """Writes `write` into a fresh temporary sibling of `path` (fsynced) and returns it; on any
    failure the temporary file is removed and the error propagates."""
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Writer) -> None:
    """Writes `path` through a temporary file in the same folder, fsyncs, then renames it over.

    A reader never sees a half-written file, and a failure (also Ctrl-C) leaves the previous
    file, if any, and no temporary file behind.

    Args:
        path: the destination; its folder must exist.
        write: the content (bytes, or str written as UTF-8), or a function that writes it to the
            binary file object it is given.

    Raises:
        WriteError: (an `OSError`) the folder is missing or not writable, `path` is a folder,
            the disk is full, ...: one line naming `path`. Errors other than `OSError` raised
            by `write` propagate unchanged.
    """
    path = Path(path)
    try:
        tmp = _write_temporary(path, write)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    except OSError as e:
        raise _write_error(path, e) from None


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """Writes `data` as JSON (plus a newline) atomically; see `atomic_write`."""
    atomic_write(path, json.dumps(data, indent=indent) + "\n")


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Removes the temporary siblings (`.<name>.*.tmp`) that a killed `atomic_write` of `path`
    left; for a file with one writer at a time (a second writer's temporary would go too)."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary sibling folder that becomes `path` when the block succeeds.

    Leftover temporary siblings of earlier interrupted attempts (`.<name>.tmp-*`) are removed
    first. On any failure (also Ctrl-C) the temporary folder is removed and `path` is untouched,
    and so are the folders above it that did not exist before.

    Args:
        path: the folder to create.
        overwrite: replace an existing `path` (it is removed only once the new one is complete).

    Raises:
        OutputExistsError: (a `FileExistsError`) `path` exists and `overwrite` is off.
        WriteError: (an `OSError`) the folder cannot be created or renamed into place.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "already exists")
    if path.parent.is_dir():
        for stale in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_outputs() as outputs:
        yield outputs.folder(path)


class AtomicOutputs:
    """Files and folders of one command, written together: all of them appear, or none.

    Each output is staged as a temporary sibling (`file` writes it at once, `folder` returns an
    empty temporary folder to fill); `commit` renames them all into place. A failure before or
    during the commit removes every temporary, puts back what the commit had replaced, and
    removes the folders it created above the outputs. Use through `atomic_outputs()`.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (destination, temporary)
        self._created: list[Path] = []  # folders made above the outputs
        self._backups: list[Path] = []  # holders of replaced outputs during the commit
        self.committed = False

    def _prepare(self, path: str | os.PathLike, is_folder: bool) -> Path:
        path = Path(path).absolute()
        if any(path == p for p, _ in self._staged):
            raise WriteError(path, "given twice as an output")
        if is_folder and path.exists() and not path.is_dir():
            raise WriteError(path, "exists and is not a folder")
        if not is_folder and path.is_dir():
            raise WriteError(path, "is a directory; expected a file name")
        try:
            self._created += _make_folders(path.parent)
        except OSError as e:
            raise _write_error(path, e, "create" if is_folder else "write") from None
        return path

    def file(self, path: str | os.PathLike, write: Writer) -> None:
        """Stages the file `path` with content `write` (as `atomic_write`'s)."""
        path = self._prepare(path, is_folder=False)
        try:
            self._staged.append((path, _write_temporary(path, write)))
        except OSError as e:
            raise _write_error(path, e) from None

    def folder(self, path: str | os.PathLike) -> Path:
        """Stages the folder `path` (replacing an existing one on commit); returns the empty
        temporary folder to fill."""
        path = self._prepare(path, is_folder=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            os.chmod(tmp, 0o777 & ~_umask())
        except OSError as e:
            raise _write_error(path, e, "create") from None
        self._staged.append((path, tmp))
        return tmp

    def commit(self) -> None:
        """Renames every staged output into place (a replaced one is removed afterwards)."""
        done: list[tuple[Path, Path | None]] = []  # (destination, where its old version went)
        try:
            for path, tmp in self._staged:
                old = None
                if path.exists() or path.is_symlink():
                    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                    self._backups.append(holder)
                    old = holder / path.name
                    os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except OSError:
                    if old is not None:
                        with contextlib.suppress(OSError):
                            os.replace(old, path)
                    raise
                done.append((path, old))
        except OSError as e:
            for done_path, old in reversed(done):  # put back what was there
                _remove(done_path)
                if old is not None:
                    with contextlib.suppress(OSError):
                        os.replace(old, done_path)
            raise _write_error(path, e) from None
        self.committed = True

    def discard(self) -> None:
        """Removes the temporaries, backups and (unless committed) the created folders."""
        for _, tmp in self._staged:
            _remove(tmp)
        for holder in self._backups:
            shutil.rmtree(holder, ignore_errors=True)
        if not self.committed:
            _remove_empty(self._created)
        self._staged, self._backups = [], []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_outputs() -> Iterator[AtomicOutputs]:
    """A block whose staged outputs appear together when it succeeds (see `AtomicOutputs`).

    Example:
        with atomic_outputs() as out:
            out.file("pred.npz", lambda f: np.savez_compressed(f, masks=masks))
            out.file("overlay.png", png_bytes)

    Raises:
        WriteError: an output cannot be written; nothing of the block is left.
    """
    outputs = AtomicOutputs()
    try:
        yield outputs
        outputs.commit()
    finally:
        outputs.discard()
