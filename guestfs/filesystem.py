"""The filesystem core: every POSIX operation, over the metadata store in the arena.

No FUSE here: the adapter (`fuse_ops`) turns requests into these calls and `FsError`
into errno answers. The kernel mounts with ``default_permissions``, so access bits, the
sticky bit and who may chmod/chown are checked by the kernel before a request arrives;
the core checks what only the filesystem can know (names, types, link counts, space,
limits) and the rules the kernel leaves to it (xattr namespaces, set-gid inheritance,
clearing set-id bits on chown).

Every change is one transaction of the store (`guestfs.store`): when a call returns,
what it did is in the arena and survives a kexec, an unmount and a SIGKILL of the
daemon alike; when it raises `FsError`, nothing changed. A metadata page that fails its
checks makes the call fail with EIO, naming the page, and is never trusted.

The kernel's lookup counts and open counts are this mount's alone and live here, not in
the arena; an inode whose last name goes while it is still open is kept on the store's
orphan list, so that a daemon that dies before the last close does not leak it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from guestfs import acl, fsck
from guestfs.atime import AtimeMode, AtimePolicy
from guestfs.errors import FsError
from guestfs.inode import ROOT_INO, FileType, Inode, intern_int
from guestfs.refs import KernelRefs
from guestfs.store.directory import DOT_COOKIE, DOTDOT_COOKIE
from guestfs.store.journal import Pool, Txn, TxnTooLarge
from guestfs.store.page import CorruptPage
from guestfs.store.pagemap import REGION_SIZE, Extent, Keep, NoRoom
from guestfs.store.store import ORPHAN_FREE, MetaStore
from guestfs.store.superblock import MAX_FILE_SIZE, Superblock
from kho_backend.arena import Arena
from kho_backend.errors import OutOfMemory
from kho_backend.units import PAGE_SIZE

log = logging.getLogger(__name__)

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
#: All names and values of one inode, as ext4 bounds them by its xattr block: a blob is
#: rewritten whole in one transaction.
XATTR_TOTAL_MAX = 1 << 20
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
RELATIME_NS = 24 * 3600 * 10**9
#: Times the kernel can hold: signed 64-bit seconds and nanoseconds.
TIME_MIN_NS = -(1 << 63) * 10**9
TIME_MAX_NS = ((1 << 63) - 1) * 10**9 + 999_999_999
#: The mode of a whiteout (renameat2 RENAME_WHITEOUT): a character device 0:0.
WHITEOUT_MODE = stat.S_IFCHR
#: What a transaction keeps for its own bookkeeping (the inode's record, the
#: superblock, the orphan list) when it frees pages in bulk.
FREE_KEEP = Keep(pages=12, entries=64)
#: Bytes a fallocate or hole punch changes per transaction: two 2 MiB regions of 4 KiB
#: pages are 1024 allocations or frees, half of what one transaction may record.
FALLOCATE_STEP = 2 * REGION_SIZE
#: Unlinked files whose last reference went wait to be freed, at most this many, and are
#: then freed together (see `Filesystem.reap_pending`).
REAP_BATCH = 256
#: Only a small file waits (its data pages at most; a larger one is freed at once), so
#: that the room waiting frees hold stays small next to what writes see.
REAP_SMALL_PAGES = 16
#: What one more inode may add to a batch's transaction: pages journaled (its record
#: page, the inode table's and the orphan list's nodes) and entries (its data pages,
#: its page array, an xattr page, a symlink target's two).
REAP_TXN = (8, REAP_SMALL_PAGES + 8)
#: Free pages above the data floor below which waiting frees are done before any
#: change, so that they never make a write fail for want of room (16 MiB: more than a
#: request writes at once; a fallocate checks its own room).
REAP_LOW_ROOM = 4096


class Ctx(NamedTuple):
    """Who makes a request. The kernel has applied the umask to modes already. (A named
    tuple: one is made for every request that changes something.)"""

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
    """A guestfs filesystem over a metadata store. Inode 1 is the root."""

    def __init__(self, store: MetaStore, *, clock: Callable[[], int] | None = None,
                 atime: AtimePolicy = AtimePolicy()) -> None:
        """The filesystem in `store` (made by `MetaStore.format` or opened by
        `MetaStore.open`). `clock` gives timestamps in ns (default: the wall clock,
        CLOCK_REALTIME, in full nanoseconds: never behind the kernel's coarser clock, so
        a file the filesystem stamps after one the kernel stamped never looks older).
        `atime` is the mount's atime policy."""
        self.store = store
        self.atime = atime
        self._clock = clock or time.time_ns
        self._refs = KernelRefs()
        self._after: list[Callable[[], None]] = []
        #: Orphans no reference holds any more, waiting to be freed (`reap_pending`),
        #: out of the store's cache (so that `get` finds them gone) but kept here.
        self._unreaped: dict[int, Inode] = {}

    @classmethod
    def format(cls, arena: Arena, pool: Pool, *, options: dict[str, str] | None = None,
               max_inodes: int | None = None, clock: Callable[[], int] | None = None,
               atime: AtimePolicy = AtimePolicy()) -> Filesystem:
        """A new empty filesystem in `pool`. Its root directory takes ``mode`` (octal),
        ``uid`` and ``gid`` from `options` (default 755 and the daemon's own ids)."""
        sb = Superblock.new(arena.size, options=options, max_inodes=max_inodes)
        clock = clock or time.time_ns
        now = clock()
        opts = sb.options
        root = Inode(ino=ROOT_INO, mode=stat.S_IFDIR | int(opts.get("mode", "755"), 8),
                     uid=int(opts.get("uid", os.getuid())), gid=int(opts.get("gid", os.getgid())),
                     nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now,
                     generation=sb.ino_generation, parent=ROOT_INO)
        return cls(MetaStore.format(arena, pool, sb, root), clock=clock, atime=atime)

    @property
    def sb(self) -> Superblock:
        """The superblock (read-only use: the store writes it)."""
        return self.store.sb

    # --- introspection (status, tests) ------------------------------------------

    def get(self, ino: int) -> Inode:
        """The inode numbered `ino`; ENOENT if there is none, EIO if its record cannot
        be trusted."""
        if self._unreaped and ino in self._unreaped:    # removed: its free waits
            raise FsError(errno.ENOENT, f"no inode {ino}")
        cache = self.store.inodes           # the usual case, without a call
        inode = cache.get(ino)
        if inode is not None:
            cache.move_to_end(ino)
            return inode
        try:
            inode = self.store.get(ino)
        except CorruptPage as e:
            raise _io_error(e) from None
        if inode is None:
            raise FsError(errno.ENOENT, f"no inode {ino}")
        return inode

    def check(self) -> list[str]:
        """Consistency problems (an fsck of everything in the arena): empty when the
        filesystem is sound."""
        return fsck.check(self.store)

    def extents(self, ino: int) -> list[Extent]:
        """Where a regular file's data lies: (file page, PFN, pages, order) runs."""
        inode = self._regular(ino)
        with _READING:
            return self.store.maps.extents(inode)

    def finish_orphans(self) -> int:
        """Free the inodes left on the orphan list and finish the truncates left half
        done (by a process that ended before their last close, or died); returns how
        many. Run when a filesystem is opened, before it is used; an inode the kernel
        still holds through adopted references (`adopt_kernel_refs`) is left until its
        last reference goes."""
        done = 0
        with _READING:
            orphans = self.store.orphans()
        for ino, value in orphans:
            if value == ORPHAN_FREE:
                if self._refs.held(ino):
                    continue        # a mount adopted with its references still holds it
                self._reap(ino)
            else:
                self._finish_truncate(ino, value)
            done += 1
        return done

    def count_boot(self) -> None:
        """Count one more kernel that took the filesystem over (the superblock's
        generation): run when a handed-over filesystem is opened."""
        with self._change() as txn:
            self.sb.generation += 1
            self.store.save_superblock(txn)

    # --- names ---------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Inode:
        """The inode `name` refers to in directory `parent` (``.`` and ``..`` too).

        ``.`` is answered for an inode of any type: the kernel resolves an NFS-style file
        handle (open_by_handle_at) by looking up ``.`` in the inode it names.
        """
        inode = self.find(parent, name)
        if inode is None:
            raise FsError(errno.ENOENT, f"no entry {name!r} in {parent}")
        return inode

    def find(self, parent: int, name: bytes) -> Inode | None:
        """`lookup`, with None for a name that does not exist (the kernel asks for
        every name before it creates it: no exception for the usual answer)."""
        if name == b".":
            return self.get(parent)
        d = self._dir(parent)
        if name == b"..":
            return self.get(d.parent)
        _check_name(name)
        ino = self._find(d, name)
        return None if ino is None else self.get(ino)

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
        with self._change(inode, d) as txn:
            now = self._clock()
            self.store.dirs.add(txn, d, bytes(new_name), inode.ino, inode.mode)
            inode.nlink += 1
            inode.touch(now, ctime=True)
            d.touch(now, mtime=True, ctime=True)
            self._put(txn, inode, d)
        return inode

    def unlink(self, parent: int, name: bytes, ctx: Ctx) -> None:
        """Remove a non-directory's name; its data lives on while it is open or looked up."""
        d = self._dir(parent)
        if name in (b".", b".."):
            raise FsError(errno.EISDIR, f"cannot unlink {name!r}")
        inode = self._child(d, name)
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"{name!r} is a directory")
        with self._change(inode, d, frees=True) as txn:
            now = self._clock()
            self.store.dirs.remove(txn, d, name)
            inode.nlink -= 1
            inode.touch(now, ctime=True)
            d.touch(now, mtime=True, ctime=True)
            self._put(txn, inode, d)
            self._maybe_free(txn, inode)

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
        if inode.entries:
            raise FsError(errno.ENOTEMPTY, f"directory {name!r} is not empty")
        with self._change(inode, d, frees=True) as txn:
            now = self._clock()
            self.store.dirs.remove(txn, d, name)
            d.nlink -= 1
            inode.nlink = 0
            inode.touch(now, ctime=True)
            d.touch(now, mtime=True, ctime=True)
            self._put(txn, inode, d)
            self._maybe_free(txn, inode)

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
        found = self._find(nd, new_name)
        dst = None if found is None else self.get(found)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT, f"no entry {new_name!r} to exchange with")
            self._exchange(od, old_name, src, nd, new_name, dst)
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST, f"{new_name!r} exists")
        if dst is not None and dst.ino == src.ino:
            return  # two names of one inode: POSIX says rename does nothing
        self._check_move(src, nd, dst)
        whiteout = bool(flags & RENAME_WHITEOUT)
        if whiteout:
            self._check_inode_room()
        with self._change(src, od, nd, *([dst] if dst is not None else [])) as txn:
            now = self._clock()
            self.store.dirs.remove(txn, od, old_name)
            if dst is None:
                self.store.dirs.add(txn, nd, bytes(new_name), src.ino, src.mode)
            else:
                self.store.dirs.replace(txn, nd, new_name, src.ino, src.mode)
                self._drop_name(nd, dst, now)
            if src.is_dir and od.ino != nd.ino:
                od.nlink -= 1
                nd.nlink += 1
                src.parent = nd.ino
            if whiteout:
                gid = od.gid if od.mode & stat.S_ISGID else ctx.gid
                self._new_inode(txn, od, bytes(old_name), WHITEOUT_MODE, ctx.uid, gid, now)
            src.touch(now, ctime=True)
            od.touch(now, mtime=True, ctime=True)
            nd.touch(now, mtime=True, ctime=True)
            self._put(txn, src, od, nd, *([dst] if dst is not None else []))
            if dst is not None:
                self._maybe_free(txn, dst)

    def readlink(self, ino: int) -> bytes:
        """A symlink's target; EINVAL for other types. Moves atime as a read does (the
        kernel asks for it on readlink(2) and on every walk through the link, and moves
        atime of FUSE inodes only through us)."""
        inode = self.get(ino)
        if not inode.is_symlink:
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        self._accessed(inode)
        with _READING:
            return self.store.target(inode)

    # --- attributes ----------------------------------------------------------

    def setattr(self, ino: int, ctx: Ctx, *, mode: int | None = None,
                uid: int | None = None, gid: int | None = None, size: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None,
                ctime_ns: int | None = None) -> Inode:
        """Change the given attributes (None: unchanged); any change sets ctime, to
        `ctime_ns` when given or now. A call that names nothing to change is chown(2)
        with -1, -1 (the kernel's SETATTR with no attribute): it sets ctime too, as
        Linux's own filesystems do (POSIX allows either).

        `size` has truncate semantics (mtime and ctime move, even to the same size); a
        changed uid or gid clears the set-user-ID bit of a non-directory, and its
        set-group-ID bit when group-execute is set (as Linux's chown does, whoever the
        caller); `mode` replaces the permission bits (and the matching entries of an
        access ACL).
        """
        inode = self.get(ino)
        if size is not None:
            self._check_truncate(inode, size)
        # A truncate that shrinks, with nothing else, only frees (mode may rewrite an ACL).
        shrinks = (size is not None and size < inode.size and mode is None and uid is None
                   and gid is None)
        with self._change(inode, frees=shrinks) as txn:
            now = self._clock()
            changed = False
            if size is not None:
                # mtime and ctime move even when the size stays, as POSIX.1-2008 asks
                # and Linux's ftruncate(2) always does (the kernel sends FUSE a
                # truncate without the times and leaves them to us); so do truncate(2)
                # on ext4 and on a tmpfs file that has data.
                self._truncate(txn, inode, size, now, always_touch=True)
                changed = True
            if uid not in (None, -1) or gid not in (None, -1):
                self._chown(inode, uid, gid)
                changed = True
            if mode is not None:
                inode.mode = intern_int(stat.S_IFMT(inode.mode) | stat.S_IMODE(mode))
                self._chmod_acl(txn, inode)
                changed = True
            if atime_ns is not None:
                inode.atime_ns = atime_ns
                changed = True
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
                changed = True
            if ctime_ns is not None:
                inode.ctime_ns = ctime_ns
            elif changed or _asks_nothing(mode, uid, gid, size, atime_ns, mtime_ns):
                inode.ctime_ns = now
            self._put(txn, inode)
        return inode

    # --- file data -----------------------------------------------------------

    def open(self, ino: int, flags: int) -> None:
        """Count an open; O_TRUNC empties a regular file and sets its mtime and ctime."""
        inode = self.get(ino)
        if flags & os.O_TRUNC and inode.is_reg:
            with self._change(inode, frees=True) as txn:
                self._truncate(txn, inode, 0, self._clock(), always_touch=True)
                self._put(txn, inode)
        self._refs.open(ino)

    def release(self, ino: int) -> None:
        """Count a close; the last close of an unlinked, forgotten inode frees it."""
        if self._refs.opens(ino):
            self._refs.release(ino)
            self._let_go(ino)

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
        with _READING:
            return self.store.maps.read(inode, off, size)

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
        written = len(data)
        end = off + written
        maps = self.store.maps
        with self._change(inode) as txn:
            if end > inode.size:
                maps.zero_past_end(inode, inode.size, end)
                maps.write(txn, inode, off, data)
                inode.size = end
            else:
                maps.write(txn, inode, off, data)
            inode.mtime_ns = inode.ctime_ns = self._clock()
            self.store.put(txn, inode)
        return written

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
        end = off + length
        if end > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"fallocate to {end} is beyond {MAX_FILE_SIZE}")
        if mode & FALLOC_FL_PUNCH_HOLE:
            steps = self._punch_steps(inode, off, end)
        else:
            self._check_allocation_room(inode, off, end)
            steps = [(pos, min(end, (pos // FALLOCATE_STEP + 1) * FALLOCATE_STEP))
                     for pos in [off, *range((off // FALLOCATE_STEP + 1) * FALLOCATE_STEP,
                                             end, FALLOCATE_STEP)]]
        # One transaction per step, each within the journal's limits. The room was
        # checked first; should a step still fail (a 2 MiB folio taken where pages
        # would have done), the steps done are kept, as ext4 keeps what it allocated.
        steps = steps or [(end, end)]           # nothing to change: the times still move
        for pos, stop in steps:
            with self._change(inode) as txn:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    self.store.maps.punch_hole(txn, inode, pos, stop - pos)
                else:
                    self.store.maps.allocate(txn, inode, pos, stop - pos)
                    if stop == end and not mode & FALLOC_FL_KEEP_SIZE and end > inode.size:
                        self.store.maps.zero_past_end(inode, inode.size, end)
                        inode.size = end
                if (pos, stop) == steps[-1]:
                    inode.touch(self._clock(), mtime=True, ctime=True)
                self._put(txn, inode)

    def _punch_steps(self, inode: Inode, off: int, end: int) -> list[tuple[int, int]]:
        """The steps of [off, end) that hold pages (a hole punched over a sparse file
        of 2^63 bytes visits only where its pages are)."""
        with _READING:
            extents = self.store.maps.extents(inode)
        ids = sorted({i for p, _, n, _ in extents
                      for i in range(max(off, p * PAGE_SIZE) // FALLOCATE_STEP,
                                     -(-min(end, (p + n) * PAGE_SIZE) // FALLOCATE_STEP))})
        return [(max(off, i * FALLOCATE_STEP), min(end, (i + 1) * FALLOCATE_STEP))
                for i in ids]

    def _check_allocation_room(self, inode: Inode, off: int, end: int) -> None:
        """ENOSPC, with nothing changed, if the pages [off, end) lacks cannot fit."""
        first, last = off // PAGE_SIZE, -(-end // PAGE_SIZE)
        with _READING:
            backed = sum(max(0, min(last, p + n) - max(first, p))
                         for p, _, n, _ in self.store.maps.extents(inode))
        needed = last - first - backed
        if not self.store.data_room(needed) and self._unreaped:
            self.reap_pending()
        if not self.store.data_room(needed):
            raise FsError(errno.ENOSPC, f"no room for {needed} more pages of file data")

    # --- directories ---------------------------------------------------------

    def opendir(self, ino: int) -> None:
        """Check that `ino` is a directory that can be read (ENOENT, ENOTDIR)."""
        self._dir(ino)

    def readdir(self, ino: int, after: int) -> Iterator[tuple[int, bytes, Inode]]:
        """(cookie, name, inode) of the entries past cookie `after`: ``.`` (1), ``..`` (2),
        then the entries in cookie order (see `guestfs.store.directory`). Lazy: the
        caller may stop early and resume later from the last cookie it used, even if the
        directory changed; a walk always ends."""
        d = self._dir(ino)
        self._accessed(d)
        return self._listing(d, after)

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
        with self._change(inode) as txn:
            xattrs = self._xattrs(inode)
            if not value and name in acl.NAMES:
                xattrs.pop(name, None)
            else:
                xattrs[name] = value
            total = sum(len(k) + len(v) for k, v in xattrs.items())
            if total > XATTR_TOTAL_MAX:
                raise FsError(errno.ENOSPC, f"the xattrs of inode {ino} would hold {total} "
                                            f"bytes (at most {XATTR_TOTAL_MAX})")
            self.store.set_xattrs(txn, inode, xattrs)
            if bits is not None:
                inode.mode = intern_int(inode.mode & ~0o777 | bits)
            inode.touch(self._clock(), ctime=True)
            self._put(txn, inode)

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

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """An extended attribute's value; ENODATA if it is not set."""
        value = self.find_xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA, f"no xattr {name!r} on inode {ino}")
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """An extended attribute's value, or None if it is not set (`getxattr` without
        the exception: the kernel asks for security.capability before every write, and
        the usual inode has no xattr at all, so the answer needs no read either)."""
        inode = self.get(ino)
        xattr_namespace(name)
        return self._xattrs(inode).get(name) if inode.xattr else None

    def listxattr(self, ino: int) -> list[bytes]:
        """The names of the inode's extended attributes."""
        return list(self._xattrs(self.get(ino)))

    def listxattr_items(self, ino: int) -> list[tuple[bytes, bytes]]:
        """The inode's extended attributes as (name, value) pairs."""
        return list(self._xattrs(self.get(ino)).items())

    def removexattr(self, ino: int, name: bytes, ctx: Ctx) -> None:
        """Remove an extended attribute; ENODATA if it is not set, but a POSIX ACL that
        is not set is removed without a word, as Linux's own filesystems do (the
        kernel's remove_acl sets no ACL; tmpfs and ext4 answer 0)."""
        inode = self.get(ino)
        self._check_xattr_write(inode, name, ctx)
        xattrs = self._xattrs(inode)
        if name not in xattrs:
            if name in acl.NAMES:
                return
            raise FsError(errno.ENODATA, f"no xattr {name!r} on inode {ino}")
        del xattrs[name]
        with self._change(inode, frees=True) as txn:
            self.store.set_xattrs(txn, inode, xattrs)
            inode.touch(self._clock(), ctime=True)
            self._put(txn, inode)

    # --- the whole filesystem ------------------------------------------------

    def statfs(self, *, reap: bool = True) -> StatFs:
        """Real figures: blocks are arena pages (held by the filesystem + free); the
        pages kept for metadata and for the next handover are free but not available,
        as a filesystem's reserved blocks, so `f_bavail` is the room writes still have.
        Waiting frees are done first (unless not to `reap`: the daemon's status shows
        them), so that a file just removed counts as free."""
        if reap and self._unreaped:
            self.reap_pending()
        free = self.store.free_pages()
        ffree = max(self.sb.max_inodes - self.sb.inode_count, 0)
        return StatFs(f_bsize=PAGE_SIZE, f_frsize=PAGE_SIZE,
                      f_blocks=self.store.pool.nr_pages + free, f_bfree=free,
                      f_bavail=max(free - self.store.data_floor(), 0),
                      f_files=self.sb.max_inodes, f_ffree=ffree, f_favail=ffree,
                      f_namemax=NAME_MAX)

    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel took `n` more lookup references to `ino`."""
        self.get(ino)
        self._refs.add_lookups(ino, n)

    def references(self, ino: int) -> tuple[int, int]:
        """(lookups, opens) the kernel holds on `ino` in this mount."""
        return self._refs.lookups(ino), self._refs.opens(ino)

    def kernel_refs(self) -> KernelRefs:
        """The kernel's references to this filesystem's inodes (they belong to the
        kernel's mount, which may outlive this object: see `adopt_kernel_refs`)."""
        return self._refs

    def adopt_kernel_refs(self, refs: KernelRefs) -> None:
        """Take over the references the kernel's mount holds, from a `Filesystem` of
        the same filesystem that this one replaces while the mount stays (an in-process
        re-boot); before this one answers any request."""
        self._refs = refs

    def forget_session(self) -> None:
        """The kernel's mount of this filesystem ended: its lookups and opens are gone,
        and inodes no name reaches any more are freed (before mounting again). Those
        are on the orphan list (an inode that loses its last name while held goes
        there), so the work follows the orphans, not the inodes the kernel held."""
        self._refs.clear()
        self._unreaped.clear()      # orphans all: settled below
        with _READING:
            orphans = self.store.orphans()
        for ino, _value in orphans:
            self._settle(ino)

    @property
    def waiting_frees(self) -> int:
        """Unlinked files whose free waits (see `reap_pending`)."""
        return len(self._unreaped)

    def reap_pending(self) -> int:
        """Free the unlinked files whose frees wait; returns how many were freed.

        When the last reference to a small unlinked file goes, its free waits (as XFS
        defers the inactivation of unlinked inodes to a background worker), so that one
        transaction frees many: their record pages and the orphan list's leaf are
        journaled once for the batch, not once per file, and the forget that let the file
        go costs next to nothing. Every waiting file is on the orphan list, so a crash or
        a handover loses nothing: the next mount frees it. They are freed when
        `REAP_BATCH` wait, by the daemon between requests, before a change when room runs
        low (`REAP_LOW_ROOM`), before statfs answers, and before a handover. A batch
        that fails is retried a file at a time; a file that still fails stays an orphan
        (logged), for the next mount."""
        pending = [inode for ino, inode in self._unreaped.items() if not self._held(ino)]
        self._unreaped.clear()
        done = 0
        while done < len(pending):
            try:
                done += self._reap_batch(pending[done:])
            except FsError as e:
                log.warning("freeing %d unlinked files together failed (%s); freeing them "
                            "one at a time", len(pending) - done, e)
                return done + self._reap_each(pending[done:])
        return done

    def _reap_batch(self, inodes: list[Inode]) -> int:
        """Free as many of `inodes` (orphans nothing holds) as one transaction takes."""
        freed = 0
        with self._change(frees=True) as txn:
            for inode in inodes:
                if freed and not txn.affords(*REAP_TXN):
                    break
                self._free(txn, inode)
                freed += 1
        return freed

    def _reap_each(self, inodes: list[Inode]) -> int:
        freed = 0
        for inode in inodes:
            try:
                self._settle(inode.ino)
                freed += 1
            except FsError as e:
                log.error("could not free unlinked inode %d (it stays on the orphan list "
                          "for the next mount): %s", inode.ino, e)
        return freed

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped `n` lookup references; may free an unlinked inode.
        Never fails: the kernel does not expect an answer."""
        if not self._refs.lookups(ino):
            return
        self._refs.drop_lookups(ino, n)
        try:
            self._let_go(ino)
        except FsError as e:
            log.error("could not free inode %d after its last reference: %s", ino, e)

    # --- internals: transactions ------------------------------------------------

    def _change(self, *inodes: Inode, frees: bool = False) -> _Change:
        """A transaction of the store changing `inodes`, as ``with self._change(...) as
        txn:``, with its failures as errno answers: after a rollback those objects hold
        what the arena holds again. Work queued in `_after` (frees too large for one
        transaction) runs once it committed. One that `frees` (takes things away only)
        may use the pages metadata leaves for removals (`store.REMOVAL_RESERVE`)."""
        return _Change(self, inodes, frees)

    def _put(self, txn: Txn, *inodes: Inode) -> None:
        put = self.store.put
        if len(inodes) == 1:
            put(txn, inodes[0])
            return
        done: list[Inode] = []
        for inode in inodes:
            if not any(inode is earlier for earlier in done):   # od is nd
                put(txn, inode)
                done.append(inode)

    # --- internals: lookups --------------------------------------------------

    def _dir(self, ino: int) -> Inode:
        inode = self.get(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return inode

    def _regular(self, ino: int) -> Inode:
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {ino} is a directory")
        if not inode.is_reg:
            raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
        return inode

    def _find(self, d: Inode, name: bytes) -> int | None:
        with _READING:
            found = self.store.dirs.lookup(d, name)
        return None if found is None else found[1]

    def _child(self, d: Inode, name: bytes) -> Inode:
        _check_name(name)
        ino = self._find(d, name)
        if ino is None:
            raise FsError(errno.ENOENT, f"no entry {name!r} in {d.ino}")
        return self.get(ino)

    def _listing(self, d: Inode, after: int) -> Iterator[tuple[int, bytes, Inode]]:
        if after < DOT_COOKIE:
            yield DOT_COOKIE, b".", d
        if after < DOTDOT_COOKIE:
            yield DOTDOT_COOKIE, b"..", self.get(d.parent)
        store = self.store

        def root() -> int:
            current = store.get(d.ino)
            return current.tree if current is not None else 0
        entries = store.dirs.entries_after(root, d.ino, after)
        while True:
            with _READING:
                item = next(entries, None)
            if item is None:
                return
            cookie, name, ino = item
            yield cookie, name, self.get(ino)

    def _is_within(self, d: Inode, top: Inode) -> bool:
        """True if directory `d` is `top` or lies below it."""
        while d.ino != top.ino:
            if d.ino == ROOT_INO:
                return False
            d = self.get(d.parent)
        return True

    def _xattrs(self, inode: Inode) -> dict[bytes, bytes]:
        with _READING:
            return self.store.xattrs(inode)

    # --- internals: creating and dropping ------------------------------------

    def _check_inode_room(self) -> None:
        if self._unreaped and self.sb.inode_count >= self.sb.max_inodes:
            self.reap_pending()
        if self.sb.inode_count >= self.sb.max_inodes:
            raise FsError(errno.ENOSPC, f"all {self.sb.max_inodes} inodes are in use")

    def _check_new_name(self, d: Inode, name: bytes) -> None:
        _check_name(name)
        if name in (b".", b"..") or self._find(d, name) is not None:
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
        if d.xattr and target is None:
            bits, xattrs = self._inherited_acls(d, mode)
            mode = mode & ~0o777 | bits
        with self._change(d) as txn:
            inode = self._new_inode(txn, d, bytes(name), mode, ctx.uid, gid, self._clock(),
                                    rdev=rdev, target=target, xattrs=xattrs)
        return inode

    def _new_inode(self, txn: Txn, d: Inode, name: bytes, mode: int, uid: int, gid: int,
                   now: int, *, rdev: int = 0, target: bytes | None = None,
                   xattrs: dict[bytes, bytes] | None = None) -> Inode:
        """Enter a new inode as `name` in `d` (checks done), in transaction `txn`."""
        is_dir = stat.S_ISDIR(mode)
        ino = self.store.new_ino(txn)
        inode = Inode(ino=ino, mode=intern_int(mode), uid=intern_int(uid),
                      gid=intern_int(gid), nlink=2 if is_dir else 1,
                      atime_ns=now, mtime_ns=now, ctime_ns=now,
                      generation=self.sb.ino_generation, rdev=rdev)
        if target is not None:
            self.store.set_target(txn, inode, target)
        if xattrs:
            self.store.set_xattrs(txn, inode, xattrs)
        if is_dir:
            inode.parent = d.ino
            d.nlink += 1
        self.store.dirs.add(txn, d, name, ino, mode)
        d.touch(now, mtime=True, ctime=True)
        self._put(txn, inode, d)
        return inode

    def _inherited_acls(self, d: Inode, mode: int) -> tuple[int, dict[bytes, bytes]]:
        """(permission bits, ACL xattrs) of a new inode of `mode` in directory `d`: what
        d's default ACL gives it (the mode's own bits and nothing without one)."""
        default = self._xattrs(d).get(acl.DEFAULT)
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

    def _maybe_free(self, txn: Txn, inode: Inode) -> None:
        """`inode` may have lost its last name: free it now if nothing holds it, or put
        it on the orphan list until the last reference goes."""
        if inode.nlink or inode.ino == ROOT_INO:
            return
        if self._held(inode.ino):
            self.store.add_orphan(txn, inode.ino)
            return
        self._free(txn, inode)

    def _held(self, ino: int) -> bool:
        """Whether the kernel still holds `ino` (a lookup or an open)."""
        return self._refs.held(ino)

    def _stored(self, ino: int) -> Inode | None:
        """Inode `ino` from the store, or None (EIO if its record cannot be trusted)."""
        with _READING:
            return self.store.get(ino)

    def _let_go(self, ino: int) -> None:
        """A reference to `ino` went: if it was its last and no name is left, free it, or
        let a small file wait to be freed with others (`reap_pending`)."""
        inode = self._unreachable(ino)
        if inode is None:
            return
        if not self._may_wait(inode):
            with self._change(inode, frees=True) as txn:
                self._free(txn, inode)
            return
        self._unreaped[ino] = inode
        self.store.forget_inode(ino)    # so that `get` finds it gone
        if len(self._unreaped) >= REAP_BATCH:
            self.reap_pending()

    def _may_wait(self, inode: Inode) -> bool:
        """Whether freeing `inode` fits its share of a batch (`REAP_TXN`): a small file,
        its xattrs in a page."""
        if inode.is_dir or inode.npages > REAP_SMALL_PAGES:
            return False
        with _READING:
            return not self.store.xattrs_span_pages(inode, 1)

    def _settle(self, ino: int) -> None:
        """Free `ino` now if nothing holds it and no name is left."""
        inode = self._unreachable(ino)
        if inode is not None:
            with self._change(inode, frees=True) as txn:
                self._free(txn, inode)

    def _unreachable(self, ino: int) -> Inode | None:
        """Inode `ino` if nothing holds it and no name is left (it is to be freed)."""
        if self._held(ino):
            return None
        inode = self._stored(ino)
        if inode is None or inode.nlink or ino == ROOT_INO:
            return None
        return inode

    def _free(self, txn: Txn, inode: Inode) -> None:
        """Free an inode nobody can reach: in this transaction if it fits, else it goes
        on the orphan list now and is freed in steps once this transaction committed."""
        self._unreaped.pop(inode.ino, None)     # freed here: it waits no more
        if inode.is_reg and not self.store.maps.release(txn, inode, FREE_KEEP):
            self.store.add_orphan(txn, inode.ino)
            self._put(txn, inode)
            self._after.append(lambda: self._reap(inode.ino))
            return
        self.store.free_owned(txn, inode)
        self.store.remove_orphan(txn, inode.ino)
        self.store.remove(txn, inode.ino)

    def _reap(self, ino: int) -> None:
        """Free an orphan, in as many transactions as its pages need."""
        while True:
            inode = self._stored(ino)
            if inode is None:
                with self._change(frees=True) as txn:
                    self.store.remove_orphan(txn, ino)
                return
            with self._change(inode, frees=True) as txn:
                if inode.is_reg and not self.store.maps.release(txn, inode, FREE_KEEP):
                    self._put(txn, inode)
                    continue
                self.store.free_owned(txn, inode)
                self.store.remove_orphan(txn, ino)
                self.store.remove(txn, ino)
                return

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
            if dst.is_dir and dst.entries:
                raise FsError(errno.ENOTEMPTY, f"directory {dst.ino} is not empty")
        moves_dir = src.is_dir and src.parent != nd.ino
        if moves_dir and (dst is None or not dst.is_dir) and nd.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK, f"directory {nd.ino} has too many subdirectories")

    def _exchange(self, od: Inode, old_name: bytes, src: Inode,
                  nd: Inode, new_name: bytes, dst: Inode) -> None:
        """RENAME_EXCHANGE: the two names swap inodes."""
        if src.ino == dst.ino:
            return
        if (src.is_dir and self._is_within(nd, src)) or (dst.is_dir and self._is_within(od, dst)):
            raise FsError(errno.EINVAL, "cannot exchange a directory with its own descendant")
        if od.ino != nd.ino and src.is_dir != dst.is_dir:
            # One directory changes parent: its new parent gains a link.
            joined = nd if src.is_dir else od
            if joined.nlink >= LINK_MAX:
                raise FsError(errno.EMLINK, f"directory {joined.ino} has too many "
                                            "subdirectories")
        with self._change(src, dst, od, nd) as txn:
            now = self._clock()
            self.store.dirs.replace(txn, od, old_name, dst.ino, dst.mode)
            self.store.dirs.replace(txn, nd, new_name, src.ino, src.mode)
            if od.ino != nd.ino:
                for moved, left, joined in ((src, od, nd), (dst, nd, od)):
                    if moved.is_dir:
                        left.nlink -= 1
                        joined.nlink += 1
                        moved.parent = joined.ino
            for inode in (src, dst):
                inode.touch(now, ctime=True)
            for d in (od, nd):
                d.touch(now, mtime=True, ctime=True)
            self._put(txn, src, dst, od, nd)

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

    def _truncate(self, txn: Txn, inode: Inode, size: int, now: int, *,
                  always_touch: bool = False) -> None:
        """Set a regular file's size; shrinking frees pages (in later transactions too,
        when they are too many for this one: the orphan list finishes the job after a
        crash). mtime and ctime change when the size does (or `always_touch`)."""
        old = inode.size
        if size < old and not self.store.maps.truncate(txn, inode, size, FREE_KEEP):
            self.store.add_orphan(txn, inode.ino, size)
            self._after.append(lambda: self._finish_truncate(inode.ino, size))
        elif size > old:
            self.store.maps.zero_past_end(inode, old, size)
        inode.size = size
        if size != old or always_touch:
            inode.touch(now, mtime=True, ctime=True)

    def _finish_truncate(self, ino: int, size: int) -> None:
        """Free what a truncate to `size` left past it, in as many transactions as that
        takes."""
        while True:
            inode = self._stored(ino)
            with self._change(*([inode] if inode is not None else []), frees=True) as txn:
                if inode is None:
                    self.store.remove_orphan(txn, ino)
                    return
                done = self.store.maps.truncate(txn, inode, max(size, inode.size),
                                                FREE_KEEP)
                self._put(txn, inode)
                if done:
                    if inode.nlink or ino == ROOT_INO:
                        self.store.remove_orphan(txn, ino)
                    else:       # unlinked: freed with its last reference, or now
                        self.store.add_orphan(txn, ino)
                        if not self._held(ino):
                            self._after.append(lambda: self._reap(ino))
                    return

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

    def _accessed(self, inode: Inode) -> None:
        """A read, readdir or readlink: atime moves as the mount's atime policy says (relatime:
        if it is not newer than mtime or ctime, or a day old)."""
        policy = self.atime
        if policy.mode is AtimeMode.NOATIME or (inode.is_dir and not policy.directories):
            return
        now = self._clock()
        atime = inode.atime_ns
        if (policy.mode is AtimeMode.STRICTATIME or atime <= inode.mtime_ns
                or atime <= inode.ctime_ns or now - atime >= RELATIME_NS):
            with self._change(inode) as txn:
                inode.atime_ns = now
                self._put(txn, inode)

    def _chmod_acl(self, txn: Txn, inode: Inode) -> None:
        """Keep an access ACL in step with a new mode (a chmod)."""
        if not inode.xattr:
            return
        xattrs = self._xattrs(inode)
        value = xattrs.get(acl.ACCESS)
        if value is not None:
            xattrs[acl.ACCESS] = acl.pack(acl.chmod(acl.parse(value), inode.mode))
            self.store.set_xattrs(txn, inode, xattrs)

    def _check_xattr_write(self, inode: Inode, name: bytes, ctx: Ctx) -> None:
        """The Linux rules for changing an xattr: user.* only on regular files and
        directories, trusted.* only by root. (Write permission on the inode is the
        kernel's check.)"""
        namespace = xattr_namespace(name)
        if namespace == b"user." and not (inode.is_reg or inode.is_dir):
            raise FsError(errno.EPERM, "user.* xattrs exist only on files and directories")
        if namespace == b"trusted." and ctx.uid != 0:
            raise FsError(errno.EPERM, "trusted.* xattrs need root")


def _io_error(e: CorruptPage | TxnTooLarge) -> FsError:
    """The EIO answer to metadata that failed its checks, logged with what it was."""
    log.error("%s", e)
    return FsError(errno.EIO, str(e))


class _Reading:
    """``with _READING:``: CorruptPage and TxnTooLarge become EIO. A class, not a
    generator-based context manager: nearly every request enters one."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if isinstance(exc, (CorruptPage, TxnTooLarge)):
            raise _io_error(exc) from None


_READING = _Reading()


class _Change:
    """`Filesystem._change`: one transaction of the store, failures as errno answers,
    then the work it queued."""

    __slots__ = ("frees", "fs", "inodes", "queued", "txn")

    def __init__(self, fs: Filesystem, inodes: tuple[Inode, ...], frees: bool) -> None:
        self.fs = fs
        self.inodes = inodes
        self.frees = frees

    def __enter__(self) -> Txn:
        fs = self.fs
        if fs._unreaped and not fs.store.data_room(REAP_LOW_ROOM):
            fs.reap_pending()
        self.queued = len(fs._after)
        self.txn = fs.store.begin(frees=self.frees)
        return self.txn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        fs = self.fs
        try:
            fs.store.end(self.txn, failed=exc_type is not None)     # commit, or roll back
        except BaseException as e:                       # the commit failed
            failure: BaseException | None = e
        else:
            failure = exc
        if failure is None:
            if len(fs._after) > self.queued:
                self._run_after()
            return False
        answer = self._rolled_back(failure)
        if answer is exc:
            return False                                 # the block's own exception
        if answer is failure:
            raise answer
        raise answer from None

    def _rolled_back(self, failure: BaseException) -> BaseException:
        """After a rollback: the inode objects are read again; returns the exception to
        raise (the failure, or its errno answer)."""
        fs = self.fs
        del fs._after[self.queued:]                      # this transaction's follow-up
        if isinstance(failure, (CorruptPage, TxnTooLarge)):
            failure = _io_error(failure)
        with _READING:
            for inode in self.inodes:
                fs.store.refresh(inode)
        if isinstance(failure, (NoRoom, OutOfMemory)):
            return FsError(errno.ENOSPC, str(failure))
        return failure

    def _run_after(self) -> None:
        after = self.fs._after
        while len(after) > self.queued:
            work = after.pop(self.queued)
            try:
                work()
            except FsError as e:
                # The change committed; what is left stays on the orphan list, which
                # the next mount finishes.
                log.error("finishing a committed change failed: %s", e)


def _asks_nothing(mode: int | None, uid: int | None, gid: int | None, size: int | None,
                  atime_ns: int | None, mtime_ns: int | None) -> bool:
    """True when a setattr names no attribute to change (-1 is chown's "unchanged")."""
    return (mode is None and size is None and atime_ns is None and mtime_ns is None
            and uid in (None, -1) and gid in (None, -1))


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"bad name {name!r}")


def xattr_namespace(name: bytes) -> bytes:
    """The namespace prefix of an xattr name, after checking the name."""
    return _namespace(bytes(name))


# The kernel asks for the same few names all the time (security.capability before every
# write, the ACLs): their answers are remembered (refusals are not: they raise).
@functools.lru_cache(maxsize=1024)
def _namespace(name: bytes) -> bytes:
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
