"""The filesystem core: every POSIX operation, on plain Python objects.

No FUSE here: the adapter (`fuse_ops`) turns requests into these calls and `FsError`
into errno answers. The kernel mounts with ``default_permissions``, so access bits, the
sticky bit and who may chmod/chown are checked by the kernel before a request arrives;
the core checks what only the filesystem can know (names, types, link counts, space,
limits) and the rules the kernel leaves to it (xattr namespaces, set-gid inheritance,
clearing set-id bits on chown).

Every call either succeeds completely or raises `FsError` with nothing changed (a write
may be short; it never reports more than it stored).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from guestfs import acl
from guestfs.directory import DOT_COOKIE, DOTDOT_COOKIE, Directory
from guestfs.errors import FsError
from guestfs.inode import ROOT_INO, FileType, Inode, intern_int
from guestfs.pagemap import Extent, PageMap, PagePool
from guestfs.reserve import DIRENT_BYTES, INODE_BYTES, HandoverReserve, dirent_bytes, xattr_bytes
from guestfs.superblock import MAX_FILE_SIZE, Superblock
from kho_backend.units import PAGE_SIZE

if TYPE_CHECKING:
    from kho_backend.boot import Kernel

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

NAME_MAX = 255
SYMLINK_MAX = 4095          # PATH_MAX less the terminating NUL
LINK_MAX = 65000            # cap on nlink (hard links, subdirectories)
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
RELATIME_NS = 24 * 3600 * 10**9
#: Times the kernel can hold: signed 64-bit seconds and nanoseconds.
TIME_MIN_NS = -(1 << 63) * 10**9
TIME_MAX_NS = ((1 << 63) - 1) * 10**9 + 999_999_999
#: The mode of a whiteout (renameat2 RENAME_WHITEOUT): a character device 0:0.
WHITEOUT_MODE = stat.S_IFCHR


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


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who makes a request. The kernel has applied the umask to modes already."""

    uid: int
    gid: int
    pid: int = 0
    umask: int = 0


@dataclass(frozen=True, slots=True)
class StatFs:
    """`statvfs` figures, in 4 KiB blocks."""

    f_bsize: int
    f_frsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_favail: int
    f_namemax: int


class Filesystem:
    """A guestfs filesystem over one booted kernel's arena. Inode 1 is the root."""

    def __init__(self, kernel: Kernel, sb: Superblock | None = None, *,
                 inodes: Iterable[Inode] = (),
                 clock: Callable[[], int] | None = None,
                 atime: AtimePolicy = AtimePolicy()) -> None:
        """Format a fresh filesystem (`sb` None), or take over `inodes` restored with `sb`.

        Restored inodes must include the root; their page maps must point at pages this
        kernel owns (the handover restores them before building the filesystem).
        `clock` gives timestamps in ns (default: the wall clock, CLOCK_REALTIME, in full
        nanoseconds: never behind the kernel's coarser clock, so a file the filesystem
        stamps after one the kernel stamped never looks older). `atime` is the mount's
        atime policy.
        """
        self.kernel = kernel
        self.reserve = HandoverReserve(kernel.arena.npages)
        self.pool = PagePool(kernel.arena, kernel.buddy, self.reserve)
        self.atime = atime
        self._clock = clock or time.time_ns
        self._inodes: dict[int, Inode] = {}
        if sb is None:
            self.sb = Superblock.new(kernel.arena.size)
            self._make_root()
        else:
            self.sb = sb
            self._install(inodes)

    # --- introspection (status, handover, tests) -----------------------------

    @property
    def inodes(self) -> Mapping[int, Inode]:
        """Every live inode by number, read-only (includes unlinked ones still open)."""
        return MappingProxyType(self._inodes)

    def get(self, ino: int) -> Inode:
        """The inode numbered `ino`; ENOENT if there is none."""
        try:
            return self._inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT, f"no inode {ino}") from None

    def check(self, *, pages: bool = True) -> list[str]:
        """Consistency problems (an fsck): empty when the filesystem is sound.

        `pages` False leaves out the page accounting and the search for pages two files
        share (a restore has KHO refuse a page claimed twice, at a fraction of the cost).
        """
        return _Checker(self).run(pages=pages)

    # --- names ---------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Inode:
        """The inode `name` refers to in directory `parent` (``.`` and ``..`` too).

        ``.`` is answered for an inode of any type: the kernel resolves an NFS-style file
        handle (open_by_handle_at) by looking up ``.`` in the inode it names.
        """
        if name == b".":
            return self.get(parent)
        d = self._dir(parent)
        if name == b"..":
            return self._inodes[d.parent]
        _check_name(name)
        ino = _entries(d).lookup(name)
        if ino is None:
            raise FsError(errno.ENOENT, f"no entry {name!r} in {parent}")
        return self._inodes[ino]

    def create(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Inode:
        """A new empty regular file."""
        return self._create(parent, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Inode:
        """A new regular file, FIFO, socket or device node (type from `mode`'s type bits;
        none means a regular file)."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind == stat.S_IFDIR:
            raise FsError(errno.EPERM, "mknod cannot make a directory")
        try:
            FileType(kind)
        except ValueError:
            raise FsError(errno.EINVAL, f"mknod of unknown type {kind:#o}") from None
        if kind == stat.S_IFLNK:
            raise FsError(errno.EINVAL, "mknod cannot make a symlink")
        is_dev = kind in (stat.S_IFCHR, stat.S_IFBLK)
        return self._create(parent, name, kind | stat.S_IMODE(mode), ctx,
                            rdev=rdev if is_dev else 0)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Inode:
        """A new empty directory; EMLINK when the parent has too many subdirectories."""
        return self._create(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Inode:
        """A new symbolic link to `target`."""
        if not target:
            raise FsError(errno.ENOENT, "empty symlink target")
        if len(target) > SYMLINK_MAX:
            raise FsError(errno.ENAMETOOLONG, f"symlink target of {len(target)} bytes")
        return self._create(parent, name, stat.S_IFLNK | 0o777, ctx, target=bytes(target))

    def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Ctx) -> Inode:
        """A new name for an existing non-directory."""
        inode = self.get(ino)
        d = self._dir(new_parent)
        self._check_new_name(d, new_name)
        if inode.is_dir:
            raise FsError(errno.EPERM, "hard links to directories are not allowed")
        if inode.nlink == 0:
            raise FsError(errno.ENOENT, f"inode {ino} has been deleted")
        if inode.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK, f"inode {ino} has {inode.nlink} links")
        self._charge(dirent_bytes(new_name))
        now = self._clock()
        _entries(d).add(bytes(new_name), inode.ino)
        inode.nlink += 1
        inode.touch(now, ctime=True)
        d.touch(now, mtime=True, ctime=True)
        return inode

    def unlink(self, parent: int, name: bytes, ctx: Ctx) -> None:
        """Remove a non-directory's name; its data lives on while it is open or looked up."""
        d = self._dir(parent)
        if name in (b".", b".."):
            raise FsError(errno.EISDIR, f"cannot unlink {name!r}")
        inode = self._child(d, name)
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"{name!r} is a directory")
        now = self._clock()
        _entries(d).remove(name)
        self._uncharge(dirent_bytes(name))
        inode.nlink -= 1
        inode.touch(now, ctime=True)
        d.touch(now, mtime=True, ctime=True)
        self._maybe_free(inode)

    def rmdir(self, parent: int, name: bytes, ctx: Ctx) -> None:
        """Remove an empty directory."""
        d = self._dir(parent)
        if name == b".":
            raise FsError(errno.EINVAL, "cannot remove '.'")
        if name == b"..":
            raise FsError(errno.ENOTEMPTY, "cannot remove '..'")
        inode = self._child(d, name)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, f"{name!r} is not a directory")
        if len(_entries(inode)):
            raise FsError(errno.ENOTEMPTY, f"directory {name!r} is not empty")
        now = self._clock()
        _entries(d).remove(name)
        self._uncharge(dirent_bytes(name))
        d.nlink -= 1
        inode.nlink = 0
        inode.touch(now, ctime=True)
        d.touch(now, mtime=True, ctime=True)
        self._maybe_free(inode)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, ctx: Ctx) -> None:
        """Move a name, with renameat2 flags RENAME_NOREPLACE, RENAME_EXCHANGE or
        RENAME_WHITEOUT (which leaves a whiteout, a character device 0:0, at the old
        name; the kernel lets only a caller with CAP_MKNOD ask for one)."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or \
                (flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise FsError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        od, nd = self._dir(old_parent), self._dir(new_parent)
        for name in (old_name, new_name):
            if name in (b".", b".."):
                raise FsError(errno.EINVAL, f"cannot rename {name!r}")
            _check_name(name)
        src = self._child(od, old_name)
        dst_ino = _entries(nd).lookup(new_name)
        dst = None if dst_ino is None else self._inodes[dst_ino]
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT, f"no entry {new_name!r} to exchange with")
            self._exchange(od, old_name, src, nd, new_name, dst)
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST, f"{new_name!r} exists")
        if dst is src:
            return  # two names of one inode: POSIX says rename does nothing
        self._check_move(src, nd, dst)
        whiteout = bool(flags & RENAME_WHITEOUT)
        # The table keeps the old name only for a whiteout, and the new one only if it
        # did not replace an entry (which keeps its place and cookie).
        grows = (dirent_bytes(new_name) if dst is None else 0) + \
            (INODE_BYTES if whiteout else -dirent_bytes(old_name))
        if whiteout:
            self._check_inode_room()
        self._charge(grows)
        now = self._clock()
        _entries(od).remove(old_name)
        if dst is None:
            _entries(nd).add(bytes(new_name), src.ino)
        else:
            _entries(nd).replace(new_name, src.ino)
            self._drop_name(nd, dst, now)
        if src.is_dir and od is not nd:
            od.nlink -= 1
            nd.nlink += 1
            src.parent = nd.ino
        if whiteout:
            gid = od.gid if od.mode & stat.S_ISGID else ctx.gid
            self._new_inode(od, bytes(old_name), WHITEOUT_MODE, ctx.uid, gid, now)
        src.touch(now, ctime=True)
        od.touch(now, mtime=True, ctime=True)
        nd.touch(now, mtime=True, ctime=True)
        if dst is not None:
            self._maybe_free(dst)

    def readlink(self, ino: int) -> bytes:
        """A symlink's target; EINVAL for other types."""
        inode = self.get(ino)
        if inode.target is None:
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        return inode.target

    # --- attributes ----------------------------------------------------------

    def setattr(self, ino: int, ctx: Ctx, *, mode: int | None = None,
                uid: int | None = None, gid: int | None = None, size: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None,
                ctime_ns: int | None = None) -> Inode:
        """Change the given attributes (None: unchanged); any change sets ctime, to
        `ctime_ns` when given or now.

        `size` has truncate semantics; a changed uid or gid clears the set-user-ID bit of
        a non-directory, and its set-group-ID bit when group-execute is set (as Linux's
        chown does, whoever the caller); `mode` replaces the permission bits (and the
        matching entries of an access ACL).
        """
        inode = self.get(ino)
        if size is not None:
            self._check_truncate(inode, size)
        now = self._clock()
        changed = False
        if size is not None and size != inode.size:
            # A truncate to the current size changes nothing, times included (as tmpfs).
            self._truncate(inode, size, now)
            changed = True
        if uid not in (None, -1) or gid not in (None, -1):
            self._chown(inode, uid, gid)
            changed = True
        if mode is not None:
            inode.mode = intern_int(stat.S_IFMT(inode.mode) | stat.S_IMODE(mode))
            self._chmod_acl(inode)
            changed = True
        if atime_ns is not None:
            inode.atime_ns = atime_ns
            changed = True
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
            changed = True
        if ctime_ns is not None:
            inode.ctime_ns = ctime_ns
        elif changed:
            inode.ctime_ns = now
        return inode

    # --- file data -----------------------------------------------------------

    def open(self, ino: int, flags: int) -> None:
        """Count an open; O_TRUNC empties a regular file and sets its mtime and ctime."""
        inode = self.get(ino)
        if flags & os.O_TRUNC and inode.is_reg:
            self._truncate(inode, 0, self._clock(), always_touch=True)
        inode.opens += 1

    def release(self, ino: int) -> None:
        """Count a close; the last close of an unlinked, forgotten inode frees it."""
        inode = self._inodes.get(ino)
        if inode is None:
            return
        inode.opens = max(inode.opens - 1, 0)
        self._maybe_free(inode)

    def read(self, ino: int, off: int, size: int) -> bytes | memoryview:
        """Up to `size` bytes at `off` (fewer at the end of the file), zero-copy where the
        range is one contiguous run of arena pages. Holes read as zeros."""
        inode = self._regular(ino)
        if off < 0 or size < 0:
            raise FsError(errno.EINVAL, f"read at {off} of {size}")
        self._accessed(inode)
        size = min(size, inode.size - off)
        if size <= 0:
            return b""
        if inode.pages is None:
            return bytes(size)
        return inode.pages.read(self.pool, off, size)

    def write(self, ino: int, off: int, data: bytes | memoryview) -> int:
        """Store `data` at `off`; returns the bytes written: all of them, or fewer only
        where the file would pass the largest size (EFBIG at it). A write the arena
        cannot hold whole stores nothing and raises ENOSPC, so a file's size only ever
        covers bytes that are stored or holes that read as zeros."""
        inode = self._regular(ino)
        if off < 0:
            raise FsError(errno.EINVAL, f"write at {off}")
        length = len(data)
        if length == 0:
            return 0
        if off >= MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"write at {off}: files end at {MAX_FILE_SIZE}")
        if off + length > MAX_FILE_SIZE:
            data = memoryview(data)[:MAX_FILE_SIZE - off]
        pages = inode.pages if inode.pages is not None else PageMap()
        if not pages.write(self.pool, off, data):
            raise FsError(errno.ENOSPC, f"no room for {len(data)} bytes in inode {ino}")
        inode.pages = pages
        written = len(data)
        if off + written > inode.size:
            inode.size = off + written
        inode.touch(self._clock(), mtime=True, ctime=True)
        return written

    def extents(self, ino: int) -> list[Extent]:
        """Where a regular file's data lies: (file page, PFN, pages, order) runs."""
        pages = self._regular(ino).pages
        return pages.extents() if pages is not None else []

    def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        """Mode 0 allocates (and extends the size), FALLOC_FL_KEEP_SIZE allocates only,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE frees; other modes: EOPNOTSUPP."""
        inode = self.get(ino)
        if off < 0 or length <= 0:
            raise FsError(errno.EINVAL, f"fallocate at {off} of {length}")
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {ino} is a directory")
        if not inode.is_reg:
            raise FsError(errno.ENODEV, f"inode {ino} is not a regular file")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) or \
                (mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE):
            raise FsError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        if mode & FALLOC_FL_PUNCH_HOLE:
            if inode.pages is not None:
                inode.pages.punch_hole(self.pool, off, length)
                if not inode.pages.npages:
                    inode.pages = None
        else:
            self._allocate(inode, off, length, keep_size=bool(mode & FALLOC_FL_KEEP_SIZE))
        inode.touch(self._clock(), mtime=True, ctime=True)

    # --- directories ---------------------------------------------------------

    def readdir(self, ino: int, after: int, before: int | None = None
                ) -> Iterator[tuple[int, bytes, Inode]]:
        """(cookie, name, inode) of the entries past cookie `after`: ``.`` (1), ``..`` (2),
        then the entries in the order they were added. Lazy: the caller may stop early
        and resume later from the last cookie it used, even if the directory changed.

        `before` (from `readdir_end` when the walk began) leaves out entries added
        since, so that a walk always ends: POSIX lets it skip them.
        """
        d = self._dir(ino)
        self._accessed(d)
        return self._listing(d, after, before)

    def readdir_end(self, ino: int) -> int:
        """The cookie bound of a directory walk that begins now (see `readdir`)."""
        return _entries(self._dir(ino)).next_cookie

    # --- extended attributes -------------------------------------------------

    def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Ctx) -> None:
        """Set an extended attribute (create or replace). An access ACL also sets the
        permission bits, and is not kept when those bits say all it says."""
        inode = self.get(ino)
        self._check_xattr_write(inode, name, ctx)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG, f"xattr value of {len(value)} bytes")
        name, value = bytes(name), bytes(value)
        bits = None
        if name in acl.NAMES:
            value, bits = self._checked_acl(inode, name, value)
        self._put_xattr(inode, name, value)
        if bits is not None:
            inode.mode = intern_int(inode.mode & ~0o777 | bits)
        inode.touch(self._clock(), ctime=True)

    @staticmethod
    def _checked_acl(inode: Inode, name: bytes, value: bytes) -> tuple[bytes, int | None]:
        """The value to store for an ACL (b"" for none) and, for an access ACL, the
        permission bits it gives the mode."""
        if name == acl.DEFAULT and not inode.is_dir:
            raise FsError(errno.EACCES, "only directories have a default ACL")
        try:
            parsed = acl.parse(value)
        except ValueError as e:
            raise FsError(errno.EINVAL, f"inode {inode.ino}: {e}") from None
        if name == acl.DEFAULT:
            return acl.pack(parsed), None
        bits, equivalent = acl.mode_bits(parsed)
        return (b"" if equivalent else acl.pack(parsed)), bits

    def _put_xattr(self, inode: Inode, name: bytes, value: bytes) -> None:
        """Store (or, for an empty ACL value, drop) one xattr, within the reserve."""
        old = inode.xattrs.get(name) if inode.xattrs else None
        if not value and name in acl.NAMES:
            if old is not None:
                self._drop_xattr(inode, name)
            return
        self._charge(xattr_bytes(name, value) - (0 if old is None else xattr_bytes(name, old)))
        if inode.xattrs is None:
            inode.xattrs = {}
        inode.xattrs[name] = value

    def _drop_xattr(self, inode: Inode, name: bytes) -> None:
        assert inode.xattrs is not None
        self._uncharge(xattr_bytes(name, inode.xattrs.pop(name)))
        if not inode.xattrs:
            inode.xattrs = None

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """An extended attribute's value; ENODATA if it is not set."""
        inode = self.get(ino)
        xattr_namespace(name)
        value = inode.xattrs.get(name) if inode.xattrs else None
        if value is None:
            raise FsError(errno.ENODATA, f"no xattr {name!r} on inode {ino}")
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        """The names of the inode's extended attributes."""
        inode = self.get(ino)
        return list(inode.xattrs) if inode.xattrs else []

    def listxattr_items(self, ino: int) -> list[tuple[bytes, bytes]]:
        """The inode's extended attributes as (name, value) pairs."""
        inode = self.get(ino)
        return list(inode.xattrs.items()) if inode.xattrs else []

    def removexattr(self, ino: int, name: bytes, ctx: Ctx) -> None:
        """Remove an extended attribute; ENODATA if it is not set."""
        inode = self.get(ino)
        self._check_xattr_write(inode, name, ctx)
        if not inode.xattrs or name not in inode.xattrs:
            raise FsError(errno.ENODATA, f"no xattr {name!r} on inode {ino}")
        self._drop_xattr(inode, name)
        inode.touch(self._clock(), ctime=True)

    # --- the whole filesystem ------------------------------------------------

    def statfs(self) -> StatFs:
        """Real figures: blocks are arena pages (held by files + free for files); the
        handover's reserve and the metadata's headroom are free but not available, as a
        filesystem's reserved blocks, so `f_bavail` is the room writes still have."""
        free = self.pool.free_pages()
        ffree = max(self.sb.max_inodes - len(self._inodes), 0)
        return StatFs(f_bsize=PAGE_SIZE, f_frsize=PAGE_SIZE,
                      f_blocks=self.pool.used_pages + free, f_bfree=free,
                      f_bavail=max(free - self.pool.data_floor(extra_blocks=1), 0),
                      f_files=self.sb.max_inodes, f_ffree=ffree, f_favail=ffree,
                      f_namemax=NAME_MAX)

    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel took `n` more lookup references to `ino`."""
        self.get(ino).lookups += n

    def forget_session(self) -> None:
        """The kernel's mount of this filesystem ended: its lookups and opens are gone,
        and inodes no name reaches any more are freed (before mounting again)."""
        for inode in list(self._inodes.values()):
            inode.lookups = inode.opens = 0
            self._maybe_free(inode)

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped `n` lookup references; may free an unlinked inode.
        Never fails: the kernel does not expect an answer."""
        inode = self._inodes.get(ino)
        if inode is None:
            return
        inode.lookups = max(inode.lookups - n, 0)
        self._maybe_free(inode)

    # --- internals: lookups --------------------------------------------------

    def _dir(self, ino: int) -> Inode:
        inode = self.get(ino)
        if inode.dir is None:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return inode

    def _regular(self, ino: int) -> Inode:
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {ino} is a directory")
        if not inode.is_reg:
            raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
        return inode

    def _child(self, d: Inode, name: bytes) -> Inode:
        _check_name(name)
        ino = _entries(d).lookup(name)
        if ino is None:
            raise FsError(errno.ENOENT, f"no entry {name!r} in {d.ino}")
        return self._inodes[ino]

    def _listing(self, d: Inode, after: int, before: int | None
                 ) -> Iterator[tuple[int, bytes, Inode]]:
        if after < DOT_COOKIE:
            yield DOT_COOKIE, b".", d
        if after < DOTDOT_COOKIE:
            yield DOTDOT_COOKIE, b"..", self._inodes[d.parent]
        for cookie, name, ino in _entries(d).entries_after(max(after, DOTDOT_COOKIE), before):
            yield cookie, name, self._inodes[ino]

    def _is_within(self, d: Inode, top: Inode) -> bool:
        """True if directory `d` is `top` or lies below it."""
        while d is not top:
            if d.ino == ROOT_INO:
                return False
            d = self._inodes[d.parent]
        return True

    # --- internals: the root and a restored tree ------------------------------

    def _make_root(self) -> None:
        opts = self.sb.options
        now = self._clock()
        root = Inode(ino=ROOT_INO, mode=stat.S_IFDIR | int(opts.get("mode", "755"), 8),
                     uid=int(opts.get("uid", os.getuid())), gid=int(opts.get("gid", os.getgid())),
                     nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now,
                     generation=self.sb.ino_generation, dir=Directory(), parent=ROOT_INO)
        self._inodes[ROOT_INO] = root
        self.reserve.meta_bytes += INODE_BYTES

    def _install(self, inodes: Iterable[Inode]) -> None:
        for inode in inodes:
            if inode.ino in self._inodes or not 0 < inode.ino < self.sb.next_ino:
                raise ValueError(f"restored inode {inode.ino}: repeated or out of range")
            self._inodes[inode.ino] = inode
            if inode.pages is not None:
                self.pool.used_pages += inode.pages.npages
                self.pool.allocations += inode.pages.allocations()
        root = self._inodes.get(ROOT_INO)
        if root is None or root.dir is None:
            raise ValueError("restored inodes have no root directory")
        self.reserve.meta_bytes += sum(map(inode_table_bytes, self._inodes.values()))

    # --- internals: the handover's reserve ------------------------------------

    def _charge(self, nbytes: int) -> None:
        """The tree grows by `nbytes` of inode table: ENOSPC (nothing changed) if the
        handover could then no longer be written into the free pages."""
        if nbytes > 0 and self.pool.free_pages() < self.pool.reserved_pages(extra_bytes=nbytes):
            raise FsError(errno.ENOSPC, "the arena has no room left for the handover of "
                                        f"{nbytes} more bytes of metadata")
        self.reserve.meta_bytes += nbytes

    def _uncharge(self, nbytes: int) -> None:
        self.reserve.meta_bytes -= nbytes

    def _check_inode_room(self) -> None:
        if len(self._inodes) >= self.sb.max_inodes:
            raise FsError(errno.ENOSPC, f"all {self.sb.max_inodes} inodes are in use")

    # --- internals: creating and dropping ------------------------------------

    def _check_new_name(self, d: Inode, name: bytes) -> None:
        _check_name(name)
        if name in (b".", b"..") or name in _entries(d):
            raise FsError(errno.EEXIST, f"{name!r} exists in {d.ino}")
        if d.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {d.ino} has been removed")

    def _create(self, parent: int, name: bytes, mode: int, ctx: Ctx, *, rdev: int = 0,
                target: bytes | None = None) -> Inode:
        """Make an inode of `mode` (type bits included) and enter it as `name`."""
        d = self._dir(parent)
        self._check_new_name(d, name)
        is_dir = stat.S_ISDIR(mode)
        if is_dir and d.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK, f"directory {parent} has too many subdirectories")
        self._check_inode_room()
        gid = ctx.gid
        if d.mode & stat.S_ISGID:
            gid = d.gid
            if is_dir:
                mode |= stat.S_ISGID
        xattrs: dict[bytes, bytes] = {}
        if d.xattrs and target is None:
            bits, xattrs = self._inherited_acls(d, mode)
            mode = mode & ~0o777 | bits
        self._charge(INODE_BYTES + dirent_bytes(name) + len(target or b"")
                     + sum(xattr_bytes(k, v) for k, v in xattrs.items()))
        inode = self._new_inode(d, bytes(name), mode, ctx.uid, gid, self._clock(),
                                rdev=rdev, target=target)
        inode.xattrs = xattrs or None
        return inode

    def _new_inode(self, d: Inode, name: bytes, mode: int, uid: int, gid: int, now: int,
                   *, rdev: int = 0, target: bytes | None = None) -> Inode:
        """Enter a new inode as `name` in `d` (checks and reserve already done)."""
        is_dir = stat.S_ISDIR(mode)
        ino = self.sb.allocate_ino()
        inode = Inode(ino=ino, mode=intern_int(mode), uid=intern_int(uid),
                      gid=intern_int(gid), nlink=2 if is_dir else 1,
                      atime_ns=now, mtime_ns=now, ctime_ns=now,
                      generation=self.sb.ino_generation, rdev=rdev, target=target,
                      size=0 if target is None else len(target))
        if is_dir:
            inode.dir = Directory()
            inode.parent = d.ino
            d.nlink += 1
        self._inodes[ino] = inode
        _entries(d).add(name, ino)
        d.touch(now, mtime=True, ctime=True)
        return inode

    @staticmethod
    def _inherited_acls(d: Inode, mode: int) -> tuple[int, dict[bytes, bytes]]:
        """(permission bits, ACL xattrs) of a new inode of `mode` in directory `d`: what
        d's default ACL gives it (the mode's own bits and nothing without one)."""
        default = d.xattrs.get(acl.DEFAULT) if d.xattrs else None
        if default is None:
            return mode & 0o777, {}
        access, bits = acl.inherit(acl.parse(default), mode)
        xattrs = {}
        if access is not None:
            xattrs[acl.ACCESS] = acl.pack(access)
        if stat.S_ISDIR(mode):
            xattrs[acl.DEFAULT] = default
        return bits & 0o777, xattrs

    def _drop_name(self, d: Inode, inode: Inode, now: int) -> None:
        """`inode` lost its name in `d` to a rename over it."""
        if inode.is_dir:
            inode.nlink = 0
            d.nlink -= 1
        else:
            inode.nlink -= 1
        inode.touch(now, ctime=True)

    def _maybe_free(self, inode: Inode) -> None:
        """Drop an inode nobody can reach any more, and give back its pages."""
        if inode.nlink or inode.lookups or inode.opens or inode.ino == ROOT_INO:
            return
        if inode.pages is not None:
            inode.pages.release(self.pool)
            inode.pages = None
        self._uncharge(inode_table_bytes(inode))
        del self._inodes[inode.ino]

    # --- internals: rename ---------------------------------------------------

    def _check_move(self, src: Inode, nd: Inode, dst: Inode | None) -> None:
        """May `src` take a name in directory `nd`, over `dst` if that is not None?"""
        if nd.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {nd.ino} has been removed")
        if src.is_dir and self._is_within(nd, src):
            raise FsError(errno.EINVAL, f"cannot move directory {src.ino} into itself")
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR, f"cannot replace non-directory {dst.ino} "
                                             "with a directory")
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR, f"cannot replace directory {dst.ino} "
                                            "with a non-directory")
            if dst.is_dir and len(_entries(dst)):
                raise FsError(errno.ENOTEMPTY, f"directory {dst.ino} is not empty")
        moves_dir = src.is_dir and src.parent != nd.ino
        if moves_dir and (dst is None or not dst.is_dir) and nd.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK, f"directory {nd.ino} has too many subdirectories")

    def _exchange(self, od: Inode, old_name: bytes, src: Inode,
                  nd: Inode, new_name: bytes, dst: Inode) -> None:
        """RENAME_EXCHANGE: the two names swap inodes."""
        if src is dst:
            return
        if (src.is_dir and self._is_within(nd, src)) or (dst.is_dir and self._is_within(od, dst)):
            raise FsError(errno.EINVAL, "cannot exchange a directory with its own descendant")
        if od is not nd and src.is_dir != dst.is_dir:
            # One directory changes parent: its new parent gains a link.
            joined = nd if src.is_dir else od
            if joined.nlink >= LINK_MAX:
                raise FsError(errno.EMLINK, f"directory {joined.ino} has too many "
                                            "subdirectories")
        now = self._clock()
        _entries(od).replace(old_name, dst.ino)
        _entries(nd).replace(new_name, src.ino)
        if od is not nd:
            for moved, left, joined in ((src, od, nd), (dst, nd, od)):
                if moved.is_dir:
                    left.nlink -= 1
                    joined.nlink += 1
                    moved.parent = joined.ino
        for inode in (src, dst):
            inode.touch(now, ctime=True)
        for d in (od, nd):
            d.touch(now, mtime=True, ctime=True)

    # --- internals: attributes and data --------------------------------------

    def _check_truncate(self, inode: Inode, size: int) -> None:
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {inode.ino} is a directory")
        if not inode.is_reg:
            raise FsError(errno.EINVAL, f"inode {inode.ino} is not a regular file")
        if size < 0:
            raise FsError(errno.EINVAL, f"negative size {size}")
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"size {size} is beyond {MAX_FILE_SIZE}")

    def _truncate(self, inode: Inode, size: int, now: int, *, always_touch: bool = False) -> None:
        """Set a regular file's size; shrinking frees pages. mtime and ctime change when
        the size does (or `always_touch`, as for O_TRUNC)."""
        old = inode.size
        if size < old and inode.pages is not None:
            inode.pages.truncate(self.pool, size)
            if not inode.pages.npages:
                inode.pages = None
        inode.size = size
        if size != old or always_touch:
            inode.touch(now, mtime=True, ctime=True)

    def _chown(self, inode: Inode, uid: int | None, gid: int | None) -> None:
        if uid not in (None, -1):
            inode.uid = intern_int(uid)
        if gid not in (None, -1):
            inode.gid = intern_int(gid)
        if not inode.is_dir:
            mode = inode.mode & ~stat.S_ISUID
            if mode & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
            inode.mode = intern_int(mode)

    def _allocate(self, inode: Inode, off: int, length: int, *, keep_size: bool) -> None:
        end = off + length
        if end > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"fallocate to {end} is beyond {MAX_FILE_SIZE}")
        pages = inode.pages if inode.pages is not None else PageMap()
        if not pages.allocate(self.pool, off, length):
            raise FsError(errno.ENOSPC, f"no room for {length} bytes in inode {inode.ino}")
        inode.pages = pages if pages.npages else None
        if not keep_size and end > inode.size:
            inode.size = end

    def _accessed(self, inode: Inode) -> None:
        """A read or readdir: atime moves as the mount's atime policy says (relatime:
        if it is not newer than mtime or ctime, or a day old)."""
        policy = self.atime
        if policy.mode is AtimeMode.NOATIME or (inode.is_dir and not policy.directories):
            return
        now = self._clock()
        atime = inode.atime_ns
        if (policy.mode is AtimeMode.STRICTATIME or atime <= inode.mtime_ns
                or atime <= inode.ctime_ns or now - atime >= RELATIME_NS):
            inode.atime_ns = now

    def _chmod_acl(self, inode: Inode) -> None:
        """Keep an access ACL in step with a new mode (a chmod)."""
        value = inode.xattrs.get(acl.ACCESS) if inode.xattrs else None
        if value is not None:
            inode.xattrs[acl.ACCESS] = acl.pack(acl.chmod(acl.parse(value), inode.mode))

    def _check_xattr_write(self, inode: Inode, name: bytes, ctx: Ctx) -> None:
        """The Linux rules for changing an xattr: user.* only on regular files and
        directories, trusted.* only by root. (Write permission on the inode is the
        kernel's check.)"""
        namespace = xattr_namespace(name)
        if namespace == b"user." and not (inode.is_reg or inode.is_dir):
            raise FsError(errno.EPERM, "user.* xattrs exist only on files and directories")
        if namespace == b"trusted." and ctx.uid != 0:
            raise FsError(errno.EPERM, "trusted.* xattrs need root")


def inode_table_bytes(inode: Inode) -> int:
    """The bound of what `inode` adds to a handover's inode table (`HandoverReserve`):
    its records, a directory's entries, a symlink's target, its xattrs (the extents are
    the page pool's to count)."""
    total = INODE_BYTES + len(inode.target or b"")
    if inode.dir is not None:
        total += DIRENT_BYTES * len(inode.dir) + sum(map(len, inode.dir.names()))
    if inode.xattrs:
        total += sum(xattr_bytes(k, v) for k, v in inode.xattrs.items())
    return total


def _entries(d: Inode) -> Directory:
    """The entries of an inode already known to be a directory."""
    assert d.dir is not None, f"inode {d.ino} is not a directory"
    return d.dir


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"bad name {name!r}")


def xattr_namespace(name: bytes) -> bytes:
    """The namespace prefix of an xattr name, after checking the name."""
    if not name or len(name) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE, f"xattr name of {len(name)} bytes")
    for prefix in XATTR_NAMESPACES:
        if name.startswith(prefix):
            if len(name) == len(prefix):
                raise FsError(errno.EINVAL, f"xattr name {name!r} is only a namespace")
            if prefix == b"system." and name not in acl.NAMES:
                break       # of system.*, only the POSIX ACLs exist here
            return prefix
    raise FsError(errno.EOPNOTSUPP, f"xattr namespace of {name!r} is not supported")


class _Checker:
    """The consistency checks behind `Filesystem.check`."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.inodes = fs._inodes
        self.problems: list[str] = []

    def run(self, *, pages: bool = True) -> list[str]:
        root = self.inodes.get(ROOT_INO)
        if root is None or root.dir is None or root.parent != ROOT_INO:
            return ["the root directory is missing or malformed"]
        refs, subdirs = self._count_names()
        for inode in self.inodes.values():
            self._check_inode(inode, refs.get(inode.ino, 0), subdirs.get(inode.ino, 0))
        if pages:
            self._check_pages()
        return self.problems

    def _count_names(self) -> tuple[dict[int, int], dict[int, int]]:
        refs: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        for d in self.inodes.values():
            if d.dir is None:
                continue
            for name, ino, _cookie in d.dir.export():
                child = self.inodes.get(ino)
                if child is None:
                    self.problems.append(f"entry {name!r} in {d.ino} names missing inode {ino}")
                    continue
                refs[ino] = refs.get(ino, 0) + 1
                if child.is_dir:
                    subdirs[d.ino] = subdirs.get(d.ino, 0) + 1
                    if child.parent != d.ino:
                        self.problems.append(f"directory {ino} is in {d.ino} but its '..' "
                                             f"is {child.parent}")
        return refs, subdirs

    def _check_inode(self, inode: Inode, refs: int, subdirs: int) -> None:
        ino = inode.ino
        if ino >= self.fs.sb.next_ino:
            self.problems.append(f"inode {ino} is not below next_ino {self.fs.sb.next_ino}")
        if inode.is_dir:
            if inode.dir is None:
                self.problems.append(f"directory {ino} has no entries table")
                return
            linked = ino == ROOT_INO or refs == 1
            expected = 2 + subdirs if linked else 0
            if refs > 1 or (ino == ROOT_INO and refs):
                self.problems.append(f"directory {ino} has {refs} names")
        else:
            expected = refs
        if inode.nlink != expected:
            self.problems.append(f"inode {ino} has nlink {inode.nlink}, expected {expected}")
        if not expected and not (inode.lookups or inode.opens):
            self.problems.append(f"inode {ino} is unreachable, unused and still kept")
        if inode.is_symlink and (inode.target is None or inode.size != len(inode.target)):
            self.problems.append(f"symlink {ino} has a bad target or size")
        if inode.pages is not None and not inode.is_reg:
            self.problems.append(f"inode {ino} of type {inode.file_type.name} has pages")

    def _check_pages(self) -> None:
        starts: list[int] = []
        counts: list[int] = []
        total = 0
        for inode in self.inodes.values():
            if inode.pages is None:
                continue
            extents = inode.pages.extents()
            npages = sum(e[2] for e in extents)
            if npages != inode.pages.npages:
                self.problems.append(f"inode {inode.ino} counts {inode.pages.npages} pages, "
                                     f"maps {npages}")
            total += npages
            starts.extend(e[1] for e in extents)
            counts.extend(e[2] for e in extents)
        if total != self.fs.pool.used_pages:
            self.problems.append(f"files map {total} pages, the pool counts "
                                 f"{self.fs.pool.used_pages}")
        order = np.argsort(np.array(starts, dtype=np.int64))
        s = np.array(starts, dtype=np.int64)[order]
        c = np.array(counts, dtype=np.int64)[order]
        if len(s) > 1 and np.any(s[:-1] + c[:-1] > s[1:]):
            self.problems.append("two files share an arena page")
