"""The inode record and file-type helpers.

An `Inode` is kept small on purpose (the daemon's budget is about 600 bytes of Python
memory per small file, directory entry included): one slotted record, no per-inode dict,
and recurring values (modes, owners, the timestamps of one operation) shared between
inodes rather than copied.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guestfs.directory import Directory
    from guestfs.pagemap import PageMap

ROOT_INO = 1


class FileType(enum.IntEnum):
    """The type bits of `st_mode`."""

    REGULAR = stat.S_IFREG
    DIRECTORY = stat.S_IFDIR
    SYMLINK = stat.S_IFLNK
    FIFO = stat.S_IFIFO
    CHAR_DEVICE = stat.S_IFCHR
    BLOCK_DEVICE = stat.S_IFBLK
    SOCKET = stat.S_IFSOCK

    @classmethod
    def of(cls, mode: int) -> FileType:
        """The type of a full `st_mode`; ValueError if its type bits name no type."""
        return cls(stat.S_IFMT(mode))


_INTERN_LIMIT = 4096
_interned: dict[int, int] = {}


def intern_int(value: int) -> int:
    """One shared object for a recurring value (a mode, a uid, a gid).

    CPython caches only -5..256; a mode such as 0o100644 is otherwise a fresh 32-byte int
    per inode. The table is bounded so that a client cycling through uids cannot grow it
    without limit (values past the bound are simply not shared).
    """
    shared = _interned.get(value)
    if shared is not None:
        return shared
    if len(_interned) < _INTERN_LIMIT:
        _interned[value] = value
    return value


@dataclass(slots=True, eq=False)
class Inode:
    """One file of any type.

    `dir` is set for directories, `pages` for regular files once they hold data (None
    while empty), `target` for symlinks, `rdev` for device nodes. `parent` is the inode
    number of a directory's ``..`` (the root is its own parent); 0 for other types.
    `lookups` (the kernel's lookup count) and `opens` are runtime state of one mount and
    are not part of the handover.
    """

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int = 0
    size: int = 0
    rdev: int = 0
    xattrs: dict[bytes, bytes] | None = None
    dir: Directory | None = None
    parent: int = 0
    target: bytes | None = None
    pages: PageMap | None = None
    lookups: int = 0
    opens: int = 0

    @property
    def file_type(self) -> FileType:
        """The inode's type."""
        return FileType.of(self.mode)

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """True for a regular file."""
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        """True for a symbolic link."""
        return stat.S_ISLNK(self.mode)

    def touch(self, now: int, *, atime: bool = False, mtime: bool = False,
              ctime: bool = False) -> None:
        """Set the chosen timestamps to `now` (one shared int object for all of them)."""
        if atime:
            self.atime_ns = now
        if mtime:
            self.mtime_ns = now
        if ctime:
            self.ctime_ns = now
