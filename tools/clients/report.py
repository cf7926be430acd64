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
    """A plain text table, columns right-aligned (they are mostly numbers)."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
