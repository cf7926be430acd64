"""The filesystem core at its edges, without FUSE: times over the kernel's whole range,
the handover's reserve on a full arena, restore refusing impossible values, sparse files
far beyond the arena, whiteouts, file handles, directory walks that end, ACLs and the
atime options. Handovers here are real (KHO finalize, boot parameters, a new boot)."""

from __future__ import annotations

import dataclasses
import errno
import random
import stat
from collections.abc import Callable

import msgpack
import pytest
from conftest_machine import BootKernel, boot_kernel, machine_env, unique_name  # noqa: F401

from guestfs import acl, inode_table
from guestfs.acl import Entry, Tag
from guestfs.errors import FsError
from guestfs.filesystem import (RENAME_NOREPLACE, RENAME_WHITEOUT, TIME_MAX_NS, TIME_MIN_NS,
                                AtimeMode, AtimePolicy, Ctx, Filesystem, inode_table_bytes)
from guestfs.handover import GuestfsHandover, restore
from guestfs.inode_table import encode_table
from guestfs.inode import ROOT_INO
from guestfs.reserve import EXTENT_BYTES, TABLE_BYTES
from guestfs.superblock import MAX_FILE_SIZE
from kho_backend.errors import HandoverError
from kho_backend.units import PAGE_SIZE

MiB = 1 << 20
GiB = 1 << 30
ROOT = Ctx(uid=0, gid=0)
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
def new_fs(boot_kernel: BootKernel) -> Callable[..., Filesystem]:
    """``new_fs(memory)``: a fresh filesystem on a new machine, registered with KHO."""
    def make(memory: int = 32 * MiB) -> Filesystem:
        kernel = boot_kernel(unique_name("edge"), memory=memory)
        kernel.finish_boot()
        fs = Filesystem(kernel)
        kernel.kho.register(GuestfsHandover(fs))
        return fs
    return make


def hand_over(fs: Filesystem, boot_kernel: BootKernel) -> Filesystem:
    """Unmount-style handover into the arena, a new boot on the machine, restore."""
    kernel = fs.kernel
    kernel.kexec.prepare({}, exec=False)
    kernel.shutdown()
    successor = boot_kernel(kernel.name)
    restored = restore(successor)
    assert restored is not None
    successor.finish_boot()
    successor.kho.register(GuestfsHandover(restored))
    assert restored.check() == []
    return restored


def walk(fs: Filesystem, ino: int = ROOT_INO, before: int | None = None) -> list[bytes]:
    return [name for _, name, _ in fs.readdir(ino, 0, before)][2:]


# --- times ------------------------------------------------------------------------------

TIMES = [-1, -10 * 365 * 86400 * 10**9, TIME_MIN_NS, TIME_MAX_NS,
         (2600 - 1970) * 31_556_952 * 10**9, (1 << 64) - 1, 1_700_000_000_123_456_789]


def test_times_round_trip_through_a_handover(new_fs, boot_kernel: BootKernel) -> None:
    fs = new_fs()
    for i, t in enumerate(TIMES):
        f = fs.create(ROOT_INO, b"t%d" % i, REG, ROOT)
        fs.setattr(f.ino, ROOT, atime_ns=t, mtime_ns=TIMES[-1 - i], ctime_ns=t)
    back = hand_over(fs, boot_kernel)
    for i, t in enumerate(TIMES):
        f = back.lookup(ROOT_INO, b"t%d" % i)
        assert (f.atime_ns, f.mtime_ns, f.ctime_ns) == (t, TIMES[-1 - i], t)
    # and once more, from a table that holds msgpack timestamps
    again = hand_over(back, boot_kernel)
    assert again.lookup(ROOT_INO, b"t2").atime_ns == TIME_MIN_NS


def test_the_clock_has_nanoseconds(new_fs) -> None:
    fs = new_fs()
    stamps = {fs.create(ROOT_INO, b"c%d" % i, REG, ROOT).ctime_ns % 1_000_000 for i in range(20)}
    assert stamps != {0}, "times are rounded to milliseconds"


# --- the handover's reserve -------------------------------------------------------------


def random_tree(fs: Filesystem, rng: random.Random, n: int) -> None:
    dirs = [ROOT_INO]
    for i in range(n):
        name = bytes(rng.choice(b"abcdefgh") for _ in range(rng.choice((1, 12, 255))))
        name = name[:-4] + b"%04d" % i if len(name) > 4 else name + b"%d" % i
        parent = rng.choice(dirs)
        kind = rng.random()
        if kind < 0.2:
            dirs.append(fs.mkdir(parent, name, DIR, ROOT).ino)
            continue
        if kind < 0.3:
            fs.symlink(parent, name, b"t" * rng.choice((1, 100, 4095)), ROOT)
            continue
        f = fs.create(parent, name, REG, ROOT)
        for _ in range(rng.randrange(3)):
            fs.setxattr(f.ino, b"user.%d" % rng.randrange(5), b"v" * rng.choice((0, 10, 4000)),
                        ROOT)
        for _ in range(rng.randrange(4)):      # scattered pages: many extents
            fs.write(f.ino, rng.randrange(64) * PAGE_SIZE, b"d" * rng.choice((1, 5000)))
        if rng.random() < 0.2:
            fs.rename(parent, name, rng.choice(dirs), b"moved-%d" % i, RENAME_NOREPLACE, ROOT)
        elif rng.random() < 0.1:
            fs.unlink(parent, name, ROOT)


@pytest.mark.parametrize("seed", range(4))
def test_reserve_bounds_the_inode_table(new_fs, seed: int) -> None:
    fs = new_fs(64 * MiB)
    random_tree(fs, random.Random(seed), 400)
    measured = TABLE_BYTES + sum(map(inode_table_bytes, fs.inodes.values()))
    assert fs.reserve.meta_bytes == measured, "an operation did not keep the bound"
    table = encode_table(fs)
    assert len(table.payload) <= fs.reserve.meta_bytes + fs.pool.allocations * EXTENT_BYTES


def test_a_full_arena_still_hands_over_every_file(new_fs, boot_kernel: BootKernel) -> None:
    """Filled with data, then with 255-byte names and xattrs until even metadata gets
    ENOSPC: the handover still fits, and every file comes back."""
    fs = new_fs(16 * MiB)
    f = fs.create(ROOT_INO, b"data", REG, ROOT)
    offset = 0
    for size in (MiB, PAGE_SIZE):     # a write that does not fit whole stores nothing
        with pytest.raises(FsError) as full:
            while True:
                offset += fs.write(f.ino, offset, b"x" * size)
        assert full.value.errno == errno.ENOSPC
    assert fs.statfs().f_bavail == 0
    names = []
    with pytest.raises(FsError) as meta_full:
        for i in range(100_000):
            name = b"%05d" % i + b"n" * 250
            g = fs.create(ROOT_INO, name, REG, ROOT)
            names.append(name)
            fs.setxattr(g.ino, b"user.k", b"v" * 100, ROOT)
    assert meta_full.value.errno == errno.ENOSPC and len(names) > 10
    back = hand_over(fs, boot_kernel)
    assert back.lookup(ROOT_INO, b"data").size == offset
    assert set(walk(back)) == {b"data", *names}


# --- restore refuses impossible values ----------------------------------------------------


def _tamper(monkeypatch: pytest.MonkeyPatch, change: Callable[[dict], None]) -> None:
    """Make the next handover's inode table carry a change (valid checksums)."""
    real = inode_table.encode_table

    def encode(fs: Filesystem) -> inode_table.EncodedTable:
        table = real(fs)
        doc = msgpack.unpackb(table.payload, raw=False, strict_map_key=False)
        change(doc)
        return dataclasses.replace(table, payload=msgpack.packb(doc, use_bin_type=True))
    monkeypatch.setattr(inode_table, "encode_table", encode)


def _row_of(doc: dict, ino: int) -> list:
    return next(row for row in doc["attrs"] if row[0] == ino)


@pytest.mark.parametrize("change,expect", [
    (lambda d, ino: _row_of(d, ino).__setitem__(2, 1 << 32), "uid is 4294967296"),
    (lambda d, ino: _row_of(d, ino).__setitem__(3, -1), "gid is -1"),
    (lambda d, ino: _row_of(d, ino).__setitem__(9, 1 << 63), "size is"),
    (lambda d, ino: _row_of(d, ino).__setitem__(4, 0), "nlink is 0"),
    (lambda d, ino: _row_of(d, ino).__setitem__(6, True), "bool"),
    (lambda d, ino: _row_of(d, ino).__setitem__(6, "yesterday"), "str"),
    (lambda d, ino: d["files"][0][1][0].__setitem__(0, True), "not 4 integers"),
    (lambda d, ino: d["files"][0][1][0].__setitem__(3, 3), "impossible extent"),
    (lambda d, ino: d["dirs"][0][3].append([b"x", ino, -5]), "not an integer in"),
    (lambda d, ino: d["xattrs"].append([ino, {b"os2.x": b"1"}]), "malformed xattrs"),
    (lambda d, ino: d["symlinks"].append([ino, b"a\0b"]), "malformed target|symlink"),
])
def test_restore_refuses_impossible_values(new_fs, boot_kernel: BootKernel,
                                           monkeypatch: pytest.MonkeyPatch, change,
                                           expect: str) -> None:
    fs = new_fs()
    f = fs.create(ROOT_INO, b"f", REG, ROOT)
    fs.write(f.ino, 0, b"data")
    _tamper(monkeypatch, lambda doc: change(doc, f.ino))
    kernel = fs.kernel
    kernel.kexec.prepare({}, exec=False)
    kernel.shutdown()
    successor = boot_kernel(kernel.name)
    with pytest.raises(HandoverError, match=expect):
        restore(successor)


def test_restore_refuses_impossible_superblock_values(new_fs, boot_kernel: BootKernel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fs = new_fs()
    fs.sb.max_inodes = 0
    kernel = fs.kernel
    kernel.kexec.prepare({}, exec=False)
    kernel.shutdown()
    with pytest.raises(HandoverError, match="max-inodes is 0"):
        restore(boot_kernel(kernel.name))


# --- files, names, directories -----------------------------------------------------------


def test_sparse_files_far_beyond_the_arena(new_fs, boot_kernel: BootKernel) -> None:
    fs = new_fs(16 * MiB)
    f = fs.create(ROOT_INO, b"sparse", REG, ROOT)
    fs.setattr(f.ino, ROOT, size=10 * GiB)
    assert fs.write(f.ino, 10 * 10**9, b"end") == 3 and f.pages.npages == 1
    fs.write(f.ino, MAX_FILE_SIZE - 1, b"!")
    assert f.size == MAX_FILE_SIZE and bytes(fs.read(f.ino, 10 * 10**9 - 2, 5)) == b"\0\0end"
    with pytest.raises(FsError) as too_far:
        fs.write(f.ino, MAX_FILE_SIZE, b"x")
    assert too_far.value.errno == errno.EFBIG
    back = hand_over(fs, boot_kernel)
    g = back.lookup(ROOT_INO, b"sparse")
    assert g.size == MAX_FILE_SIZE and bytes(back.read(g.ino, 10 * 10**9, 3)) == b"end"
    back.setattr(g.ino, ROOT, size=PAGE_SIZE)
    assert g.pages is None


def test_dot_lookup_answers_any_inode(new_fs) -> None:
    """What the kernel asks to resolve a file handle (open_by_handle_at, NFS)."""
    fs = new_fs()
    f = fs.create(ROOT_INO, b"f", REG, ROOT)
    assert fs.lookup(f.ino, b".") is f and fs.lookup(ROOT_INO, b".").ino == ROOT_INO
    fs.unlink(ROOT_INO, b"f", ROOT)
    with pytest.raises(FsError) as gone:
        fs.lookup(f.ino, b".")
    assert gone.value.errno == errno.ENOENT


def test_rename_whiteout_leaves_a_character_device(new_fs, boot_kernel: BootKernel) -> None:
    fs = new_fs()
    f = fs.create(ROOT_INO, b"a", REG, ROOT)
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_WHITEOUT, Ctx(uid=7, gid=8))
    wo = fs.lookup(ROOT_INO, b"a")
    assert stat.S_ISCHR(wo.mode) and stat.S_IMODE(wo.mode) == 0 and wo.rdev == 0
    assert (wo.uid, wo.gid) == (7, 8) and fs.lookup(ROOT_INO, b"b") is f
    back = hand_over(fs, boot_kernel)
    assert stat.S_ISCHR(back.lookup(ROOT_INO, b"a").mode)


def test_a_walk_ends_while_entries_are_renamed_away_and_back(new_fs) -> None:
    fs = new_fs()
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    other = fs.mkdir(ROOT_INO, b"o", DIR, ROOT)
    for i in range(50):
        fs.create(d.ino, b"f%02d" % i, REG, ROOT)
    seen = []
    for _, name, _ in fs.readdir(d.ino, 0, fs.readdir_end(d.ino)):
        if name in (b".", b".."):
            continue
        seen.append(name)
        fs.rename(d.ino, name, other.ino, name, 0, ROOT)
        fs.rename(other.ino, name, d.ino, name, 0, ROOT)
        assert len(seen) <= 50
    assert sorted(seen) == [b"f%02d" % i for i in range(50)]


# --- ACLs and atime ---------------------------------------------------------------------

NAMED = acl.pack((Entry(Tag.USER_OBJ, 7), Entry(Tag.USER, 5, 1000), Entry(Tag.GROUP_OBJ, 5),
                  Entry(Tag.MASK, 5), Entry(Tag.OTHER, 0)))


def test_access_acl_sets_the_mode_and_chmod_sets_the_acl(new_fs) -> None:
    fs = new_fs()
    f = fs.create(ROOT_INO, b"f", stat.S_IFREG | 0o600, ROOT)
    fs.setxattr(f.ino, acl.ACCESS, NAMED, ROOT)
    assert stat.S_IMODE(f.mode) == 0o750 and fs.getxattr(f.ino, acl.ACCESS) == NAMED
    fs.setattr(f.ino, ROOT, mode=0o604)
    assert acl.mode_bits(acl.parse(fs.getxattr(f.ino, acl.ACCESS))) == (0o604, False)
    plain = acl.pack((Entry(Tag.USER_OBJ, 6), Entry(Tag.GROUP_OBJ, 0), Entry(Tag.OTHER, 0)))
    fs.setxattr(f.ino, acl.ACCESS, plain, ROOT)         # says no more than the mode
    assert stat.S_IMODE(f.mode) == 0o600 and f.xattrs is None
    with pytest.raises(FsError) as not_dir:
        fs.setxattr(f.ino, acl.DEFAULT, NAMED, ROOT)
    assert not_dir.value.errno == errno.EACCES


def test_default_acl_is_inherited(new_fs, boot_kernel: BootKernel) -> None:
    fs = new_fs()
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    fs.setxattr(d.ino, acl.DEFAULT, NAMED, ROOT)
    f = fs.create(d.ino, b"f", stat.S_IFREG | 0o666, ROOT)
    sub = fs.mkdir(d.ino, b"sub", stat.S_IFDIR | 0o777, ROOT)
    link = fs.symlink(d.ino, b"l", b"f", ROOT)
    assert stat.S_IMODE(f.mode) == 0o640 and acl.ACCESS in f.xattrs
    assert sub.xattrs[acl.DEFAULT] == NAMED and stat.S_IMODE(sub.mode) == 0o750
    assert link.xattrs is None
    back = hand_over(fs, boot_kernel)
    g = back.lookup(back.lookup(ROOT_INO, b"d").ino, b"f")
    assert back.getxattr(g.ino, acl.ACCESS) == f.xattrs[acl.ACCESS]


@pytest.mark.parametrize("policy,moves_file,moves_dir", [
    (AtimePolicy(AtimeMode.NOATIME), False, False),
    (AtimePolicy(AtimeMode.STRICTATIME), True, True),
    (AtimePolicy(AtimeMode.STRICTATIME, directories=False), True, False),
])
def test_atime_policy(new_fs, policy: AtimePolicy, moves_file: bool, moves_dir: bool) -> None:
    fs = new_fs()
    fs.atime = policy
    f = fs.create(ROOT_INO, b"f", REG, ROOT)
    fs.write(f.ino, 0, b"x")
    fs.setattr(f.ino, ROOT, atime_ns=TIMES[-1] + 10**12)       # newer than mtime
    fs.setattr(ROOT_INO, ROOT, atime_ns=TIMES[-1] + 10**12)
    fs.read(f.ino, 0, 1)
    list(fs.readdir(ROOT_INO, 0))
    assert (f.atime_ns != TIMES[-1] + 10**12) == moves_file
    assert (fs.get(ROOT_INO).atime_ns != TIMES[-1] + 10**12) == moves_dir
