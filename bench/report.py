"""What every benchmark prints besides its JSON: the machine load it saw and one readable table.

    from bench.report import Row, load_snapshot, print_report

    before = load_snapshot()
    ... run ours and the reference ...
    print_report("encoder ViT-B @ 1024", [Row("forward", ours_s, ref_s, ours_rss, ref_rss)],
                 before)

A loaded machine inflates both sides of a comparison, not by the same factor (the two runs
contend differently for the cores), so the table states the 1-minute load average before and
after the run and says when it was not quiet (load >= `QUIET_LOAD`).
"""

import dataclasses
import os

QUIET_LOAD = 0.2


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: seconds (or any unit in `unit`) and peak RSS in bytes.

    `reference` / `reference_rss` are None where there is no reference for the row.
    """

    what: str
    ours: float
    reference: float | None = None
    ours_rss: int | None = None
    reference_rss: int | None = None
    unit: str = "s"


def load_snapshot() -> dict:
    """The 1/5/15-minute load averages and the core count, now."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2),
            "cpus": os.cpu_count()}  # fmt: skip


def machine_state(before: dict) -> dict:
    """`before` and the load after the run, for the JSON."""
    after = load_snapshot()
    return {
        "load_before": before["load_1m"],
        "load_after": after["load_1m"],
        "cpus": before["cpus"],
        "quiet": before["load_1m"] < QUIET_LOAD,
    }


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    return f"{x:.3f} {unit}" if x < 10 else f"{x:.1f} {unit}"


def format_table(title: str, rows: list[Row], before: dict) -> str:
    """The table as text: what | ours | reference | speed-up (reference / ours) | peak RSS."""
    state = machine_state(before)
    header = ("what", "ours", "reference", "speed-up", "ours RSS", "reference RSS")
    lines = [
        tuple(
            [
                r.what,
                _num(r.ours, r.unit),
                _num(r.reference, r.unit),
                "-" if r.reference is None or not r.ours else f"{r.reference / r.ours:.2f}x",
                _gib(r.ours_rss),
                _gib(r.reference_rss),
            ]
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    quiet = "quiet" if state["quiet"] else f"NOT quiet (>= {QUIET_LOAD}): timings are inflated"
    out = [
        f"== {title}",
        f"machine: {state['cpus']} cpus, load {state['load_before']} before, "
        f"{state['load_after']} after ({quiet})",
        fmt.format(*header),
        fmt.format(*("-" * w for w in widths)),
    ]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def print_report(title: str, rows: list[Row], before: dict) -> None:
    """Prints `format_table` (to stdout, after the JSON)."""
    print(format_table(title, rows, before), flush=True)
