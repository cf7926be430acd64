"""Filesystem core: POSIX behaviour without FUSE, on a real booted machine."""

from __future__ import annotations

import errno
import os
import stat
import struct
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from conftest_machine import (BootKernel, boot_kernel, gone, machine_env,  # noqa: F401
                              new_fs, python_calls, unique_name)

from guestfs.errors import FsError
from guestfs.filesystem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    LINK_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    REAP_BATCH,
    REAP_SMALL_PAGES,
    Ctx,
    Filesystem,
)
from guestfs.handover import GuestfsHandover
from guestfs.inode import ROOT_INO, Inode
from guestfs.store.pagemap import REGION_SIZE
from guestfs.store import blob
from guestfs.store.page import HEADER_SIZE, CorruptPage, Pages
from guestfs.store.store import INO_RESERVE, ORPHAN_FREE, MetaStore
from guestfs.store.superblock import MAX_FILE_SIZE, Superblock
from kho_backend.boot import Kernel
from kho_backend.errors import OutOfMemory
from kho_backend.units import PAGE_SIZE

MiB = 1 << 20
ROOT = Ctx(uid=0, gid=0)
USER = Ctx(uid=1000, gid=1000)
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
def kernel(boot_kernel: BootKernel) -> Kernel:
    """A freshly booted 32 MiB machine."""
    return boot_kernel(unique_name("fs"), memory=32 * MiB)


@pytest.fixture
def fs(kernel: Kernel) -> Iterator[Filesystem]:
    fs = new_fs(kernel)
    yield fs
    assert fs.check() == []


class Clock:
    """A settable clock for timestamp rules."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.now

    def tick(self, ns: int = 1000) -> int:
        self.now += ns
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cfs(kernel: Kernel, clock: Clock) -> Iterator[Filesystem]:
    fs = new_fs(kernel, clock=clock)
    yield fs
    assert fs.check() == []


def err(code: int, fn: Callable, *args, **kwargs) -> None:
    with pytest.raises(FsError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, str(info.value)


def mkfile(fs: Filesystem, name: bytes, data: bytes = b"", parent: int = ROOT_INO,
           ctx: Ctx = ROOT) -> Inode:
    inode = fs.create(parent, name, REG, ctx)
    if data:
        assert fs.write(inode.ino, 0, data) == len(data)
    return inode


def names(fs: Filesystem, ino: int = ROOT_INO) -> list[bytes]:
    return [n for _, n, _ in fs.readdir(ino, 0)][2:]


# --- errors ---------------------------------------------------------------------------


def test_fserror_reads_well() -> None:
    e = FsError(errno.ENOENT, "no entry b'x' in 1")
    assert e.errno == errno.ENOENT
    assert str(e) == "ENOENT (No such file or directory): no entry b'x' in 1"


# --- names and types --------------------------------------------------------------------


def test_fresh_root(fs: Filesystem) -> None:
    root = fs.get(ROOT_INO)
    assert stat.S_ISDIR(root.mode) and root.nlink == 2 and root.parent == ROOT_INO
    assert fs.lookup(ROOT_INO, b".") is root and fs.lookup(ROOT_INO, b"..") is root
    assert (root.uid, root.gid) == (os.getuid(), os.getgid())
    err(errno.ENOENT, fs.get, 999)


def test_create_sets_type_owner_and_parent_times(cfs: Filesystem, clock: Clock) -> None:
    root = cfs.get(ROOT_INO)
    t = clock.tick()
    f = cfs.create(ROOT_INO, b"f", 0o640, USER)
    assert f.mode == stat.S_IFREG | 0o640 and (f.uid, f.gid) == (1000, 1000) and f.nlink == 1
    assert f.atime_ns == f.mtime_ns == f.ctime_ns == t
    assert root.mtime_ns == root.ctime_ns == t
    assert cfs.lookup(ROOT_INO, b"f") is f and f.generation == cfs.sb.ino_generation
    err(errno.EEXIST, cfs.create, ROOT_INO, b"f", REG, ROOT)
    err(errno.ENOTDIR, cfs.create, f.ino, b"x", REG, ROOT)
    err(errno.ENOTDIR, cfs.lookup, f.ino, b"x")
    err(errno.ENOENT, cfs.lookup, ROOT_INO, b"nothing")


@pytest.mark.parametrize("mode,rdev,kind,kept_rdev", [
    (stat.S_IFIFO | 0o600, 0, stat.S_IFIFO, 0),
    (stat.S_IFCHR | 0o600, 0x0103, stat.S_IFCHR, 0x0103),
    (stat.S_IFBLK | 0o600, 0x0801, stat.S_IFBLK, 0x0801),
    (stat.S_IFSOCK | 0o600, 5, stat.S_IFSOCK, 0),
    (stat.S_IFREG | 0o600, 0, stat.S_IFREG, 0),
    (0o600, 0, stat.S_IFREG, 0),
])
def test_mknod_makes_every_non_directory_type(fs: Filesystem, mode: int, rdev: int,
                                              kind: int, kept_rdev: int) -> None:
    node = fs.mknod(ROOT_INO, b"n", mode, rdev, ROOT)
    assert stat.S_IFMT(node.mode) == kind and node.rdev == kept_rdev


def test_mknod_refuses_directories_and_unknown_types(fs: Filesystem) -> None:
    err(errno.EPERM, fs.mknod, ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, ROOT)
    err(errno.EINVAL, fs.mknod, ROOT_INO, b"d", 0o170000 | 0o755, 0, ROOT)


def test_mkdir_counts_links_and_dotdot(fs: Filesystem) -> None:
    a = fs.mkdir(ROOT_INO, b"a", DIR, ROOT)
    b = fs.mkdir(a.ino, b"b", DIR, ROOT)
    assert fs.get(ROOT_INO).nlink == 3 and a.nlink == 3 and b.nlink == 2
    assert fs.lookup(b.ino, b"..") is a and fs.lookup(a.ino, b"..").ino == ROOT_INO
    err(errno.EEXIST, fs.mkdir, ROOT_INO, b"a", DIR, ROOT)
    err(errno.EEXIST, fs.mkdir, ROOT_INO, b".", DIR, ROOT)


def test_name_length_limits(fs: Filesystem) -> None:
    mkfile(fs, b"n" * 255)
    err(errno.ENAMETOOLONG, fs.create, ROOT_INO, b"n" * 256, REG, ROOT)
    err(errno.ENAMETOOLONG, fs.lookup, ROOT_INO, b"n" * 256)
    err(errno.ENAMETOOLONG, fs.mkdir, ROOT_INO, b"d" * 256, DIR, ROOT)
    fs.symlink(ROOT_INO, b"ok", b"t" * 4095, ROOT)
    err(errno.ENAMETOOLONG, fs.symlink, ROOT_INO, b"long", b"t" * 4096, ROOT)


def test_setgid_directories_pass_on_their_group(fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"shared", stat.S_IFDIR | 0o2775, ROOT)
    fs.setattr(d.ino, ROOT, gid=50)
    assert d.mode & stat.S_ISGID               # chown keeps a directory's set-gid bit
    f = fs.create(d.ino, b"f", 0o644, USER)
    sub = fs.mkdir(d.ino, b"sub", DIR, USER)
    assert (f.uid, f.gid) == (1000, 50) and not f.mode & stat.S_ISGID
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    plain = fs.mkdir(ROOT_INO, b"plain", DIR, USER)
    assert plain.gid == 1000 and not plain.mode & stat.S_ISGID


def test_symlink_and_readlink(fs: Filesystem) -> None:
    s = fs.symlink(ROOT_INO, b"s", b"../target", USER)
    assert stat.S_ISLNK(s.mode) and s.size == 9 and fs.readlink(s.ino) == b"../target"
    f = mkfile(fs, b"f")
    err(errno.EINVAL, fs.readlink, f.ino)
    err(errno.ENOENT, fs.symlink, ROOT_INO, b"empty", b"", ROOT)
    err(errno.EPERM, fs.setxattr, s.ino, b"user.x", b"1", ROOT)
    fs.setxattr(s.ino, b"trusted.x", b"1", ROOT)


def test_hard_links(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f", b"data")
    d = cfs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    t = clock.tick()
    assert cfs.link(f.ino, d.ino, b"g", ROOT) is f
    assert f.nlink == 2 and f.ctime_ns == t and d.mtime_ns == t
    assert cfs.lookup(d.ino, b"g") is f
    err(errno.EPERM, cfs.link, d.ino, ROOT_INO, b"dirlink", ROOT)
    err(errno.EEXIST, cfs.link, f.ino, ROOT_INO, b"d", ROOT)
    f.nlink = LINK_MAX
    err(errno.EMLINK, cfs.link, f.ino, ROOT_INO, b"h", ROOT)
    f.nlink = 2


def test_unlink_and_rmdir(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f")
    d = cfs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    cfs.link(f.ino, d.ino, b"g", ROOT)
    t = clock.tick()
    cfs.unlink(ROOT_INO, b"f", ROOT)
    assert f.nlink == 1 and f.ctime_ns == t and cfs.get(ROOT_INO).mtime_ns == t
    err(errno.ENOENT, cfs.unlink, ROOT_INO, b"f", ROOT)
    err(errno.EISDIR, cfs.unlink, ROOT_INO, b"d", ROOT)
    err(errno.ENOTEMPTY, cfs.rmdir, ROOT_INO, b"d", ROOT)
    s = cfs.symlink(ROOT_INO, b"s", b"x", ROOT)
    err(errno.ENOTDIR, cfs.rmdir, ROOT_INO, b"s", ROOT)
    err(errno.EINVAL, cfs.rmdir, d.ino, b".", ROOT)
    cfs.unlink(d.ino, b"g", ROOT)
    assert gone(cfs, f.ino)        # no name, no open, no lookup: gone
    cfs.rmdir(ROOT_INO, b"d", ROOT)
    assert cfs.get(ROOT_INO).nlink == 2 and gone(cfs, d.ino)
    err(errno.ENOENT, cfs.create, d.ino, b"x", REG, ROOT)
    cfs.unlink(ROOT_INO, b"s", ROOT)
    assert gone(cfs, s.ino) and names(cfs) == []


def test_removed_directory_still_looked_up_refuses_new_entries(fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    fs.ref(d.ino)
    fs.rmdir(ROOT_INO, b"d", ROOT)
    assert d.nlink == 0 and fs.get(d.ino) is d
    err(errno.ENOENT, fs.create, d.ino, b"x", REG, ROOT)
    err(errno.ENOENT, fs.mkdir, d.ino, b"x", DIR, ROOT)
    assert names(fs, d.ino) == []
    fs.forget(d.ino, 1)
    assert gone(fs, d.ino)


def test_unlinked_open_file_keeps_its_data_until_release_and_forget(fs: Filesystem) -> None:
    free = fs.store.free_pages()
    f = mkfile(fs, b"f", b"x" * 3 * PAGE_SIZE)
    fs.ref(f.ino)
    fs.open(f.ino, os.O_RDWR)
    fs.unlink(ROOT_INO, b"f", ROOT)
    assert f.nlink == 0 and bytes(fs.read(f.ino, 0, 4)) == b"xxxx"
    assert fs.write(f.ino, 3 * PAGE_SIZE, b"more") == 4
    fs.release(f.ino)
    assert fs.get(f.ino) is f             # the kernel still holds a lookup
    fs.forget(f.ino, 1)
    # A small file's free waits for others (on the orphan list), but it is gone.
    with pytest.raises(FsError) as e:
        fs.get(f.ino)
    assert e.value.errno == errno.ENOENT and fs.store.orphans() == [(f.ino, ORPHAN_FREE)]
    assert fs.reap_pending() == 1
    # Every page of the file is free again; the orphan list keeps its (now empty) leaf.
    assert fs.store.orphans() == [] and len(list(fs.store.orphan_pages())) == 1
    assert gone(fs, f.ino) and fs.store.free_pages() == free - 1
    fs.forget(f.ino, 1)                   # a late forget is harmless
    fs.release(f.ino)


def let_go(fs: Filesystem, names: list[bytes], data: bytes = b"x") -> list[int]:
    """Files of `names` made, unlinked while the kernel holds them, then let go (their
    last references dropped); returns their inode numbers."""
    inos = [mkfile(fs, name, data).ino for name in names]
    for ino, name in zip(inos, names):
        fs.ref(ino)
        fs.unlink(ROOT_INO, name, ROOT)
    for ino in inos:
        fs.forget(ino, 1)
    return inos


def test_small_unlinked_files_are_freed_together(fs: Filesystem) -> None:
    inos = let_go(fs, [b"f%d" % i for i in range(REAP_BATCH - 1)])
    # All wait (on the orphan list: a crash loses none), yet are gone for the kernel.
    assert len(fs.store.orphans()) == REAP_BATCH - 1
    err(errno.ENOENT, fs.get, inos[0])
    err(errno.ENOENT, fs.ref, inos[-1])         # an NFS-style handle finds it gone
    let_go(fs, [b"last"])                       # the batch is full: all freed at once
    assert fs.store.orphans() == [] and all(gone(fs, ino) for ino in inos)
    assert fs.check() == []                     # and no page of theirs is left behind
    big = mkfile(fs, b"big", b"b" * (REAP_SMALL_PAGES + 1) * PAGE_SIZE)
    rich = mkfile(fs, b"rich")
    fs.setxattr(rich.ino, b"user.big", b"v" * 2 * PAGE_SIZE, ROOT)
    for f in (big, rich):
        fs.ref(f.ino)
        fs.unlink(ROOT_INO, b"big" if f is big else b"rich", ROOT)
        fs.forget(f.ino, 1)     # a larger file, or xattrs of several pages: freed at once
        assert gone(fs, f.ino) and fs.store.orphans() == []


def test_a_file_waiting_to_be_freed_stays_gone(fs: Filesystem) -> None:
    """Nothing reaches it again: not a second lookup of "." (a file handle retried),
    not after the full check read its record, so it is freed once, with nothing else."""
    (ino,) = let_go(fs, [b"f"], b"x" * 2 * PAGE_SIZE)
    for _ in range(2):
        err(errno.ENOENT, fs.find, ino, b".")
        err(errno.ENOENT, fs.ref, ino)
        err(errno.ENOENT, fs.setattr, ino, ROOT, size=0)
        assert fs.check() == []             # reads every record, this one too
    g = mkfile(fs, b"g", b"g" * 8 * PAGE_SIZE)
    assert fs.reap_pending() == 1 and fs.reap_pending() == 0
    assert bytes(fs.read(g.ino, 0, 8 * PAGE_SIZE)) == b"g" * 8 * PAGE_SIZE


def test_statfs_and_a_handover_free_what_waits(fs: Filesystem, kernel: Kernel) -> None:
    before = fs.statfs()
    let_go(fs, [b"a", b"b"], b"x" * 3 * PAGE_SIZE)
    assert len(fs.store.orphans()) == 2
    after = fs.statfs()
    assert fs.store.orphans() == [] and after.f_bfree == before.f_bfree - 1
    assert after.f_ffree == before.f_ffree
    let_go(fs, [b"c"])
    GuestfsHandover(fs).kho_finalize(kernel.kho)
    assert fs.store.orphans() == []


def test_waiting_frees_never_make_a_write_fail(fs: Filesystem) -> None:
    size = REAP_SMALL_PAGES * PAGE_SIZE
    made = 0
    while fs.store.data_room(REAP_SMALL_PAGES + 8):     # fill the arena with small files
        mkfile(fs, b"fill-%d" % made, b"f" * size)
        made += 1
    names = [b"fill-%d" % i for i in range(made - REAP_BATCH // 2, made)]
    inos = [fs.lookup(ROOT_INO, name).ino for name in names]
    for ino, name in zip(inos, names):
        fs.ref(ino)
        fs.unlink(ROOT_INO, name, ROOT)
    for ino in inos:
        fs.forget(ino, 1)
    assert len(fs.store.orphans()) == len(names)    # all wait; the arena looks full
    f = mkfile(fs, b"new")                          # room is short: they are freed first
    assert fs.store.orphans() == []
    chunk = b"n" * (1 << 20)
    written = 0
    while written + len(chunk) <= (len(names) * REAP_SMALL_PAGES - 64) * PAGE_SIZE:
        assert fs.write(f.ino, written, chunk) == len(chunk)
        written += len(chunk)
    assert written and fs.get(f.ino).size == written


def test_the_inode_limit_counts_no_waiting_free(kernel: Kernel) -> None:
    fs = new_fs(kernel, max_inodes=3)
    let_go(fs, [b"a"])
    mkfile(fs, b"b")
    assert fs.store.orphans() != []
    mkfile(fs, b"c")                    # the waiting free of "a" makes room for it
    assert fs.store.orphans() == [] and fs.check() == []


def test_a_crash_frees_what_waited_at_the_next_mount(kernel: Kernel) -> None:
    fs = new_fs(kernel)                 # not the fixture's: it ends without its teardown
    free = fs.store.free_pages()
    inos = let_go(fs, [b"a", b"b", b"c"], b"x" * PAGE_SIZE)
    store = fs.store
    back = Filesystem(MetaStore.open(store.arena, store.pool, store.sb_pfn)[0])
    assert back.finish_orphans() == 3
    assert all(gone(back, ino) for ino in inos) and back.store.orphans() == []
    assert back.store.free_pages() == free - 1 and back.check() == []


# --- rename ---------------------------------------------------------------------------


def test_rename_moves_and_updates_times(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f")
    a = cfs.mkdir(ROOT_INO, b"a", DIR, ROOT)
    t = clock.tick()
    cfs.rename(ROOT_INO, b"f", a.ino, b"g", 0, ROOT)
    assert names(cfs) == [b"a"] and names(cfs, a.ino) == [b"g"]
    assert f.ctime_ns == t and a.mtime_ns == a.ctime_ns == t
    assert cfs.get(ROOT_INO).mtime_ns == t


def test_rename_over_a_file_replaces_it(fs: Filesystem) -> None:
    src = mkfile(fs, b"src", b"new")
    dst = mkfile(fs, b"dst", b"old")
    free = fs.store.free_pages()
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst", 0, ROOT)
    assert fs.lookup(ROOT_INO, b"dst") is src and gone(fs, dst.ino)
    assert fs.store.free_pages() == free + 1          # the old file's page


def test_rename_directories(fs: Filesystem) -> None:
    a = fs.mkdir(ROOT_INO, b"a", DIR, ROOT)
    b = fs.mkdir(ROOT_INO, b"b", DIR, ROOT)
    sub = fs.mkdir(a.ino, b"sub", DIR, ROOT)
    fs.rename(a.ino, b"sub", b.ino, b"sub2", 0, ROOT)
    assert sub.parent == b.ino and a.nlink == 2 and b.nlink == 3
    assert fs.lookup(sub.ino, b"..") is b
    empty = fs.mkdir(ROOT_INO, b"empty", DIR, ROOT)
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"empty", 0, ROOT)   # dir over an empty dir
    assert fs.lookup(ROOT_INO, b"empty") is a and gone(fs, empty.ino)
    assert fs.get(ROOT_INO).nlink == 4


@pytest.mark.parametrize("src,dst,code", [
    (b"d", b"f", errno.ENOTDIR),       # directory over non-directory
    (b"f", b"d", errno.EISDIR),        # non-directory over directory
    (b"d", b"full", errno.ENOTEMPTY),  # over a non-empty directory
    (b"nothing", b"x", errno.ENOENT),
])
def test_rename_refusals(fs: Filesystem, src: bytes, dst: bytes, code: int) -> None:
    mkfile(fs, b"f")
    fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    full = fs.mkdir(ROOT_INO, b"full", DIR, ROOT)
    mkfile(fs, b"inside", parent=full.ino)
    err(code, fs.rename, ROOT_INO, src, ROOT_INO, dst, 0, ROOT)


def test_rename_into_own_subtree_and_bad_flags(fs: Filesystem) -> None:
    a = fs.mkdir(ROOT_INO, b"a", DIR, ROOT)
    b = fs.mkdir(a.ino, b"b", DIR, ROOT)
    err(errno.EINVAL, fs.rename, ROOT_INO, b"a", b.ino, b"x", 0, ROOT)
    err(errno.EINVAL, fs.rename, ROOT_INO, b"a", a.ino, b"x", 0, ROOT)
    err(errno.EINVAL, fs.rename, ROOT_INO, b"a", ROOT_INO, b"z",
        RENAME_WHITEOUT | RENAME_EXCHANGE, ROOT)
    err(errno.EINVAL, fs.rename, ROOT_INO, b"a", ROOT_INO, b"z",
        RENAME_NOREPLACE | RENAME_EXCHANGE, ROOT)
    err(errno.EINVAL, fs.rename, ROOT_INO, b"a", ROOT_INO, b".", 0, ROOT)


def test_rename_noreplace(fs: Filesystem) -> None:
    mkfile(fs, b"a")
    mkfile(fs, b"b")
    err(errno.EEXIST, fs.rename, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE, ROOT)
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"c", RENAME_NOREPLACE, ROOT)
    assert sorted(names(fs)) == [b"b", b"c"]


def test_rename_of_hard_links_to_each_other_does_nothing(fs: Filesystem) -> None:
    f = mkfile(fs, b"a")
    fs.link(f.ino, ROOT_INO, b"b", ROOT)
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0, ROOT)
    assert sorted(names(fs)) == [b"a", b"b"] and f.nlink == 2
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"a", 0, ROOT)


def test_rename_exchange_swaps_and_fixes_parents(cfs: Filesystem, clock: Clock) -> None:
    a = cfs.mkdir(ROOT_INO, b"a", DIR, ROOT)
    sub = cfs.mkdir(a.ino, b"sub", DIR, ROOT)
    f = mkfile(cfs, b"f")
    t = clock.tick()
    cfs.rename(a.ino, b"sub", ROOT_INO, b"f", RENAME_EXCHANGE, ROOT)
    assert cfs.lookup(ROOT_INO, b"f") is sub and cfs.lookup(a.ino, b"sub") is f
    assert sub.parent == ROOT_INO and a.nlink == 2 and cfs.get(ROOT_INO).nlink == 4
    assert sub.ctime_ns == f.ctime_ns == a.mtime_ns == t
    err(errno.ENOENT, cfs.rename, ROOT_INO, b"f", ROOT_INO, b"nope", RENAME_EXCHANGE, ROOT)
    err(errno.EINVAL, cfs.rename, ROOT_INO, b"a", a.ino, b"sub", RENAME_EXCHANGE, ROOT)


def test_rename_readdir_cookie_of_a_replaced_name_is_kept(fs: Filesystem) -> None:
    mkfile(fs, b"a")
    mkfile(fs, b"b")
    mkfile(fs, b"c")
    before = {n: c for c, n, _ in fs.readdir(ROOT_INO, 0)}
    fs.rename(ROOT_INO, b"c", ROOT_INO, b"a", 0, ROOT)
    after = {n: c for c, n, _ in fs.readdir(ROOT_INO, 0)}
    assert after[b"a"] == before[b"a"] and b"c" not in after


# --- attributes ---------------------------------------------------------------------------


def test_chmod_keeps_the_type_and_sets_ctime(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f")
    t = clock.tick()
    cfs.setattr(f.ino, ROOT, mode=0o4755)
    assert f.mode == stat.S_IFREG | 0o4755 and f.ctime_ns == t and f.mtime_ns != t


@pytest.mark.parametrize("mode,after", [
    (0o6755, 0o0755),     # group-exec: both set-id bits go
    (0o6745, 0o2745),     # no group-exec: set-gid marks locking and stays
])
def test_chown_clears_set_id_bits_of_files(fs: Filesystem, mode: int, after: int) -> None:
    f = mkfile(fs, b"f")
    fs.setattr(f.ino, ROOT, mode=mode)
    fs.setattr(f.ino, ROOT, uid=65534, gid=65533)
    assert (f.uid, f.gid, stat.S_IMODE(f.mode)) == (65534, 65533, after)


def test_chown_keeps_set_id_bits_of_directories_and_minus_one_means_unchanged(
        fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", stat.S_IFDIR | 0o2755, ROOT)
    fs.setattr(d.ino, ROOT, uid=5)
    assert d.uid == 5 and d.mode & stat.S_ISGID
    f = mkfile(fs, b"f")
    fs.setattr(f.ino, ROOT, mode=0o4755)
    fs.setattr(f.ino, ROOT, uid=-1, gid=-1)
    assert f.mode & stat.S_ISUID and f.uid == 0


def test_chown_to_minus_one_minus_one_sets_only_ctime(cfs: Filesystem, clock: Clock) -> None:
    # The kernel's SETATTR for chown(f, -1, -1) names no attribute; Linux's own
    # filesystems stamp ctime for it (pjdfstest chown/00.t, tmpfs).
    f = mkfile(cfs, b"f")
    d = cfs.mkdir(ROOT_INO, b"d", stat.S_IFDIR | 0o755, ROOT)
    before = (f.mode, f.uid, f.gid, f.size, f.atime_ns, f.mtime_ns)
    t = clock.tick()
    cfs.setattr(f.ino, ROOT)
    cfs.setattr(d.ino, ROOT, uid=-1, gid=-1)
    assert f.ctime_ns == d.ctime_ns == t
    assert (f.mode, f.uid, f.gid, f.size, f.atime_ns, f.mtime_ns) == before


def test_explicit_times_and_ctime(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f")
    t = clock.tick()
    cfs.setattr(f.ino, ROOT, atime_ns=123, mtime_ns=456_000_000_789)
    assert (f.atime_ns, f.mtime_ns, f.ctime_ns) == (123, 456_000_000_789, t)


def test_truncate_through_setattr(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f", b"a" * 5 * PAGE_SIZE)
    free = cfs.store.free_pages() + 5           # five pages, their PFNs in the record
    t = clock.tick()
    cfs.setattr(f.ino, ROOT, size=PAGE_SIZE + 1)
    assert f.size == PAGE_SIZE + 1 and f.mtime_ns == f.ctime_ns == t
    assert f.npages == 2 and cfs.store.free_pages() == free - 2
    cfs.setattr(f.ino, ROOT, size=10 * PAGE_SIZE)               # up: sparse
    assert f.npages == 2
    assert bytes(cfs.read(f.ino, PAGE_SIZE, 2)) == b"a\0"
    assert bytes(cfs.read(f.ino, 9 * PAGE_SIZE, 10)) == bytes(10)
    t = clock.tick()
    cfs.setattr(f.ino, ROOT, size=10 * PAGE_SIZE)               # same size: times move
    assert f.size == 10 * PAGE_SIZE and f.npages == 2
    assert f.mtime_ns == f.ctime_ns == t   # POSIX.1-2008, Linux's ftruncate(2), ext4
    cfs.setattr(f.ino, ROOT, size=0)
    assert f.npages == 0 and cfs.store.free_pages() == free
    err(errno.EFBIG, cfs.setattr, f.ino, ROOT, size=MAX_FILE_SIZE + 1)
    err(errno.EINVAL, cfs.setattr, f.ino, ROOT, size=-1)
    err(errno.EISDIR, cfs.setattr, ROOT_INO, ROOT, size=0)
    assert f.size == 0


def test_open_with_o_trunc(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f", b"content")
    t = clock.tick()
    cfs.open(f.ino, os.O_WRONLY | os.O_TRUNC)
    assert f.size == 0 and f.npages == 0 and f.mtime_ns == f.ctime_ns == t
    assert cfs.references(f.ino) == (0, 1)
    t = clock.tick()
    cfs.open(f.ino, os.O_WRONLY | os.O_TRUNC)                   # already empty: times move
    assert f.mtime_ns == t
    cfs.open(f.ino, os.O_RDONLY)
    assert cfs.references(f.ino) == (0, 3)
    for _ in range(3):
        cfs.release(f.ino)
    assert cfs.references(f.ino) == (0, 0)


# --- data ---------------------------------------------------------------------------------


def test_write_and_read(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f")
    t = clock.tick()
    assert cfs.write(f.ino, 10, b"hello") == 5
    assert f.size == 15 and f.mtime_ns == f.ctime_ns == t
    assert bytes(cfs.read(f.ino, 0, 100)) == bytes(10) + b"hello"
    assert cfs.read(f.ino, 15, 10) == b"" and cfs.read(f.ino, 100, 10) == b""
    assert cfs.write(f.ino, 0, b"") == 0
    err(errno.EISDIR, cfs.read, ROOT_INO, 0, 10)
    err(errno.EISDIR, cfs.write, ROOT_INO, 0, b"x")


def test_reading_a_sparse_file_takes_no_pages(fs: Filesystem) -> None:
    f = mkfile(fs, b"f")
    fs.setattr(f.ino, ROOT, size=REGION_SIZE * 3)
    assert bytes(fs.read(f.ino, REGION_SIZE, 1000)) == bytes(1000) and f.npages == 0


def test_write_past_the_size_limit(fs: Filesystem) -> None:
    f = mkfile(fs, b"f")
    limit = MAX_FILE_SIZE
    err(errno.EFBIG, fs.write, f.ino, limit, b"x")
    assert fs.write(f.ino, limit - 2, b"xyz") == 2 and f.size == limit


def test_relatime(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f", b"data")
    t = clock.tick()
    cfs.read(f.ino, 0, 4)                       # atime <= mtime: updated
    assert f.atime_ns == t
    clock.tick()
    cfs.read(f.ino, 0, 4)                       # atime newer than mtime/ctime: kept
    assert f.atime_ns == t
    t2 = clock.tick(25 * 3600 * 10**9)
    cfs.read(f.ino, 0, 4)                       # a day old: updated
    assert f.atime_ns == t2
    d = cfs.get(ROOT_INO)
    t3 = clock.tick()
    list(cfs.readdir(ROOT_INO, 0))
    assert d.atime_ns == t3


def test_readlink_moves_atime_as_a_read(cfs: Filesystem, clock: Clock) -> None:
    # tmpfs moves a link's atime on readlink(2) and on a walk through it; the kernel
    # leaves a FUSE inode's atime to us.
    s = cfs.symlink(ROOT_INO, b"s", b"target", ROOT)
    t = clock.tick()
    assert cfs.readlink(s.ino) == b"target" and s.atime_ns == t
    clock.tick()
    cfs.readlink(s.ino)                         # relatime: newer than mtime and ctime
    assert s.atime_ns == t and s.ctime_ns < t


def test_fallocate(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f", b"abc")
    t = clock.tick()
    cfs.fallocate(f.ino, 0, 0, 3 * PAGE_SIZE)
    assert f.size == 3 * PAGE_SIZE and f.npages == 3 and f.mtime_ns == t
    assert bytes(cfs.read(f.ino, 0, 5)) == b"abc\0\0"
    cfs.fallocate(f.ino, FALLOC_FL_KEEP_SIZE, 3 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert f.size == 3 * PAGE_SIZE and f.npages == 5
    cfs.fallocate(f.ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2 * PAGE_SIZE)
    assert f.npages == 3 and bytes(cfs.read(f.ino, 0, 3)) == bytes(3)
    err(errno.EOPNOTSUPP, cfs.fallocate, f.ino, FALLOC_FL_PUNCH_HOLE, 0, 10)
    err(errno.EOPNOTSUPP, cfs.fallocate, f.ino, 0x10, 0, 10)     # ZERO_RANGE
    err(errno.EINVAL, cfs.fallocate, f.ino, 0, 0, 0)
    err(errno.EFBIG, cfs.fallocate, f.ino, 0, MAX_FILE_SIZE, 1)
    err(errno.ENOSPC, cfs.fallocate, f.ino, 0, 0, MAX_FILE_SIZE)
    assert f.npages == 3 and f.size == 3 * PAGE_SIZE
    err(errno.EISDIR, cfs.fallocate, ROOT_INO, 0, 0, 10)


# --- directories ---------------------------------------------------------------------------


def test_readdir_cookies_dot_entries_and_resume(fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    for n in (b"x", b"y", b"z"):
        mkfile(fs, n, parent=d.ino)
    listing = list(fs.readdir(d.ino, 0))
    assert [(c, n) for c, n, _ in listing[:2]] == [(1, b"."), (2, b"..")]
    assert sorted(n for _, n, _ in listing[2:]) == [b"x", b"y", b"z"]
    cookies = [c for c, _, _ in listing]
    assert cookies == sorted(cookies) and len(set(cookies)) == 5
    assert listing[0][2] is d and listing[1][2].ino == ROOT_INO
    cookie_of = {n: c for c, n, _ in listing}
    fs.unlink(d.ino, b"y", ROOT)
    mkfile(fs, b"y", parent=d.ino)
    assert {n: c for c, n, _ in fs.readdir(d.ino, 0)} == cookie_of   # a name keeps its cookie
    first = listing[2][0]
    assert [n for _, n, _ in fs.readdir(d.ino, first)] == [n for _, n, _ in listing[3:]]
    assert next(n for _, n, _ in fs.readdir(d.ino, 1)) == b".."
    err(errno.ENOTDIR, fs.readdir, fs.lookup(d.ino, b"x").ino, 0)


def test_a_walk_ends_while_every_entry_is_renamed_away_and_back(fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    other = fs.mkdir(ROOT_INO, b"other", DIR, ROOT)
    for i in range(300):
        mkfile(fs, b"f%03d" % i, parent=d.ino)
    seen = []
    for _cookie, name, _inode in fs.readdir(d.ino, 2):
        seen.append(name)
        fs.rename(d.ino, name, other.ino, name, 0, ROOT)
        fs.rename(other.ino, name, d.ino, name, 0, ROOT)
        assert len(seen) <= 300
    assert sorted(seen) == [b"f%03d" % i for i in range(300)]


def test_big_directory_operations_cost_about_the_same_as_small_ones(kernel: Kernel) -> None:
    """Creating, looking up, resuming a readdir and unlinking in a directory of 20 Ki
    entries makes about the calls it makes in one of 2 Ki (a B+tree one level deeper):
    nothing scans the directory."""
    fs = new_fs(kernel)

    def work(n: int) -> tuple[int, int]:
        d = fs.mkdir(ROOT_INO, b"d%d" % n, DIR, ROOT)
        for i in range(n - 200):
            fs.create(d.ino, b"file-%05d" % i, REG, ROOT)

        def creates() -> None:
            for i in range(n - 200, n):
                fs.create(d.ino, b"file-%05d" % i, REG, ROOT)

        def operations() -> None:
            for i in range(n - 200, n, 10):
                name = b"file-%05d" % i
                fs.lookup(d.ino, name)
                cookie, _ = fs.store.dirs.lookup(fs.get(d.ino), name)
                next(fs.readdir(d.ino, cookie), None)
                fs.unlink(d.ino, name, ROOT)
        counts = python_calls(creates), python_calls(operations)
        assert len(names(fs, d.ino)) == n - 20
        return counts
    small, big = work(2_000), work(20_000)
    assert big[0] < 1.3 * small[0] and big[1] < 1.3 * small[1], (small, big)


# --- extended attributes ----------------------------------------------------------------------


def test_xattrs(cfs: Filesystem, clock: Clock) -> None:
    f = mkfile(cfs, b"f")
    t = clock.tick()
    cfs.setxattr(f.ino, b"user.a", b"1", USER)
    cfs.setxattr(f.ino, b"security.b", b"", ROOT)
    cfs.setxattr(f.ino, b"trusted.c", b"3" * 65536, ROOT)
    assert f.ctime_ns == t
    assert cfs.getxattr(f.ino, b"user.a") == b"1" and cfs.getxattr(f.ino, b"security.b") == b""
    assert sorted(cfs.listxattr(f.ino)) == [b"security.b", b"trusted.c", b"user.a"]
    cfs.setxattr(f.ino, b"user.a", b"replaced", USER)
    assert cfs.getxattr(f.ino, b"user.a") == b"replaced"
    cfs.removexattr(f.ino, b"user.a", USER)
    err(errno.ENODATA, cfs.getxattr, f.ino, b"user.a")
    err(errno.ENODATA, cfs.removexattr, f.ino, b"user.a", USER)
    cfs.removexattr(f.ino, b"security.b", ROOT)
    cfs.removexattr(f.ino, b"trusted.c", ROOT)
    assert cfs.listxattr(f.ino) == [] and f.xattr == 0


@pytest.mark.parametrize("name,value,ctx,code", [
    (b"system.posix_acl_access", b"x", ROOT, errno.EINVAL),
    (b"system.sockprotoname", b"x", ROOT, errno.EOPNOTSUPP),
    (b"os2.name", b"x", ROOT, errno.EOPNOTSUPP),
    (b"user.", b"x", ROOT, errno.EINVAL),
    (b"user." + b"n" * 251, b"x", ROOT, errno.ERANGE),
    (b"", b"x", ROOT, errno.ERANGE),
    (b"user.big", b"v" * 65537, ROOT, errno.E2BIG),
    (b"trusted.t", b"x", USER, errno.EPERM),
])
def test_xattr_refusals(fs: Filesystem, name: bytes, value: bytes, ctx: Ctx, code: int) -> None:
    f = mkfile(fs, b"f")
    err(code, fs.setxattr, f.ino, name, value, ctx)
    assert f.xattr == 0


def test_xattrs_are_decoded_once_and_stay_right_through_refusals_and_rollbacks(
        fs: Filesystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """An inode with many xattrs: a getxattr reads the blob only when it changed (each
    read checked and decoded up to 1 MiB), and the decoded copy never shows what a
    refused or rolled-back change left in a caller's dict."""
    f = mkfile(fs, b"f")
    for i in range(300):
        fs.setxattr(f.ino, b"user.k%03d" % i, b"v" * 200, ROOT)
    reads = []
    real_read, real_write = blob.read, blob.write
    monkeypatch.setattr(blob, "read", lambda pages, pfn: reads.append(pfn) or real_read(pages, pfn))
    for i in range(300):
        assert fs.getxattr(f.ino, b"user.k%03d" % i) == b"v" * 200
    assert len(fs.listxattr(f.ino)) == 300 and reads == []
    # Refused before any change: the total would pass 1 MiB.
    big = b"w" * 65536
    with pytest.raises(FsError) as refused:
        for i in range(20):
            fs.setxattr(f.ino, b"user.big%02d" % i, big, ROOT)
    assert refused.value.errno == errno.ENOSPC
    stored = [n for n in fs.listxattr(f.ino) if n.startswith(b"user.big")]
    err(errno.ENODATA, fs.getxattr, f.ino, b"user.big%02d" % len(stored))
    # Rolled back: the blob cannot be written (no room), the old xattrs read back.
    monkeypatch.setattr(blob, "write", lambda *a: (_ for _ in ()).throw(OutOfMemory("full")))
    err(errno.ENOSPC, fs.setxattr, f.ino, b"user.k000", b"changed", ROOT)
    err(errno.ENOSPC, fs.removexattr, f.ino, b"user.k001", ROOT)
    assert fs.getxattr(f.ino, b"user.k000") == b"v" * 200
    assert fs.getxattr(f.ino, b"user.k001") == b"v" * 200
    assert len(fs.listxattr(f.ino)) == 300 + len(stored)
    monkeypatch.setattr(blob, "write", real_write)
    fs.store.forget_inode(f.ino)                # read from the arena again: the same
    reads.clear()
    assert fs.getxattr(f.ino, b"user.k000") == b"v" * 200
    assert len(fs.listxattr(f.ino)) == 300 + len(stored) and reads == [f.xattr]
    reads.clear()                               # the full check trusts no cache
    assert fs.check() == [] and f.xattr in reads


def test_removing_a_posix_acl_that_is_not_set_is_no_error(fs: Filesystem) -> None:
    """The kernel removes an ACL (removexattr, or setxattr of an empty value) by asking
    for its xattr's removal: tmpfs and ext4 answer 0 when there is none, and so do we;
    any other xattr that is not set is ENODATA."""
    f = mkfile(fs, b"f")
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    ctime = f.ctime_ns
    fs.removexattr(f.ino, b"system.posix_acl_access", ROOT)
    fs.removexattr(d.ino, b"system.posix_acl_default", ROOT)
    assert f.ctime_ns == ctime and f.xattr == 0 and d.xattr == 0
    err(errno.ENODATA, fs.removexattr, f.ino, b"user.none", ROOT)


def test_user_xattrs_only_on_files_and_directories(fs: Filesystem) -> None:
    fifo = fs.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, ROOT)
    err(errno.EPERM, fs.setxattr, fifo.ino, b"user.x", b"1", ROOT)
    err(errno.EPERM, fs.removexattr, fifo.ino, b"user.x", ROOT)
    fs.setxattr(ROOT_INO, b"user.x", b"1", ROOT)
    assert fs.getxattr(ROOT_INO, b"user.x") == b"1"
    err(errno.ENODATA, fs.getxattr, ROOT_INO, b"system.posix_acl_default")
    err(errno.EOPNOTSUPP, fs.getxattr, ROOT_INO, b"system.other")


# --- the whole filesystem ---------------------------------------------------------------------


def test_statfs_has_real_figures(fs: Filesystem) -> None:
    mkfile(fs, b"first")                    # the root directory's first B+tree page
    before = fs.statfs()
    assert before.f_bsize == before.f_frsize == PAGE_SIZE and before.f_namemax == 255
    assert before.f_bfree == fs.store.free_pages()
    assert before.f_bavail == before.f_bfree - fs.store.data_floor() > 0  # metadata's room
    assert before.f_blocks == before.f_bfree + fs.store.pool.nr_pages
    assert before.f_files == fs.sb.max_inodes
    mkfile(fs, b"f", b"x" * 10 * PAGE_SIZE)
    after = fs.statfs()
    # ten pages, and a page array for their PFNs (six fit in the record)
    assert after.f_bfree == before.f_bfree - 10 - 1 and after.f_blocks == before.f_blocks
    assert after.f_ffree == before.f_ffree - 1


def test_inode_limit(kernel: Kernel) -> None:
    fs = new_fs(kernel, max_inodes=3)
    mkfile(fs, b"a")
    mkfile(fs, b"b")
    err(errno.ENOSPC, fs.create, ROOT_INO, b"c", REG, ROOT)
    assert fs.statfs().f_ffree == 0


def test_fill_the_arena_then_delete_gives_the_space_back(fs: Filesystem) -> None:
    free, held = fs.store.free_pages(), fs.store.pool.nr_pages
    chunk = bytes(range(256)) * 16      # a page: a write that does not fit stores nothing
    files, stored = 0, 0
    while True:
        f = mkfile(fs, b"fill-%d" % files)
        files += 1
        try:
            for off in range(0, 3 * MiB, len(chunk)):
                n = fs.write(f.ino, off, chunk)
                stored += n
                if n < len(chunk):
                    raise FsError(errno.ENOSPC, "short")
        except FsError as e:
            assert e.errno == errno.ENOSPC
            break
    # Full: only the pages kept back for a handover and for metadata are left.
    assert not fs.store.data_room(1) and fs.statfs().f_bavail == 0
    assert fs.store.free_pages() >= fs.store.data_floor() - 1 and stored == sum(
        fs.lookup(ROOT_INO, b"fill-%d" % i).size for i in range(files))
    err(errno.ENOSPC, fs.write, f.ino, f.size, b"x")
    err(errno.ENOSPC, fs.fallocate, f.ino, 0, f.size, PAGE_SIZE)
    assert fs.check() == []
    small = mkfile(fs, b"small")                     # metadata still works when full
    fs.setxattr(small.ino, b"user.k", b"v", ROOT)
    for i in range(files):                           # every byte reads back
        g = fs.lookup(ROOT_INO, b"fill-%d" % i)
        data = bytes(fs.read(g.ino, 0, g.size))
        assert data == (chunk * (g.size // len(chunk) + 1))[:g.size]
    for i in range(files):
        fs.unlink(ROOT_INO, b"fill-%d" % i, ROOT)
    fs.unlink(ROOT_INO, b"small", ROOT)
    assert fs.store.free_pages() == free and fs.store.pool.nr_pages == held
    assert fs.statfs().f_bfree == free


def test_check_finds_inconsistencies(fs: Filesystem) -> None:
    f = mkfile(fs, b"f")
    with fs.store.transaction() as txn:
        f.nlink = 3
        fs.store.put(txn, f)
    assert any("nlink" in p for p in fs.check())
    with fs.store.transaction() as txn:
        f.nlink = 1
        fs.store.put(txn, f)


def test_a_filesystem_reopened_from_the_arena_is_the_same(fs: Filesystem) -> None:
    """What a handover and a crash both come down to: a new process opens the store in
    the arena, with nothing in memory, and finds everything."""
    d = fs.mkdir(ROOT_INO, b"d", DIR, USER)
    f = mkfile(fs, b"f", b"z" * (REGION_SIZE + 5000), parent=d.ino)
    fs.link(f.ino, ROOT_INO, b"link", ROOT)
    fs.symlink(d.ino, b"s", b"../link", ROOT)
    fs.symlink(d.ino, b"long", b"t" * 300, ROOT)
    fs.setxattr(f.ino, b"user.k", b"v", ROOT)
    used = fs.store.pool.nr_pages
    store, _ = MetaStore.open(fs.store.arena, fs.store.pool, fs.store.sb_pfn)
    back = Filesystem(store)
    assert back.check() == [] and back.store.pool.nr_pages == used
    g = back.lookup(back.lookup(ROOT_INO, b"d").ino, b"f")
    assert g is not f and g.ino == f.ino and g.nlink == 2
    assert back.getxattr(g.ino, b"user.k") == b"v"
    assert bytes(back.read(g.ino, 0, g.size)) == b"z" * g.size
    assert [c for c, _, _ in back.readdir(d.ino, 0)] == [c for c, _, _ in fs.readdir(d.ino, 0)]
    assert back.readlink(back.lookup(d.ino, b"s").ino) == b"../link"
    assert back.readlink(back.lookup(d.ino, b"long").ino) == b"t" * 300


# --- memory ------------------------------------------------------------------------------------


def test_python_memory_stays_flat_as_inodes_grow(boot_kernel: BootKernel,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Inodes live in the arena; Python keeps bounded caches of them and of names. With
    caches of 500, 3000 more files past full caches leave no Python memory behind (the test's
    pool keeps its blocks in a dict, and the buddy allocator its free lists: those are
    the kernel's, not the filesystem's, and are left out)."""
    monkeypatch.setattr("guestfs.store.store.CACHE_INODES", 500)
    monkeypatch.setattr("guestfs.store.directory.NAME_CACHE", 500)
    monkeypatch.setattr("guestfs.store.records.PAGE_CACHE", 16)
    fs = new_fs(boot_kernel(unique_name("fs"), memory=96 * MiB))
    d = fs.mkdir(ROOT_INO, b"many", DIR, ROOT)
    page = b"p" * PAGE_SIZE
    kernel_side = [tracemalloc.Filter(False, "*/fake_pool.py"),
                   tracemalloc.Filter(False, "*/page_alloc.py"),
                   tracemalloc.Filter(False, tracemalloc.__file__)]

    def grow(first: int, n: int) -> None:
        for i in range(first, first + n):
            f = fs.create(d.ino, b"file-%06d.txt" % i, 0o644, USER)
            fs.write(f.ino, 0, page)
    tracemalloc.start()
    try:
        grow(0, 1000)                       # fill the cache
        before = tracemalloc.take_snapshot().filter_traces(kernel_side)
        grow(1000, 3000)
        after = tracemalloc.take_snapshot().filter_traces(kernel_side)
    finally:
        tracemalloc.stop()
    more = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"\nPython memory for 3000 more files past a full cache: {more} B")
    assert more < 16 * 1024 and fs.store.cached() <= 500


# --- bulk frees stay within one transaction's limits -----------------------------------


def sparse_file(fs: Filesystem, name: bytes, regions: int, dense: int = 0) -> Inode:
    """A byte in each of `regions` 2 MiB regions, 4 MiB apart (each after a hole, so each
    gets a page array, not a folio), then `dense` regions of 511 written pages."""
    f = fs.create(ROOT_INO, name, REG, ROOT)
    for r in range(regions):
        fs.write(f.ino, 2 * r * REGION_SIZE, b"x")
    base = 2 * regions * REGION_SIZE + REGION_SIZE
    for r in range(dense):
        fs.write(f.ino, base + 2 * r * REGION_SIZE, b"y" * (511 * PAGE_SIZE))
    return f


def test_freeing_a_sparse_file_takes_as_many_transactions_as_it_needs(fs: Filesystem) -> None:
    free = fs.store.free_pages()
    f = sparse_file(fs, b"sparse", 80)
    g = sparse_file(fs, b"wide", 60)
    for r in range(60):                              # 40 pages in each region
        fs.write(g.ino, 2 * r * REGION_SIZE, b"w" * (40 * PAGE_SIZE))
    fs.unlink(ROOT_INO, b"sparse", ROOT)
    fs.unlink(ROOT_INO, b"wide", ROOT)
    assert gone(fs, f.ino) and gone(fs, g.ino) and fs.check() == []
    # Freed in steps through the orphan list, which keeps its one (now empty) leaf.
    assert fs.store.orphans() == [] and len(list(fs.store.orphan_pages())) == 1
    assert fs.store.free_pages() == free - 1


def test_a_split_truncate_leaves_no_stale_bytes(fs: Filesystem) -> None:
    f = sparse_file(fs, b"f", 80, dense=5)
    fs.setattr(f.ino, ROOT, size=0)
    assert fs.get(f.ino).npages == 0 and fs.check() == []
    fs.setattr(f.ino, ROOT, size=8 * MiB)
    assert bytes(fs.read(f.ino, 0, 8 * MiB)) == bytes(8 * MiB)


def test_an_open_unlinked_file_survives_a_split_truncate(fs: Filesystem) -> None:
    f = sparse_file(fs, b"f", 0, dense=5)
    fs.open(f.ino, os.O_RDWR)
    fs.unlink(ROOT_INO, b"f", ROOT)
    fs.setattr(f.ino, ROOT, size=PAGE_SIZE)          # more frees than one transaction
    assert fs.write(f.ino, 0, b"still here") == 10
    assert bytes(fs.read(f.ino, 0, 10)) == b"still here"
    fs.release(f.ino)
    assert fs.reap_pending() == 1       # a small file's free waits for others
    assert gone(fs, f.ino) and fs.check() == []


def _on_disk(fs: Filesystem) -> Superblock:
    """The superblock as its page says (not the live figures the store keeps)."""
    return Superblock.read(Pages(fs.store.arena), fs.store.sb_pfn)


def test_creates_and_frees_leave_the_superblock_alone_until_a_reopen_recounts(
        kernel: Kernel) -> None:
    """The counters live in memory: the first change flags the superblock and reserves
    inode numbers, later creates and frees write no superblock; a reopen (the last
    kernel died) recounts, and gives out no number that was given out before."""
    fs = new_fs(kernel)             # not the fixture: its store is stale after the reopen
    first = fs.create(ROOT_INO, b"first", REG, ROOT)
    flagged = _on_disk(fs)
    assert flagged.counts_stale and flagged.next_ino == first.ino + 1 + INO_RESERVE
    # Past the first record page, whose successor grows the inode table's root (which
    # the superblock holds): from here on nothing but the counters would change it.
    made = [fs.create(ROOT_INO, b"f%d" % i, REG, ROOT).ino for i in range(40)]
    page = bytes(fs.store.arena.view(fs.store.sb_pfn))
    made += [fs.create(ROOT_INO, b"f%d" % i, REG, ROOT).ino for i in range(40, 80)]
    for i in range(0, 80, 2):
        fs.unlink(ROOT_INO, b"f%d" % i, ROOT)
    assert bytes(fs.store.arena.view(fs.store.sb_pfn)) == page       # never written
    assert fs.sb.inode_count == 42 and fs.statfs().f_ffree == fs.sb.max_inodes - 42
    assert _on_disk(fs).inode_count != 42
    store = fs.store
    back = Filesystem(MetaStore.open(store.arena, store.pool, store.sb_pfn)[0])
    assert back.sb.inode_count == 42 and back.check() == []
    assert back.create(ROOT_INO, b"after", REG, ROOT).ino > max(made)


def test_a_recount_past_a_corrupt_record_page_stays_flagged_and_mountable(
        kernel: Kernel) -> None:
    """A record page that fails its checks counts as full at the recount: the count is
    then an upper bound, frees never take it below one, no handover writes it as exact,
    and the filesystem mounts again (the next mount counts again)."""
    fs = new_fs(kernel)
    for i in range(80):
        fs.create(ROOT_INO, b"f%d" % i, REG, ROOT)
    store = fs.store
    *_, (_, last) = store.itable._radix.items(store.itable.table)
    store.arena.view(last)[HEADER_SIZE + 200] ^= 0xFF          # its checksum fails now
    back = Filesystem(MetaStore.open(store.arena, store.pool, store.sb_pfn)[0])
    assert not back.store.count_exact and back.sb.inode_count >= 81
    intact = []
    for i in range(80):
        try:
            back.unlink(ROOT_INO, b"f%d" % i, ROOT)
            intact.append(i)
        except FsError as e:
            assert e.errno == errno.EIO                # only the corrupt page's inodes
    assert len(intact) > 40 and back.sb.inode_count >= 1
    back.store.flush_counters()
    assert _on_disk(back).counts_stale              # not written as exact
    again = Filesystem(MetaStore.open(store.arena, store.pool, store.sb_pfn)[0])
    assert 1 <= again.sb.inode_count <= again.sb.max_inodes
    problems = again.check()           # names the page, and goes on past it
    assert any("is corrupt" in p for p in problems)
    assert not any("root directory is missing" in p for p in problems)


def test_a_clean_handover_writes_exact_counters(kernel: Kernel) -> None:
    fs = new_fs(kernel)
    made = [fs.create(ROOT_INO, b"f%d" % i, REG, ROOT).ino for i in range(5)]
    fs.unlink(ROOT_INO, b"f0", ROOT)
    fs.store.flush_counters()
    exact = _on_disk(fs)
    assert not exact.counts_stale and (exact.inode_count, exact.next_ino) == \
        (5, max(made) + 1)
    store = fs.store
    back = Filesystem(MetaStore.open(store.arena, store.pool, store.sb_pfn)[0])
    assert back.check() == [] and back.create(ROOT_INO, b"g", REG, ROOT).ino == max(made) + 1


def test_a_rolled_back_create_gives_its_number_and_count_back(fs: Filesystem) -> None:
    fs.create(ROOT_INO, b"a", REG, ROOT)
    before = (fs.sb.next_ino, fs.sb.inode_count)
    with pytest.raises(RuntimeError), fs.store.transaction() as txn:
        fs.store.new_ino(txn)
        raise RuntimeError("cut short")
    assert (fs.sb.next_ino, fs.sb.inode_count) == before
    assert fs.create(ROOT_INO, b"b", REG, ROOT).ino == before[0]


def test_a_version_2_superblock_is_read_with_exact_counters(kernel: Kernel) -> None:
    """Release 0.3.0 wrote version 2, whose flags word is zero."""
    fs = new_fs(kernel)
    fs.create(ROOT_INO, b"a", REG, ROOT)
    fs.store.flush_counters()
    view = fs.store.arena.view(fs.store.sb_pfn)
    struct.pack_into("<I", view, HEADER_SIZE, 2)
    fs.store.pages.seal(fs.store.sb_pfn)
    store = fs.store
    back = Filesystem(MetaStore.open(store.arena, store.pool, store.sb_pfn)[0])
    assert (back.sb.inode_count, back.sb.next_ino) == (2, 3) and back.check() == []
    struct.pack_into("<I", view, HEADER_SIZE + 76, 1)              # flags, in version 2
    store.pages.seal(store.sb_pfn)
    with pytest.raises(CorruptPage, match="flags"):
        MetaStore.open(store.arena, store.pool, store.sb_pfn)


def test_an_orphan_too_large_for_one_transaction_is_freed_at_the_next_open(
        kernel: Kernel) -> None:
    fs = new_fs(kernel)             # not the fixture: its store is stale after the reopen
    f = sparse_file(fs, b"f", 80)
    fs.open(f.ino, os.O_RDWR)
    fs.unlink(ROOT_INO, b"f", ROOT)
    store = fs.store
    reopened = Filesystem(MetaStore.open(store.arena, store.pool.pool, store.sb_pfn)[0])
    assert reopened.finish_orphans() == 1
    assert gone(reopened, f.ino) and reopened.check() == []


def test_fallocate_and_punch_of_many_regions(fs: Filesystem) -> None:
    f = fs.create(ROOT_INO, b"f", REG, ROOT)
    fs.fallocate(f.ino, 0, 0, 24 * MiB)
    assert fs.get(f.ino).size == 24 * MiB and fs.get(f.ino).npages == 24 * MiB // PAGE_SIZE
    fs.write(f.ino, 3 * MiB, b"keep")
    fs.fallocate(f.ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * MiB, 19 * MiB)
    assert bytes(fs.read(f.ino, 3 * MiB, 4)) == b"keep" and fs.check() == []
    assert bytes(fs.read(f.ino, 5 * MiB, 1 * MiB)) == bytes(1 * MiB)
    fs.fallocate(f.ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MAX_FILE_SIZE - 1)
    assert fs.get(f.ino).npages == 0 and fs.get(f.ino).size == 24 * MiB   # visits 6 steps


def test_a_rolled_back_change_leaves_no_remembered_record_page(fs: Filesystem) -> None:
    """The inode table remembers where record pages are; a page made by a change that
    rolls back is released, and must not be remembered."""
    store = fs.store
    ino = 31 * 50 + 3                       # a record page of its own, made below
    with pytest.raises(RuntimeError), store.transaction() as txn:
        inode = Inode(ino=ino, mode=REG, uid=0, gid=0, nlink=1, atime_ns=0, mtime_ns=0,
                      ctime_ns=0)
        store.itable.put(txn, inode)
        assert store.itable.get(ino) is not None and store.itable.page_of(ino)
        raise RuntimeError("the rest of the change failed")
    assert store.itable.page_of(ino) == 0 and store.itable.get(ino) is None
