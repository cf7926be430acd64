"""A mount's atime options (a module of its own, so that the command line can parse mount
options without loading the filesystem core)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AtimeMode(enum.Enum):
    """When reads move atime. The kernel leaves atime of FUSE files to the filesystem
    (it never updates it itself), so the mount's atime options are applied here."""

    RELATIME = "relatime"         # if not newer than mtime or ctime, or a day old
    STRICTATIME = "strictatime"   # on every read
    NOATIME = "noatime"           # never


@dataclass(frozen=True, slots=True)
class AtimePolicy:
    """The atime options of a mount: the mode, and whether directories follow it."""

    mode: AtimeMode = AtimeMode.RELATIME
    directories: bool = True      # False: nodiratime
