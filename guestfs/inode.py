"""The inode as the filesystem core sees it, and file-type helpers.

An `Inode` is the decoded form of a record of the inode table (`guestfs.store.records`),
kept in a bounded cache: slotted, and with recurring values (modes, owners) shared
between inodes rather than copied.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass

ROOT_INO = 1
_S_IFMT = 0o170000          # the type bits of st_mode (stat.S_IFMT masks with it)
SECTORS_PER_PAGE = 8       # st_blocks counts 512-byte sectors; a page holds 8


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
    """One file of any type: its record in the inode table, decoded (a cache entry;
    the record in the arena is the truth, written back by the store).

    Type-specific fields: `parent` (a directory's ``..``; the root is its own parent),
    `tree` and `entries` (a directory's B+tree and entry count), `map_root`,
    `map_height`, `inline` and `npages` (a regular file's page map: see
    `guestfs.store.pagemap`), `target` or `target_blob` (a symlink's target, in the record or
    in a blob), `rdev` (device nodes). `xattr` is the first page of the inode's xattr
    blob, 0 when it has none.
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
    parent: int = 0
    xattr: int = 0
    tree: int = 0
    entries: int = 0
    map_root: int = 0
    map_height: int = 0
    inline: tuple[int, ...] = ()
    npages: int = 0
    target: bytes | None = None
    target_blob: int = 0

    @property
    def file_type(self) -> FileType:
        """The inode's type."""
        return FileType.of(self.mode)

    # The type tests are plain bit tests (not stat.S_IS*: a call each, and nearly every
    # request makes a few).
    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return self.mode & _S_IFMT == stat.S_IFDIR

    @property
    def is_reg(self) -> bool:
        """True for a regular file."""
        return self.mode & _S_IFMT == stat.S_IFREG

    @property
    def is_symlink(self) -> bool:
        """True for a symbolic link."""
        return self.mode & _S_IFMT == stat.S_IFLNK

    @property
    def blocks(self) -> int:
        """Allocated 512-byte blocks, for `st_blocks`."""
        return self.npages * SECTORS_PER_PAGE

    def touch(self, now: int, *, atime: bool = False, mtime: bool = False,
              ctime: bool = False) -> None:
        """Set the chosen timestamps to `now`."""
        if atime:
            self.atime_ns = now
        if mtime:
            self.mtime_ns = now
        if ctime:
            self.ctime_ns = now
