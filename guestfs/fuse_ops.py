"""The pyfuse3 adapter: a thin layer that turns FUSE requests into `Filesystem` calls.

Every handler goes through `_handler`, which

* admits the request through the `RequestGate` (the quiesce point for kexec),
* answers `FsError` with its errno,
* logs any other exception with its traceback and answers ``EIO``, because pyfuse3
  ends ``pyfuse3.main`` on anything that is not a `pyfuse3.FUSEError` and the mount
  must stay up.

File and directory handles are numbers into a table of what one open needs beyond the
inode (the core counts opens per inode): whether a file was opened with ``O_DIRECT``, and
where a directory walk ends.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from guestfs.errors import FsError
from guestfs.filesystem import Ctx, Filesystem
from guestfs.inode import Inode
from guestfs.refs import InodeSet

log = logging.getLogger(__name__)

ROOT_INO = pyfuse3.ROOT_INODE

# Every change reaches this filesystem through this one kernel mount, and with it the
# kernel drops what that request may change: the attributes of the inodes a create,
# link, unlink, rename, setattr or xattr change touches (fuse_dir_changed,
# fuse_invalidate_attr, fuse_update_ctime), size, times and blocks after a write,
# atime after a read, a readdir or a readlink (fuse_invalidate_atime: the core moves atime
# itself, under relatime too). What the core computes on its own therefore always
# comes with a request that invalidates it, and the kernel may keep entries (negative
# ones too: names appear only through this kernel) and attributes for long; other uids
# of an allow_other mount share the same caches. tests/mount/test_mount_caching.py
# checks each case. An hour rather than for ever, should a case be missed.
ATTR_TIMEOUT = 3600.0
ENTRY_TIMEOUT = 3600.0
#: Seconds an O_DIRECT write waits for the kernel to drop the file's cached pages.
INVALIDATE_WAIT = 1.0

T = TypeVar("T")


class Traffic(enum.Enum):
    """Which requests a partly frozen gate still lets through."""

    # What syncfs needs to drain the page cache (dirty pages of shared writable
    # mappings): write and setattr, plus release/forget (flush and fsync the kernel
    # answers itself: see Operations).
    WRITEBACK = enum.auto()
    GENERAL = enum.auto()  # everything else
    # Requests that touch only the adapter's own handles, never the filesystem (closing
    # a directory): always admitted, so that the directory the quiesce itself opened
    # closes while requests are held.
    HANDLES = enum.auto()


class RequestGate:
    """Admission control for FUSE requests, the quiesce point of a kexec.

    `freeze` makes new requests wait at the gate (requests already inside go on);
    `wait_idle` returns once no admitted request is in flight; `thaw` lets the waiting
    requests in. ``freeze(admit_writeback=True)`` still admits `Traffic.WRITEBACK`, so a
    ``syncfs`` of the mount (whose requests come through here) can flush the kernel's
    dirty pages before the full freeze; a full freeze followed by ``syncfs`` would
    deadlock. The quiesce sequence, from the daemon's trio loop:

    1. open the mount root in a worker thread (the open itself sends OPENDIR);
    2. ``freeze(admit_writeback=True)``; ``mounts.syncfs(fd, mountpoint)`` in a worker
       thread;
    3. ``freeze()``; ``await wait_idle()``.

    Requests held at the gate keep their pyfuse3 worker tasks, so ``pyfuse3.main`` can
    only return after `thaw`.
    """

    def __init__(self) -> None:
        self._admitted: frozenset[Traffic] = frozenset(Traffic)
        self._open = True           # everything admitted and not shut: the fast path
        self._in_flight = 0
        self._changed = trio.Event()
        self._shut = False
        self._idle_waiters = 0

    @property
    def frozen(self) -> bool:
        """True while some kind of request is held at the gate."""
        return self._admitted != frozenset(Traffic)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished."""
        return self._in_flight

    def freeze(self, *, admit_writeback: bool = False) -> None:
        """Hold new requests (all, or all but writeback) at the gate."""
        admitted = {Traffic.HANDLES, Traffic.WRITEBACK} if admit_writeback else {Traffic.HANDLES}
        self._admitted = frozenset(admitted)
        self._open = False
        self._notify()

    def thaw(self) -> None:
        """Admit every request again, including those waiting."""
        self._admitted = frozenset(Traffic)
        self._open = not self._shut
        self._notify()

    async def wait_idle(self) -> None:
        """Wait until no admitted request is in flight."""
        self._idle_waiters += 1
        try:
            while self._in_flight:
                await self._changed.wait()
        finally:
            self._idle_waiters -= 1

    def shut(self) -> None:
        """After a kexec's handover: answer every waiting and later request with EIO,
        without running it (the state it would change has already been handed over)."""
        self._shut = True
        self._open = False
        self.thaw()

    def try_enter(self, traffic: Traffic) -> bool:
        """Count the request as in flight if `traffic` is admitted now (the common case,
        without a trip through the event loop); False if it must `enter`."""
        if self._open or (traffic in self._admitted and not self._shut):
            self._in_flight += 1
            return True
        return False

    async def enter(self, traffic: Traffic) -> None:
        """Wait until `traffic` is admitted, then count the request as in flight."""
        while traffic not in self._admitted:
            await self._changed.wait()
        if self._shut:
            raise pyfuse3.FUSEError(errno.EIO)
        self._in_flight += 1

    def leave(self) -> None:
        """Count a request admitted by `enter` as finished."""
        self._in_flight -= 1
        if not self._in_flight and self._idle_waiters:
            self._notify()

    def _notify(self) -> None:
        # trio events cannot be cleared: wake everybody and start a new one.
        self._changed.set()
        self._changed = trio.Event()


def _handler(traffic: Traffic = Traffic.GENERAL, *, mutates: bool = False
             ) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Wrap a handler: gate, read-only check, and errors turned into FUSE errnos."""

    def decorate(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(self: Operations, *args: Any) -> T:
            gate = self.gate
            if not gate.try_enter(traffic):
                await gate.enter(traffic)
            try:
                if mutates and self.config.read_only:
                    raise pyfuse3.FUSEError(errno.EROFS)
                return await fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except FsError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            except Exception:
                log.exception("%s%r failed; answering EIO", fn.__name__, args)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                gate.leave()

        return wrapper

    return decorate


def _notification(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Wrap a request that gets no answer (forget): pyfuse3 does not catch even
    FUSEError around it, so every exception is logged and swallowed here."""

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> None:
        if not self.gate.try_enter(Traffic.WRITEBACK):
            try:
                await self.gate.enter(Traffic.WRITEBACK)
            except pyfuse3.FUSEError:
                return      # the gate is shut after a handover: nothing to do any more
        try:
            await fn(self, *args)
        except Exception:
            log.exception("%s%r failed", fn.__name__, args)
        finally:
            self.gate.leave()

    return wrapper


@dataclass(frozen=True)
class AdapterConfig:
    """Behaviour switches of the adapter."""

    read_only: bool = False


def entry_attributes(inode: Inode) -> pyfuse3.EntryAttributes:
    """The kernel's view of an `Inode`."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = inode.ino
    attr.generation = inode.generation
    attr.st_mode = inode.mode
    attr.st_nlink = inode.nlink
    attr.st_uid = inode.uid
    attr.st_gid = inode.gid
    attr.st_rdev = inode.rdev
    attr.st_size = inode.size
    attr.st_blksize = 4096
    attr.st_blocks = inode.blocks
    attr.st_atime_ns = inode.atime_ns
    attr.st_mtime_ns = inode.mtime_ns
    attr.st_ctime_ns = inode.ctime_ns
    attr.attr_timeout = ATTR_TIMEOUT
    attr.entry_timeout = ENTRY_TIMEOUT
    return attr


def _negative_entry() -> pyfuse3.EntryAttributes:
    # st_ino 0 lets the kernel cache "no such name"; every create goes through the same
    # kernel, which replaces the negative dentry itself.
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 0
    attr.entry_timeout = ENTRY_TIMEOUT
    return attr


def _quietly(call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except OSError as e:
        log.warning("cache invalidation failed: %s", e)


def _ctx(ctx: pyfuse3.RequestContext) -> Ctx:
    return Ctx(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)


@dataclass(slots=True)
class OpenFile:
    """One open of a regular file (or other non-directory)."""

    ino: int
    direct: bool        # opened with O_DIRECT: its writes bypass the kernel's page cache


@dataclass(slots=True)
class OpenDir:
    """One open of a directory."""

    ino: int


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers over a `Filesystem`.

    No writeback cache: every write(2) reaches `write` before it returns, so a write the
    arena cannot hold fails with ENOSPC where the writer sees it, and every time is
    stamped here, from one clock. POSIX ACLs are on (the kernel enforces them, the core
    keeps them), and lookups of ``.`` make file handles (NFS export, open_by_handle_at)
    work.

    flush, fsync and fsyncdir are left to pyfuse3's ENOSYS on purpose: a write and every
    other change are in the arena when their request returns, so there is nothing to
    do, and on ENOSYS the kernel stops sending them (no_flush, no_fsync, no_fsyncdir)
    and answers them itself, after it has written back dirty mapped pages as before:
    one request less for every close(2), which ``tar x`` and ``cp -a`` make per file.
    """

    enable_writeback_cache = False
    enable_acl = True
    supports_dot_lookup = True

    def __init__(self, fs: Filesystem, gate: RequestGate | None = None,
                 config: AdapterConfig | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.gate = gate or RequestGate()
        self.config = config or AdapterConfig()
        #: Called when the kernel's INIT request arrives: the moment the mount answers.
        self.on_init: Callable[[], None] | None = None
        self._handles: dict[int, OpenFile | OpenDir] = {}
        self._next_fh = 1
        #: Inodes whose pages the kernel may hold in its page cache: a buffered read or
        #: write went through since their cache was last dropped.
        #: A set of masks, not of ints: a tree read whole puts every inode in it, and it
        #: is handed over at a kexec that keeps the mount (`guestfs.connection`).
        self._cached = InodeSet()

    def open_handles(self) -> tuple[list[tuple[int, int, bool, bool]], int, InodeSet]:
        """What a FUSE connection kept across a kexec carries of this adapter: (fh, ino,
        is a directory, O_DIRECT) of every open, the next fh, the inodes maybe cached
        (the set itself, not a copy: taken while no request runs)."""
        table = [(fh, h.ino, isinstance(h, OpenDir), isinstance(h, OpenFile) and h.direct)
                 for fh, h in self._handles.items()]
        return table, self._next_fh, self._cached

    def adopt(self, fs: Filesystem, handles: Sequence[tuple[int, int, bool, bool]],
              next_fh: int, cached: InodeSet) -> None:
        """Serve `fs` (the next kernel's) over this same connection, with the opens and
        cache hints it was handed (the counterpart of `open_handles`)."""
        self.fs = fs
        self._handles = {fh: OpenDir(ino) if is_dir else OpenFile(ino, direct)
                         for fh, ino, is_dir, direct in handles}
        self._next_fh = next_fh
        self._cached = cached

    def _open_handle(self, handle: OpenFile | OpenDir) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _file(self, fh: int) -> OpenFile:
        handle = self._handles.get(fh)
        if not isinstance(handle, OpenFile):
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    def _dir_handle(self, fh: int) -> OpenDir:
        handle = self._handles.get(fh)
        if not isinstance(handle, OpenDir):
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    def init(self) -> None:
        """pyfuse3 calls this on the kernel's INIT request."""
        if self.on_init is not None:
            self.on_init()

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """Hand an entry to the kernel: it now holds one more lookup reference."""
        self.fs.ref(inode.ino)
        return entry_attributes(inode)

    # --- names -------------------------------------------------------------------

    @_handler()
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            inode = self.fs.find(parent_inode, name)
        except FsError as e:
            if e.errno == errno.ENOENT:
                return _negative_entry()
            raise
        if inode is None:
            return _negative_entry()
        return self._entry(inode)

    @_notification
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.fs.forget(ino, nlookup)
            if not self.fs.references(ino)[0]:
                # The kernel evicted the inode, and its cached pages with it.
                self._cached.discard(ino)

    @_handler()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.fs.get(inode))

    @_handler(Traffic.WRITEBACK, mutates=True)
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # UTIME_NOW is already resolved into attr by pyfuse3, from CLOCK_REALTIME (the
        # core's clock too).
        changed = self.fs.setattr(
            inode, _ctx(ctx),
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return entry_attributes(changed)

    @_handler()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_handler(mutates=True)
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.mknod(parent_inode, name, mode, rdev, _ctx(ctx)))

    @_handler(mutates=True)
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.mkdir(parent_inode, name, mode, _ctx(ctx)))

    @_handler(mutates=True)
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.symlink(parent_inode, name, target, _ctx(ctx)))

    @_handler(mutates=True)
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.link(inode, new_parent_inode, new_name, _ctx(ctx)))

    @_handler(mutates=True)
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.unlink(parent_inode, name, _ctx(ctx))

    @_handler(mutates=True)
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.rmdir(parent_inode, name, _ctx(ctx))

    @_handler(mutates=True)
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, _ctx(ctx))

    # --- files -------------------------------------------------------------------

    @_handler()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.config.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        self.fs.open(inode, flags)
        return self._file_info(inode, flags)

    @_handler(mutates=True)
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self.fs.create(parent_inode, name, mode, _ctx(ctx))
        self.fs.open(inode.ino, flags)
        return self._file_info(inode.ino, flags), self._entry(inode)

    def _file_info(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        # keep_cache: every write passes through this kernel, so its page cache is never
        # stale. direct_io stays off: clients (QEMU share=on) need page-cache mmap.
        handle = OpenFile(ino, direct=bool(flags & os.O_DIRECT))
        return pyfuse3.FileInfo(fh=self._open_handle(handle), keep_cache=True,
                                direct_io=False)

    @_handler()
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._file(fh)
        if not handle.direct:
            self._cached.add(handle.ino)
        return self.fs.read(handle.ino, off, size)

    @_handler(Traffic.WRITEBACK, mutates=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._file(fh)
        written = self.fs.write(handle.ino, off, buf)
        if not handle.direct:
            self._cached.add(handle.ino)
        elif handle.ino in self._cached:
            self._cached.discard(handle.ino)
            await self._drop_cached_pages(handle.ino)
        return written

    async def _drop_cached_pages(self, ino: int) -> None:
        """After an O_DIRECT write, before it completes: drop the file's cached pages.

        A buffered reader may have cached the old bytes while the write was in flight,
        and the kernel does not invalidate after an asynchronous direct write (the new
        mtime makes it drop them on its next attribute check, but a read can slip in
        before that). Only for files with buffered traffic since their last drop, so
        that direct I/O alone (a VM image with cache=none, a database) pays nothing.

        In a worker thread: the kernel waits for pages that reads in flight hold, and
        those reads need this loop. The wait is bounded: a page the kernel holds for a
        request that cannot go on until this write completes (a read held at the gate
        of a kexec, the write-back of a mapping through this very handle) would
        otherwise wait for ever; the pages are dropped once it goes on.
        """
        invalidate = functools.partial(_quietly, pyfuse3.invalidate_inode, ino, False)
        with trio.move_on_after(INVALIDATE_WAIT):
            await trio.to_thread.run_sync(invalidate, abandon_on_cancel=True)

    @_handler(Traffic.WRITEBACK)
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, OpenFile):
            self.fs.release(handle.ino)

    # --- directories -------------------------------------------------------------

    @_handler()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.fs.opendir(inode)              # ENOTDIR, ENOENT
        return self._open_handle(OpenDir(inode))

    @_handler()
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dir_handle(fh)
        for cookie, name, inode in self.fs.readdir(handle.ino, start_id):
            if not pyfuse3.readdir_reply(token, name, entry_attributes(inode), cookie):
                return
            # The kernel takes a lookup reference for every entry but "." and "..".
            if name not in (b".", b".."):
                self.fs.ref(inode.ino)

    @_handler(Traffic.HANDLES)
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # --- extended attributes ---------------------------------------------------

    @_handler(mutates=True)
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        self.fs.setxattr(inode, name, value, _ctx(ctx))

    @_handler()
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.fs.find_xattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return bytes(value)  # pyfuse3 insists on bytes

    @_handler()
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self.fs.listxattr(inode))

    @_handler(mutates=True)
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.removexattr(inode, name, _ctx(ctx))

    # --- the whole filesystem ----------------------------------------------------

    @_handler()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out
