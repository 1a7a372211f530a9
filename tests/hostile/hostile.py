"""Shared checks of the hostile-input tests: a CLI fails with one `error:` line and leaves nothing.

Each case calls a CLI's `main(argv)` in the test process (a JAX start-up per case would cost CI
minutes) and asserts the exit code, that stderr's last non-empty line is the error, that the
message names the file or setting at fault, that there is no traceback, and that no output or
temporary file was left behind.
"""

import os
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path


def snapshot(*roots: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots` with (size, mtime_ns), to compare after a failure."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            out[str(path)] = (st.st_size if path.is_file() else -1, st.st_mtime_ns)
    return out


def changes(before: dict, *roots: str | os.PathLike) -> list[str]:
    """Paths created, removed or modified under `roots` since `snapshot`."""
    after = snapshot(*roots)
    changed = [p for p in after if p not in before or (after[p] != before[p] and after[p][0] >= 0)]
    return sorted(changed + [p for p in before if p not in after])


def fails_cleanly(
    main: Callable[[list[str]], int],
    argv: list[str],
    capsys,
    names: Iterable[str] = (),
    watch: Iterable[str | os.PathLike] = (),
    code: int = 2,
) -> str:
    """Runs `main(argv)`; asserts a clean failure and returns the error line.

    Args:
        main: the CLI's entry point.
        argv: its arguments.
        capsys: pytest's fixture (stderr is read from it).
        names: strings the error line must contain (the file or setting at fault).
        watch: folders in which the failed run must not create, change or remove anything.
        code: the expected exit code.
    """
    watch = list(watch)
    before = snapshot(*watch)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit from inside main
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, f"exit {rc}, expected {code}; stderr:\n{err}"
    assert lines, "no message on stderr"
    assert "Traceback" not in err, err
    last = lines[-1]
    assert last.startswith("error:") or "error:" in last, f"last stderr line is not an error: {err}"
    for name in names:
        assert str(name) in last, f"{name!r} not named in {last!r}"
    left = changes(before, *watch)
    assert not left, f"the failed run left or changed: {left}"
    return last


def write_big_png(path: Path, width: int = 14000, height: int = 14000) -> Path:
    """A valid all-black grayscale PNG of width x height (196 MP by default), ~200 KB, written
    row by row so that no full image is held in memory (the pixel-limit cases)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path
