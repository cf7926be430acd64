"""The one exception the filesystem core raises on purpose."""

from __future__ import annotations

import errno as _errno
import os


class FsError(Exception):
    """A POSIX error answer: `errno` is what the caller (the FUSE adapter) replies with.

    ``str(e)`` reads like ``"ENOENT (No such file or directory): no entry b'x' in 1"``.
    """

    def __init__(self, errno: int, detail: str = "") -> None:
        super().__init__(errno, detail)
        self.errno = errno
        self.detail = detail

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, f"errno {self.errno}")
        text = f"{name} ({os.strerror(self.errno)})"
        return f"{text}: {self.detail}" if self.detail else text
