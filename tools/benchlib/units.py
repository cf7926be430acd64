"""Binary units, and how sizes and counts are written for people."""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def size_text(n: float) -> str:
    """Bytes in the largest binary unit they reach: ``512 MiB``, ``1.5 GiB``, ``300 B``."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            value = n / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{n:.0f} B"


def count_text(n: int) -> str:
    """A count in Ki or Mi when it is a whole number of them: ``16 Ki``, ``1 Mi``, ``300``."""
    for unit, name in ((MiB, "Mi"), (KiB, "Ki")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return str(n)
