"""The log of acknowledged commits, kept outside the mount.

A writer appends an id only after its commit returned, and fsyncs the log before the
next commit, so every id in the log is one the database promised to keep. A SIGKILL may
cut the last line short; readers ignore an unterminated line (that commit's ack was not
recorded, so nothing was promised for it).
"""

from __future__ import annotations

import os
from pathlib import Path


class AckLog:
    """Append-only, fsync'd after every id."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def ack(self, txid: int) -> None:
        """Record that the commit of `txid` returned."""
        os.write(self._fd, f"{txid}\n".encode())
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_acks(path: Path) -> list[int]:
    """Every fully written id in the log, in order."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [int(line) for line in complete.splitlines()]
