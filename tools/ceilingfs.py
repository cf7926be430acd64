#!/usr/bin/env python3
"""The pyfuse3 ceiling: a filesystem that answers every request and stores no data.

It shows how fast a pyfuse3 filesystem can be at all on this machine, so that the
benchmark can say how much of that guestfs reaches. Reads return zeros, writes are
acknowledged and dropped. It keeps only what the benchmark's clients check (names,
sizes, modes), in plain dicts, because a create followed by a stat that fails, or an
``ls`` that lists nothing, would not be the same request stream guestfs answers.

It mounts with the options and cache settings guestfs uses (no writeback cache, POSIX
ACLs, ``keep_cache``, one-hour entry and attribute timeouts, ``default_permissions``,
answers to ``getxattr``, ENOSYS to flush and fsync), so that the kernel sends both of them
the same requests.

    python tools/ceilingfs.py MOUNTPOINT      (runs until unmounted: fusermount3 -u)
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

TIMEOUT = 3600.0          # entry and attribute timeouts, as guestfs's (fuse_ops.py)
FIRST_COOKIE = 3          # readdir cookies 1 and 2 are "." and "..", as in guestfs
_ZEROS = memoryview(bytes(1 << 20))  # FUSE never asks for more than 1 MiB at once


@dataclass
class Node:
    """What the ceiling remembers of an inode: no contents."""

    mode: int
    size: int = 0
    nlink: int = 1
    target: bytes = b""   # symbolic links only
    # Directories only: name -> (inode, cookie), and the names by cookie, with None for
    # a removed entry, so that readdir resumes at an offset without a search.
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    by_cookie: list[bytes | None] = field(default_factory=list)


class Ceiling(pyfuse3.Operations):
    """pyfuse3 handlers that do the least a coherent filesystem can."""

    enable_writeback_cache = False
    enable_acl = True

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(stat.S_IFDIR | 0o755, nlink=2)}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.now_ns = time.time_ns()

    # --- helpers ------------------------------------------------------------------

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self._node(ino)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_size = node.size
        attr.st_blksize = 4096
        attr.st_blocks = (node.size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.now_ns
        attr.attr_timeout = attr.entry_timeout = TIMEOUT
        return attr

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _new(self, parent: int, name: bytes, mode: int) -> pyfuse3.EntryAttributes:
        directory = self._node(parent)
        if name in directory.entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        ino, self.next_ino = self.next_ino, self.next_ino + 1
        self.nodes[ino] = Node(mode, nlink=2 if stat.S_ISDIR(mode) else 1)
        self._add_entry(directory, name, ino)
        return self._attr(ino)

    @staticmethod
    def _add_entry(directory: Node, name: bytes, ino: int) -> None:
        directory.entries[name] = (ino, FIRST_COOKIE + len(directory.by_cookie))
        directory.by_cookie.append(name)

    @staticmethod
    def _remove_entry(directory: Node, name: bytes) -> int:
        try:
            ino, cookie = directory.entries.pop(name)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        directory.by_cookie[cookie - FIRST_COOKIE] = None
        return ino

    # --- names --------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = self._node(parent_inode).entries.get(name)
        if entry is None:
            # A cacheable "no such name", as guestfs answers (a plain ENOENT would not
            # be cached, and every create would cost the ceiling one more lookup).
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = 0
            attr.entry_timeout = TIMEOUT
            return attr
        return self._attr(entry[0])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            node.size = attr.st_size
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        return self._attr(inode)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode))

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode))
        return pyfuse3.FileInfo(fh=attr.st_ino, keep_cache=True), attr

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        attr = self._new(parent_inode, name, stat.S_IFLNK | 0o777)
        node = self.nodes[attr.st_ino]
        node.target, node.size = target, len(target)
        attr.st_size = len(target)
        return attr

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self._node(inode).target

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        # Forgotten at once: the benchmark never uses a file after unlinking it.
        del self.nodes[self._remove_entry(self._node(parent_inode), name)]

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        directory = self._node(parent_inode)
        ino = directory.entries.get(name, (0, 0))[0]
        if self._node(ino).entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del self.nodes[self._remove_entry(directory, name)]

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        ino = self._remove_entry(self._node(parent_inode_old), name_old)
        target = self._node(parent_inode_new)
        if name_new in target.entries:
            del self.nodes[self._remove_entry(target, name_new)]
        self._add_entry(target, name_new, ino)

    # --- files --------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_TRUNC:
            self._node(inode).size = 0
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        return _ZEROS[:max(0, min(size, self._node(fh).size - off))]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node(fh)
        node.size = max(node.size, off + len(buf))
        return len(buf)

    async def release(self, fh: int) -> None:
        """No per-open state."""

    # --- directories --------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = self._node(fh)
        # "." and ".." (cookies 1 and 2) carry the directory's own attributes: the
        # kernel makes no dentries for them, so only their presence matters to clients.
        for cookie, dot in ((1, b"."), (2, b"..")):
            if start_id < cookie and not pyfuse3.readdir_reply(token, dot, self._attr(fh), cookie):
                return
        for index in range(max(start_id + 1, FIRST_COOKIE) - FIRST_COOKIE,
                           len(directory.by_cookie)):
            name = directory.by_cookie[index]
            if name is not None and not pyfuse3.readdir_reply(
                    token, name, self._attr(directory.entries[name][0]), index + FIRST_COOKIE):
                return

    async def releasedir(self, fh: int) -> None:
        """No per-open state."""

    # --- extended attributes and the whole filesystem -----------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return []

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 1 << 30
        out.f_files = out.f_ffree = out.f_favail = 1 << 30
        out.f_namemax = 255
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """Mount at the given mount point and serve until unmounted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    options = {"default_permissions", "fsname=ceilingfs", "subtype=ceilingfs"}
    pyfuse3.init(Ceiling(), args.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
