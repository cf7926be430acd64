"""Page geometry and human-readable sizes.

Sizes are binary, as on the kernel command line (``memparse``): ``K`` = 1024 bytes,
``M`` = 1024 K, and so on. ``KiB``/``MiB``/... and a trailing ``B`` are accepted too.
"""

from __future__ import annotations

import re

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: Largest buddy order: orders 0..MAX_ORDER, i.e. blocks of 4 KiB up to 4 MiB.
MAX_ORDER = 10
#: Pages in a block of the largest order.
MAX_ORDER_PAGES = 1 << MAX_ORDER

_SUFFIXES = "KMGTPE"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``"256M"``, ``"4G"``, ``"2GiB"``, ``"1.5G"`` or ``"1048576"`` into bytes.

    Raises ``ValueError`` (with a sentence naming the bad text) for anything else,
    including fractions that do not come out as a whole number of bytes.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"A size cannot be negative, got {text}.")
        return text
    match = _SIZE_RE.match(text)
    if match is None or (match.group(3) and match.group(3).upper() == "IB" and not match.group(2)):
        raise ValueError(
            f"{text!r} is not a size; use a number of bytes with an optional binary "
            "suffix, such as 4096, 256M, 4G or 2GiB."
        )
    number, suffix = match.group(1), match.group(2).upper()
    scale = 1 << (10 * (_SUFFIXES.index(suffix) + 1)) if suffix else 1
    if "." in number:
        whole, frac = number.split(".")
        numerator = int(whole + frac) * scale
        denominator = 10 ** len(frac)
        if numerator % denominator:
            raise ValueError(f"{text!r} is not a whole number of bytes.")
        return numerator // denominator
    return int(number) * scale


def format_size(nbytes: int, *, compact: bool = False) -> str:
    """Render a byte count for people: ``"16 MiB"``, ``"1.50 GiB"``, ``"512 B"``.

    With ``compact=True`` the result is exact and kernel-command-line style
    (``"16M"``, ``"1536K"``, ``"4097"``) so that ``parse_size`` gives back ``nbytes``.
    """
    if compact:
        for power in range(len(_SUFFIXES), 0, -1):
            unit = 1 << (10 * power)
            if nbytes and nbytes % unit == 0:
                return f"{nbytes // unit}{_SUFFIXES[power - 1]}"
        return str(nbytes)
    for power in range(len(_SUFFIXES), 0, -1):
        unit = 1 << (10 * power)
        if abs(nbytes) >= unit:
            value = nbytes / unit
            text = f"{value:.0f}" if nbytes % unit == 0 else f"{value:.2f}"
            return f"{text} {_SUFFIXES[power - 1]}iB"
    return f"{nbytes} B"


def pages_for(nbytes: int) -> int:
    """Number of pages needed to hold ``nbytes`` (rounded up)."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
