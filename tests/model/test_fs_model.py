"""A hypothesis state machine: the filesystem core against a simple reference model.

Random operations (create, mkdir, symlink, mknod, write at offsets, truncate, rename with
its flags, link, unlink while open or looked up, rmdir, xattrs, chmod, chown, utimens,
and an in-process rebuild from exported records, as the handover does) are applied to
both; after each step every reachable name is compared: type, mode, owner, size,
contents, xattrs, link count and inode number, plus the files kept alive by opens and
lookups, and `Filesystem.check()`.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from conftest_machine import (BootKernel, boot_kernel, examples, new_fs,  # noqa: F401
                              machine_env, unique_name)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from guestfs.errors import FsError
from guestfs.filesystem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Ctx,
    Filesystem,
)
from guestfs.inode import ROOT_INO
from guestfs.store.pagemap import REGION_SIZE
from guestfs.store.store import MetaStore
from kho_backend.boot import Kernel

NAMES = st.sampled_from([b"a", b"b", b"c", b"d"])
CTXS = st.sampled_from([Ctx(uid=0, gid=0), Ctx(uid=1000, gid=1000)])
PERMS = st.integers(0, 0o7777)
XATTR_NAMES = st.sampled_from([b"user.x", b"user.y", b"trusted.t", b"security.s"])
# Mostly small offsets; sometimes past the first 2 MiB region, where folios come in.
OFFSETS = st.one_of(st.integers(0, 40_000), st.integers(0, 3 * REGION_SIZE))
KINDS = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "lnk": stat.S_IFLNK, "fifo": stat.S_IFIFO}


@dataclass(eq=False)
class Node:
    """The model of one inode."""

    ino: int
    kind: str
    perm: int
    uid: int
    gid: int
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Node] = field(default_factory=dict)
    parent: Node | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


class FsModel(RuleBasedStateMachine):
    kernel: Kernel  # set by the test below

    def __init__(self) -> None:
        super().__init__()
        self.fs = new_fs(self.kernel)
        root = self.fs.get(ROOT_INO)
        self.root = Node(ROOT_INO, "dir", stat.S_IMODE(root.mode), root.uid, root.gid)
        self.root.parent = self.root
        self.held: list[tuple[str, Node]] = []   # ("open" | "ref", node)
        self.free = self.kernel.buddy.free_pages() + self.fs.store.pool.nr_pages

    def teardown(self) -> None:
        """Unlink and close everything: every page of the filesystem but the ones an
        empty one holds must be free again."""
        for kind, node in self.held:
            if kind == "open":
                self.fs.release(node.ino)
            else:
                self.fs.forget(node.ino, 1)
        self.held.clear()
        for d, name, child in sorted(self.entries(), key=lambda e: -self._depth(e[0])):
            (self.fs.rmdir if child.is_dir else self.fs.unlink)(d.ino, name, Ctx(0, 0))
        assert self.fs.check() == []
        pool = self.fs.store.pool
        for heads, order in list(pool.blocks()):
            for pfn in heads.tolist():
                pool.free(int(pfn), order)
        assert self.kernel.buddy.free_pages() == self.free

    def _depth(self, d: Node) -> int:
        depth = 0
        while d is not self.root:
            d, depth = d.parent, depth + 1
        return depth

    # --- walking the model --------------------------------------------------------

    def dirs(self) -> list[Node]:
        out, todo = [], [self.root]
        while todo:
            d = todo.pop()
            out.append(d)
            todo.extend(c for c in d.children.values() if c.is_dir)
        return out

    def entries(self) -> list[tuple[Node, bytes, Node]]:
        return [(d, n, c) for d in self.dirs() for n, c in sorted(d.children.items())]

    def files(self) -> list[Node]:
        reachable = [c for _, _, c in self.entries() if c.kind == "reg"]
        return reachable + [n for _, n in self.held]

    def within(self, d: Node, top: Node) -> bool:
        while d is not top:
            if d is self.root:
                return False
            d = d.parent
        return True

    def expect(self, code: int | None, fn: Callable, *args, **kwargs):
        """Run an fs call that should fail with `code` (or succeed when None)."""
        if code is None:
            return fn(*args, **kwargs)
        with pytest.raises(FsError) as info:
            fn(*args, **kwargs)
        assert info.value.errno == code, str(info.value)
        return None

    # --- rules ---------------------------------------------------------------------

    @rule(data=st.data(), name=NAMES, kind=st.sampled_from(sorted(KINDS)), perm=PERMS, ctx=CTXS)
    def make(self, data, name: bytes, kind: str, perm: int, ctx: Ctx) -> None:
        d = data.draw(st.sampled_from(self.dirs()))
        code = errno.EEXIST if name in d.children else None
        if kind == "reg":
            inode = self.expect(code, self.fs.create, d.ino, name, perm, ctx)
        elif kind == "dir":
            inode = self.expect(code, self.fs.mkdir, d.ino, name, stat.S_IFDIR | perm, ctx)
        elif kind == "lnk":
            inode = self.expect(code, self.fs.symlink, d.ino, name, b"t/" + name, ctx)
            perm = 0o777
        else:
            inode = self.expect(code, self.fs.mknod, d.ino, name, stat.S_IFIFO | perm, 0, ctx)
        if inode is None:
            return
        gid = ctx.gid
        if d.perm & stat.S_ISGID:
            gid = d.gid
            if kind == "dir":
                perm |= stat.S_ISGID
        node = Node(inode.ino, kind, perm, ctx.uid, gid,
                    target=b"t/" + name if kind == "lnk" else b"")
        if kind == "dir":
            node.parent = d
        d.children[name] = node

    @rule(data=st.data(), off=OFFSETS, size=st.one_of(st.integers(1, 9000), st.just(REGION_SIZE)),
          byte=st.integers(1, 255))
    def write(self, data, off: int, size: int, byte: int) -> None:
        files = self.files()
        if not files:
            return
        node = data.draw(st.sampled_from(files))
        assert self.fs.write(node.ino, off, bytes([byte]) * size) == size
        node.data.extend(bytes(max(0, off + size - len(node.data))))
        node.data[off:off + size] = bytes([byte]) * size

    @rule(data=st.data(), size=OFFSETS)
    def truncate(self, data, size: int) -> None:
        files = self.files()
        if not files:
            return
        node = data.draw(st.sampled_from(files))
        self.fs.setattr(node.ino, Ctx(0, 0), size=size)
        del node.data[size:]
        node.data.extend(bytes(size - len(node.data)))

    @rule(data=st.data(), mode=st.sampled_from([0, FALLOC_FL_KEEP_SIZE,
                                                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE]),
          off=OFFSETS, length=st.integers(1, REGION_SIZE + 5000))
    def fallocate(self, data, mode: int, off: int, length: int) -> None:
        files = self.files()
        if not files:
            return
        node = data.draw(st.sampled_from(files))
        self.fs.fallocate(node.ino, mode, off, length)
        if mode & FALLOC_FL_PUNCH_HOLE:
            end = min(off + length, len(node.data))
            if off < end:
                node.data[off:end] = bytes(end - off)
        elif not mode & FALLOC_FL_KEEP_SIZE:
            node.data.extend(bytes(max(0, off + length - len(node.data))))

    @rule(data=st.data(), new_name=NAMES,
          flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data, new_name: bytes, flags: int) -> None:
        entries = self.entries()
        if not entries:
            return
        od, old_name, src = data.draw(st.sampled_from(entries))
        nd = data.draw(st.sampled_from(self.dirs()))
        dst = nd.children.get(new_name)
        code = self._rename_error(od, src, nd, dst, flags)
        self.expect(code, self.fs.rename, od.ino, old_name, nd.ino, new_name, flags, Ctx(0, 0))
        if code is not None or dst is src:
            return
        if flags == RENAME_EXCHANGE:
            od.children[old_name], nd.children[new_name] = dst, src
            for moved, into in ((src, nd), (dst, od)):
                if moved.is_dir:
                    moved.parent = into
            return
        del od.children[old_name]
        nd.children[new_name] = src
        if src.is_dir:
            src.parent = nd

    def _rename_error(self, od: Node, src: Node, nd: Node, dst: Node | None,
                      flags: int) -> int | None:
        if flags == RENAME_EXCHANGE:
            if dst is None:
                return errno.ENOENT
            if dst is src:
                return None
            if (src.is_dir and self.within(nd, src)) or (dst.is_dir and self.within(od, dst)):
                return errno.EINVAL
            return None
        if dst is not None and flags == RENAME_NOREPLACE:
            return errno.EEXIST
        if dst is src:
            return None
        if src.is_dir and self.within(nd, src):
            return errno.EINVAL
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                return errno.ENOTDIR
            if not src.is_dir and dst.is_dir:
                return errno.EISDIR
            if dst.is_dir and dst.children:
                return errno.ENOTEMPTY
        return None

    @rule(data=st.data(), name=NAMES)
    def link(self, data, name: bytes) -> None:
        entries = self.entries()
        if not entries:
            return
        _, _, node = data.draw(st.sampled_from(entries))
        d = data.draw(st.sampled_from(self.dirs()))
        code = errno.EEXIST if name in d.children else errno.EPERM if node.is_dir else None
        self.expect(code, self.fs.link, node.ino, d.ino, name, Ctx(0, 0))
        if code is None:
            d.children[name] = node

    @rule(data=st.data(), name=NAMES)
    def unlink(self, data, name: bytes) -> None:
        d = data.draw(st.sampled_from(self.dirs()))
        node = d.children.get(name)
        code = errno.ENOENT if node is None else errno.EISDIR if node.is_dir else None
        self.expect(code, self.fs.unlink, d.ino, name, Ctx(0, 0))
        if code is None:
            del d.children[name]

    @rule(data=st.data(), name=NAMES)
    def rmdir(self, data, name: bytes) -> None:
        d = data.draw(st.sampled_from(self.dirs()))
        node = d.children.get(name)
        code = (errno.ENOENT if node is None else errno.ENOTDIR if not node.is_dir
                else errno.ENOTEMPTY if node.children else None)
        self.expect(code, self.fs.rmdir, d.ino, name, Ctx(0, 0))
        if code is None:
            del d.children[name]

    @rule(data=st.data(), how=st.sampled_from(["open", "ref"]))
    def hold(self, data, how: str) -> None:
        entries = [c for _, _, c in self.entries() if c.kind == "reg"]
        if not entries:
            return
        node = data.draw(st.sampled_from(entries))
        if how == "open":
            self.fs.open(node.ino, 0)
        else:
            self.fs.ref(node.ino)
        self.held.append((how, node))

    @rule(data=st.data())
    def let_go(self, data) -> None:
        if not self.held:
            return
        how, node = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if how == "open":
            self.fs.release(node.ino)
        else:
            self.fs.forget(node.ino, 1)
        named = any(c is node for _, _, c in self.entries())
        if not named and not any(n is node for _, n in self.held):
            # Gone for the kernel at once, whether its free waits or not.
            self.expect(errno.ENOENT, self.fs.get, node.ino)

    @rule()
    def reap(self) -> None:
        """The daemon frees the removed files that wait, between requests."""
        self.fs.reap_pending()
        assert self.fs.waiting_frees == 0

    @rule(data=st.data(), name=XATTR_NAMES, value=st.binary(max_size=20), ctx=CTXS,
          remove=st.booleans())
    def xattr(self, data, name: bytes, value: bytes, ctx: Ctx, remove: bool) -> None:
        node = data.draw(st.sampled_from([self.root] + [c for _, _, c in self.entries()]))
        code = None
        if name.startswith(b"user.") and node.kind not in ("reg", "dir"):
            code = errno.EPERM
        elif name.startswith(b"trusted.") and ctx.uid != 0:
            code = errno.EPERM
        elif remove and name not in node.xattrs:
            code = errno.ENODATA
        if remove:
            self.expect(code, self.fs.removexattr, node.ino, name, ctx)
            if code is None:
                del node.xattrs[name]
        else:
            self.expect(code, self.fs.setxattr, node.ino, name, value, ctx)
            if code is None:
                node.xattrs[name] = value

    @rule(data=st.data(), perm=PERMS, uid=st.sampled_from([None, 0, 7]),
          gid=st.sampled_from([None, 0, 8]))
    def chmod_chown(self, data, perm: int, uid: int | None, gid: int | None) -> None:
        node = data.draw(st.sampled_from([c for _, _, c in self.entries()] or [self.root]))
        self.fs.setattr(node.ino, Ctx(0, 0), mode=perm)
        node.perm = perm
        self.fs.setattr(node.ino, Ctx(0, 0), uid=uid, gid=gid)
        if uid is None and gid is None:
            return
        node.uid = node.uid if uid is None else uid
        node.gid = node.gid if gid is None else gid
        if not node.is_dir:
            node.perm &= ~stat.S_ISUID
            if node.perm & stat.S_IXGRP:
                node.perm &= ~stat.S_ISGID

    @rule(data=st.data(), atime=st.integers(0, 2**62), mtime=st.integers(0, 2**62))
    def utimens(self, data, atime: int, mtime: int) -> None:
        node = data.draw(st.sampled_from([c for _, _, c in self.entries()] or [self.root]))
        inode = self.fs.setattr(node.ino, Ctx(0, 0), atime_ns=atime, mtime_ns=mtime)
        assert (inode.atime_ns, inode.mtime_ns) == (atime, mtime)

    @rule()
    def handover(self) -> None:
        """Open the filesystem again from what the arena holds, as the next kernel does:
        a new store (no cached inode, no verified page), its orphans freed; runtime
        state (opens, lookups) does not survive, so unlinked files go."""
        store = self.fs.store
        fresh, _ = MetaStore.open(store.arena, store.pool.pool, store.sb_pfn)
        self.fs = Filesystem(fresh)
        self.fs.finish_orphans()
        self.held.clear()

    # --- the comparison ---------------------------------------------------------------

    @invariant()
    def same_tree(self) -> None:
        assert self.fs.check() == []
        links: dict[int, int] = {}
        for d in self.dirs():
            listing = {n: i for _, n, i in self.fs.readdir(d.ino, 0)}
            assert listing.pop(b".").ino == d.ino and listing.pop(b"..").ino == d.parent.ino
            assert sorted(listing) == sorted(d.children)
            for name, node in d.children.items():
                assert listing[name].ino == node.ino
                links[node.ino] = links.get(node.ino, 0) + 1
        for d in self.dirs():
            links[d.ino] = 2 + sum(c.is_dir for c in d.children.values())
        for node in [c for _, _, c in self.entries()] + [n for _, n in self.held]:
            self._same_inode(node, links.get(node.ino, 0))
        self._same_inode(self.root, links[ROOT_INO])

    def _same_inode(self, node: Node, nlink: int) -> None:
        inode = self.fs.get(node.ino)
        assert stat.S_IFMT(inode.mode) == KINDS[node.kind]
        assert stat.S_IMODE(inode.mode) == node.perm
        assert (inode.uid, inode.gid, inode.nlink) == (node.uid, node.gid, nlink)
        assert dict(self.fs.listxattr_items(node.ino)) == node.xattrs
        if node.kind == "reg":
            assert inode.size == len(node.data)
            assert bytes(self.fs.read(node.ino, 0, inode.size + 10)) == node.data
        elif node.kind == "lnk":
            assert self.fs.readlink(node.ino) == node.target and inode.size == len(node.target)


def test_filesystem_matches_the_model(boot_kernel: BootKernel) -> None:
    FsModel.kernel = boot_kernel(unique_name("model"), memory=256 << 20)
    run_state_machine_as_test(FsModel, settings=settings(
        max_examples=examples(200), stateful_step_count=50, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
