"""Progress on stderr, with the time since the benchmark started."""

from __future__ import annotations

import sys
import time

_START = time.monotonic()


def say(message: str) -> None:
    """One line of progress (stdout stays free for nothing but results)."""
    print(f"bench [{time.monotonic() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)
