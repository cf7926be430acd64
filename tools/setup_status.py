"""What tools/setup.sh could not get, as it recorded it in ``.venv/setup-status/``.

Set-up writes there (see tools/setup.sh):

- ``result``: ``running: ...`` while it runs, then ``complete``, ``incomplete: ...`` (some
  optional need could not be had) or ``failed: ...``;
- ``NEED.missing`` for every optional need it could not get (``example``: pyfuse3's
  sdist for tools/bench; ``postgres``; ``vm``): one line saying why. The file goes away
  once a later set-up gets it.

The tests that need something skip, with that reason, only when set-up recorded it
missing; tools/bench quotes the reason in its report.
"""

from __future__ import annotations

from pathlib import Path

STATUS_DIR = Path(__file__).resolve().parents[1] / ".venv" / "setup-status"

WHAT = {"example": "pyfuse3's sdist (for the tools/bench peer \"pyfuse3 tmpfs example\")",
        "postgres": "PostgreSQL", "vm": "QEMU, the guest kernel and busybox"}


def missing(need: str) -> str | None:
    """Why set-up could not get `need`, or None if it did not record it missing."""
    try:
        reason = (STATUS_DIR / f"{need}.missing").read_text().strip()
    except FileNotFoundError:
        return None
    return reason or "set-up recorded no reason"


def skip_reason(need: str) -> str | None:
    """A pytest skip reason for a test that needs `need`, or None if nothing is missing."""
    reason = missing(need)
    if reason is None:
        return None
    return f"tools/setup.sh could not get {WHAT.get(need, need)}: {reason}"
