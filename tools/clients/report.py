"""Progress on stderr and result tables on stdout."""

from __future__ import annotations

import sys
from collections.abc import Sequence

PROG = "guestfs-client"


def set_prog(name: str) -> None:
    """Name the tool in front of every progress line."""
    global PROG
    PROG = name


def progress(message: str) -> None:
    """One progress line on stderr (stdout stays for results)."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: numbers right-aligned, text left-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths))
             .rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(problems: list[str], lost: dict[str, list[int]]) -> int:
    """Say every problem and every lost id (the first few per place) on stderr; the
    exit code: 1 if there is any, else 0."""
    for problem in problems:
        progress(problem)
    for where, ids in lost.items():
        if ids:
            progress(f"{where}: lost ids {ids[:20]}{' …' if len(ids) > 20 else ''}")
    return 1 if problems or any(lost.values()) else 0


def _numeric(cell: str) -> bool:
    return cell.rstrip(" %").replace(".", "", 1).lstrip("-").isdigit()
