"""The base of every error a user can act on: one line naming the file or setting."""


class AmsamError(Exception):
    """A bad input, setting or run state; `str()` is one line, `<where>: <problem>`.

    Every command-line entry point catches this class (and only this class) and prints
    `error: <message>` with exit code `exit_code` (2; 130 for an interrupted run). Subclasses
    name the area (`DataError`, `BoxError`, ...).

    Args:
        where: the file, folder or setting at fault (None when there is no single one).
        problem: what is wrong; only its first line is kept.
    """

    exit_code = 2  # what a command-line entry point exits with

    def __init__(self, where: object | None, problem: str | None = None):
        if problem is None:  # AmsamError("message") keeps the plain-message form
            where, problem = None, str(where)
        self.path = None if where is None else str(where)
        lines = (problem or "").strip().splitlines()
        self.problem = lines[0] if lines else "unknown error"
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
