"""The filesystem core at its edges, without FUSE: times over the kernel's whole range,
a full arena and a kernel that dies, restore refusing what it cannot trust, sparse files
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

from guestfs import acl, handover
from guestfs.acl import Entry, Tag
from guestfs.errors import FsError
from guestfs.filesystem import (RENAME_NOREPLACE, RENAME_WHITEOUT, TIME_MAX_NS, TIME_MIN_NS,
                                AtimeMode, AtimePolicy, Ctx, Filesystem)
from guestfs.inode import ROOT_INO
from guestfs.store.superblock import MAX_FILE_SIZE
from kho_backend.boot import Kernel
from kho_backend.errors import HandoverError
from kho_backend.units import PAGE_SIZE

MiB = 1 << 20
GiB = 1 << 30
ROOT = Ctx(uid=0, gid=0)
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


class NewFs:
    """``new_fs(memory)``: a fresh filesystem on a new machine, as a mount makes it;
    ``new_fs.kernels`` are the kernels booted so far, the running one last."""

    def __init__(self, boot_kernel: BootKernel) -> None:
        self.boot_kernel = boot_kernel
        self.kernels: list[Kernel] = []

    def __call__(self, memory: int = 32 * MiB) -> Filesystem:
        kernel = self.boot_kernel(unique_name("edge"), memory=memory)
        return self.started(kernel, handover.format(kernel))

    def started(self, kernel: Kernel, fs: Filesystem) -> Filesystem:
        kernel.kho.register(handover.GuestfsHandover(fs))
        kernel.finish_boot()
        self.kernels.append(kernel)
        return fs


@pytest.fixture
def new_fs(boot_kernel: BootKernel) -> NewFs:
    return NewFs(boot_kernel)


def hand_over(fs: Filesystem, new_fs: NewFs, boot_kernel: BootKernel, *,
              check: bool = True) -> Filesystem:
    """Unmount-style handover into the arena, a new boot on the machine, restore."""
    kernel = new_fs.kernels[-1]
    kernel.kexec.prepare({}, exec=False)
    kernel.shutdown()
    successor = boot_kernel(kernel.name)
    restored = handover.restore(successor)
    assert restored is not None
    if check:
        assert restored.check() == []
    return new_fs.started(successor, restored)


def walk(fs: Filesystem, ino: int = ROOT_INO) -> list[bytes]:
    return [name for _, name, _ in fs.readdir(ino, 0)][2:]


# --- times ------------------------------------------------------------------------------

TIMES = [-1, -10 * 365 * 86400 * 10**9, TIME_MIN_NS, TIME_MAX_NS,
         (2600 - 1970) * 31_556_952 * 10**9, (1 << 64) - 1, 1_700_000_000_123_456_789]


def test_times_round_trip_through_a_handover(new_fs, boot_kernel: BootKernel) -> None:
    fs = new_fs()
    for i, t in enumerate(TIMES):
        f = fs.create(ROOT_INO, b"t%d" % i, REG, ROOT)
        fs.setattr(f.ino, ROOT, atime_ns=t, mtime_ns=TIMES[-1 - i], ctime_ns=t)
    back = hand_over(fs, new_fs, boot_kernel)
    for i, t in enumerate(TIMES):
        f = back.lookup(ROOT_INO, b"t%d" % i)
        assert (f.atime_ns, f.mtime_ns, f.ctime_ns) == (t, TIMES[-1 - i], t)
    # and once more
    again = hand_over(back, new_fs, boot_kernel)
    assert again.lookup(ROOT_INO, b"t2").atime_ns == TIME_MIN_NS


def test_the_clock_has_nanoseconds(new_fs) -> None:
    fs = new_fs()
    stamps = {fs.create(ROOT_INO, b"c%d" % i, REG, ROOT).ctime_ns % 1_000_000 for i in range(20)}
    assert stamps != {0}, "times are rounded to milliseconds"


# --- a full arena, and a kernel that dies ------------------------------------------------


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


def snapshot(fs: Filesystem, ino: int = ROOT_INO, path: bytes = b"") -> dict:
    """Every path with its attributes, xattrs, target or bytes."""
    out = {}
    for _, name, inode in list(fs.readdir(ino, 0))[2:]:
        p = path + b"/" + name
        out[p] = (inode.ino, inode.mode, inode.nlink, inode.size, inode.mtime_ns,
                  sorted(fs.listxattr_items(inode.ino)),
                  fs.readlink(inode.ino) if inode.is_symlink else
                  bytes(fs.read(inode.ino, 0, inode.size)) if inode.is_reg else None)
        if inode.is_dir:
            out.update(snapshot(fs, inode.ino, p))
    return out


@pytest.mark.parametrize("seed", range(2))
def test_a_kernel_that_dies_without_handing_over_loses_nothing(new_fs, seed: int,
                                                               boot_kernel: BootKernel) -> None:
    """Everything a call returned is in the arena already: the next boot takes it up
    from the dead kernel's live KHO root (a crash boot), with no handover at all."""
    fs = new_fs(64 * MiB)
    random_tree(fs, random.Random(seed), 300)
    before = snapshot(fs)
    generation = fs.sb.generation
    name = new_fs.kernels[-1].name
    new_fs.kernels[-1].shutdown()           # no kexec, no unmount: as a SIGKILL leaves it
    successor = boot_kernel(name)
    assert successor.kho_in is not None and successor.kho_in.crashed
    back = handover.restore(successor)
    assert back is not None and back.check() == []
    assert snapshot(back) == before and back.sb.generation == generation + 1


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
    assert fs.check() == []
    back = hand_over(fs, new_fs, boot_kernel)
    assert back.lookup(ROOT_INO, b"data").size == offset
    assert set(walk(back)) == {b"data", *names}
    back.unlink(ROOT_INO, names[0], ROOT)           # a full arena still takes an unlink
    assert back.check() == []


# --- restore refuses what it cannot trust ---------------------------------------------------


def test_a_corrupt_superblock_is_refused_and_the_arena_kept(new_fs,
                                                           boot_kernel: BootKernel) -> None:
    fs = new_fs()
    fs.create(ROOT_INO, b"f", REG, ROOT)
    arena, sb_pfn = fs.store.arena, fs.store.sb_pfn
    kernel = new_fs.kernels[-1]
    kernel.kexec.prepare({}, exec=False)
    arena.view(sb_pfn)[200] ^= 0x10
    kernel.shutdown()
    successor = boot_kernel(kernel.name)
    with pytest.raises(HandoverError, match="superblock"):
        handover.restore(successor)
    successor.shutdown()
    again = boot_kernel(kernel.name)                # still there, still refused
    assert again.kho_in is not None and handover.NAME in again.kho_in.subtrees


def test_a_corrupt_record_answers_eio_names_the_page_and_fsck_finds_it(
        new_fs, boot_kernel: BootKernel, caplog: pytest.LogCaptureFixture) -> None:
    fs = new_fs()
    f = fs.create(ROOT_INO, b"f", REG, ROOT)
    back = hand_over(fs, new_fs, boot_kernel)
    page = back.store.itable.page_of(f.ino)
    back.store.arena.view(page)[4096 - 9] ^= 0x01    # a byte of the record page's tail
    back = hand_over(back, new_fs, boot_kernel, check=False)
    with pytest.raises(FsError) as eio:
        back.get(f.ino)
    assert eio.value.errno == errno.EIO and f"page {page}" in caplog.text
    problems = back.check()
    assert problems and any(str(page) in p for p in problems)


# --- files, names, directories -----------------------------------------------------------
# --- files, names, directories -----------------------------------------------------------


def test_sparse_files_far_beyond_the_arena(new_fs, boot_kernel: BootKernel) -> None:
    fs = new_fs(16 * MiB)
    f = fs.create(ROOT_INO, b"sparse", REG, ROOT)
    fs.setattr(f.ino, ROOT, size=10 * GiB)
    assert fs.write(f.ino, 10 * 10**9, b"end") == 3 and fs.get(f.ino).npages == 1
    fs.write(f.ino, MAX_FILE_SIZE - 1, b"!")
    assert f.size == MAX_FILE_SIZE and bytes(fs.read(f.ino, 10 * 10**9 - 2, 5)) == b"\0\0end"
    with pytest.raises(FsError) as too_far:
        fs.write(f.ino, MAX_FILE_SIZE, b"x")
    assert too_far.value.errno == errno.EFBIG
    back = hand_over(fs, new_fs, boot_kernel)
    g = back.lookup(ROOT_INO, b"sparse")
    assert g.size == MAX_FILE_SIZE and bytes(back.read(g.ino, 10 * 10**9, 3)) == b"end"
    back.setattr(g.ino, ROOT, size=PAGE_SIZE)
    assert g.npages == 0


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
    back = hand_over(fs, new_fs, boot_kernel)
    assert stat.S_ISCHR(back.lookup(ROOT_INO, b"a").mode)


def test_a_walk_ends_while_entries_are_renamed_away_and_back(new_fs) -> None:
    fs = new_fs()
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    other = fs.mkdir(ROOT_INO, b"o", DIR, ROOT)
    for i in range(50):
        fs.create(d.ino, b"f%02d" % i, REG, ROOT)
    seen = []
    for _, name, _ in fs.readdir(d.ino, 0):
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
    assert stat.S_IMODE(f.mode) == 0o600 and fs.listxattr(f.ino) == []
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
    assert stat.S_IMODE(f.mode) == 0o640 and acl.ACCESS in fs.listxattr(f.ino)
    assert fs.getxattr(sub.ino, acl.DEFAULT) == NAMED and stat.S_IMODE(sub.mode) == 0o750
    assert fs.listxattr(link.ino) == []
    want = fs.getxattr(f.ino, acl.ACCESS)
    back = hand_over(fs, new_fs, boot_kernel)
    g = back.lookup(back.lookup(ROOT_INO, b"d").ino, b"f")
    assert back.getxattr(g.ino, acl.ACCESS) == want


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



def test_an_arena_full_of_metadata_still_takes_an_unlink(new_fs,
                                                        boot_kernel: BootKernel) -> None:
    """Long symlink targets (a page of metadata each) fill every page metadata may take,
    while the kernel holds every name (as after a create through a mount): removing a
    held name puts its inode on the orphan list, which needs a page of the removal
    reserve, and the forget then gives the room back."""
    fs = new_fs(16 * MiB)
    d = fs.mkdir(ROOT_INO, b"d", DIR, ROOT)
    plain = fs.create(ROOT_INO, b"plain", REG, ROOT)
    held = [d.ino, plain.ino]
    with pytest.raises(FsError) as full:
        for i in range(100_000):
            held.append(fs.symlink(ROOT_INO, b"s%d" % i, b"t" * 4000, ROOT).ino)
    assert full.value.errno == errno.ENOSPC and len(held) > 100
    for ino in held:
        fs.ref(ino)
    free = fs.store.free_pages()
    fs.unlink(ROOT_INO, b"s0", ROOT)
    fs.unlink(ROOT_INO, b"plain", ROOT)
    fs.rmdir(ROOT_INO, b"d", ROOT)
    with pytest.raises(FsError) as still_full:          # growth leaves the reserve alone
        fs.symlink(ROOT_INO, b"more", b"t" * 4000, ROOT)
    assert still_full.value.errno == errno.ENOSPC
    for i in range(1, 6):
        fs.unlink(ROOT_INO, b"s%d" % i, ROOT)
    for ino in held[:8]:
        fs.forget(ino, 1)
    fs.reap_pending()
    # The six targets' pages are free again; the orphan list keeps its (empty) leaf.
    assert fs.store.free_pages() == free + 6 - 1 and fs.check() == []
    fs.symlink(ROOT_INO, b"more", b"t" * 4000, ROOT)
    back = hand_over(fs, new_fs, boot_kernel)
    assert sorted(walk(back)) == sorted([b"more", *(b"s%d" % i for i in range(6, len(held) - 2))])
