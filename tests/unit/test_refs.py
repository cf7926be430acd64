"""The kernel's references: lookup and open counts, their memory, and the filesystem's
use of them (forget, forget_session, an adopted table)."""

from __future__ import annotations

import os
import stat
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from conftest_machine import (BootKernel, boot_kernel, gone, machine_env,  # noqa: F401
                              new_fs, unique_name)

from guestfs.filesystem import Ctx, Filesystem
from guestfs.inode import ROOT_INO
from guestfs.refs import BLOCK_INOS, SET_INOS, InodeSet, KernelRefs

MiB = 1 << 20
ROOT = Ctx(uid=0, gid=0)
REG = stat.S_IFREG | 0o644


@pytest.fixture
def fs(boot_kernel: BootKernel) -> Iterator[Filesystem]:
    fs = new_fs(boot_kernel(unique_name("refs"), memory=32 * MiB))
    yield fs
    assert fs.check() == []


def test_lookups_add_and_drop_never_below_zero() -> None:
    refs = KernelRefs()
    refs.add_lookups(5, 3)
    refs.add_lookups(5, 2)
    assert refs.lookups(5) == 5 and refs.held(5) and not refs.held(6)
    refs.drop_lookups(5, 4)
    assert refs.lookups(5) == 1
    refs.drop_lookups(5, 7)
    assert refs.lookups(5) == 0 and not refs.held(5)
    refs.drop_lookups(5, 1)                 # a late forget
    refs.drop_lookups(10**12, 1)            # of an inode never seen
    assert refs.lookups(5) == 0 and refs.lookups(10**12) == 0


def test_counts_take_the_kernels_whole_range() -> None:
    refs = KernelRefs()
    refs.add_lookups(7, (1 << 63))
    refs.add_lookups(7, (1 << 63) - 1)
    assert refs.lookups(7) == (1 << 64) - 1
    refs.drop_lookups(7, (1 << 64) - 1)
    assert not refs.held(7)


def test_a_count_that_outgrows_its_slot_is_kept_apart_and_comes_back() -> None:
    refs = KernelRefs()
    refs.add_lookups(7, 0xFFFE)
    refs.add_lookups(8, 1)
    refs.add_lookups(7, 1)                  # no longer fits 16 bits
    assert refs.lookups(7) == 0xFFFF and refs.lookups(8) == 1
    refs.add_lookups(7, 1 << 40)
    refs.drop_lookups(7, (1 << 40) + 1)     # fits again
    assert refs.lookups(7) == 0xFFFE
    again = KernelRefs.restored(refs.packed(), {})
    assert again.lookups(7) == 0xFFFE and again.lookups(8) == 1
    refs.add_lookups(7, 2)
    refs.drop_lookups(7, 1 << 20)           # all of them
    refs.drop_lookups(8, 1)
    assert not refs.held(7) and refs.packed().keys.tolist() == []


def test_opens_are_counted_apart_from_lookups() -> None:
    refs = KernelRefs()
    refs.open(9)
    refs.open(9)
    assert refs.held(9) and refs.opens(9) == 2 and refs.lookups(9) == 0
    refs.release(9)
    assert refs.opens(9) == 1
    refs.release(9)
    refs.release(9)                          # a release too many stays at zero
    assert refs.opens(9) == 0 and not refs.held(9)


def test_neighbours_in_one_block_are_independent() -> None:
    refs = KernelRefs()
    inos = range(3 * BLOCK_INOS, 4 * BLOCK_INOS)
    for ino in inos:
        refs.add_lookups(ino, ino)
    for ino in inos[::2]:
        refs.drop_lookups(ino, ino)
    assert [refs.lookups(ino) for ino in inos] == [0 if i % 2 == 0 else ino
                                                   for i, ino in enumerate(inos)]
    for ino in inos:
        refs.drop_lookups(ino, refs.lookups(ino))
    assert not any(refs.held(ino) for ino in inos)
    refs.add_lookups(inos[0], 1)             # a block freed when empty comes back zeroed
    assert [refs.lookups(ino) for ino in inos] == [1] + [0] * (BLOCK_INOS - 1)


def test_clear_forgets_everything() -> None:
    refs = KernelRefs()
    refs.add_lookups(1, 1)
    refs.open(2)
    refs.clear()
    assert not refs.held(1) and not refs.held(2)


def test_blocks_freed_out_of_order_keep_the_others_counts() -> None:
    """A freed block's row takes the last one: every other block keeps its counts, and
    the table packs and restores the same (a model of dict counts beside it)."""
    refs, model = KernelRefs(), {}
    inos = [b * BLOCK_INOS + s for b in (7, 0, 900, 3, 10**9) for s in (1, 5, 31)]
    for i, ino in enumerate(inos):
        refs.add_lookups(ino, i + 1)
        model[ino] = i + 1
    for ino in inos[3:6] + inos[:3] + inos[-2:]:     # blocks 0, then 7, then part of 10**9
        refs.drop_lookups(ino, model.pop(ino))
    probe = inos + [ino + 1 for ino in inos]
    assert [refs.lookups(i) for i in probe] == [model.get(i, 0) for i in probe]
    again = KernelRefs.restored(refs.packed(), refs.open_counts())
    assert [again.lookups(i) for i in probe] == [model.get(i, 0) for i in probe]
    for ino, n in model.items():
        again.drop_lookups(ino, n)
    assert not any(again.held(i) for i in probe)
    again.add_lookups(inos[0], 1)                # the emptied table grows again
    assert again.lookups(inos[0]) == 1


def test_an_inode_set_holds_its_members_as_masks() -> None:
    cached = InodeSet()
    for ino in (1, 63, 64, 10**12):
        cached.add(ino)
    cached.add(64)
    assert [i in cached for i in (1, 2, 63, 64, 65, 10**12)] == [
        True, False, True, True, False, True]
    assert len(cached) == 4 and "1" not in cached
    cached.discard(64)
    cached.discard(65)                           # not a member
    assert 64 not in cached and len(cached) == 3
    keys, masks = cached.masks()
    assert sorted(keys.tolist()) == [0, 10**12 // SET_INOS]
    again = InodeSet.from_masks(keys, masks)
    assert [i in again for i in (1, 63, 64, 10**12)] == [True, True, False, True]


def python_bytes(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        keep = work()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    del keep
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_a_tree_held_whole_costs_a_few_bytes_per_inode() -> None:
    n = 1 << 16

    def hold() -> KernelRefs:
        refs = KernelRefs()
        for ino in range(2, 2 + n):
            refs.add_lookups(ino, 1)
        return refs
    per_inode = python_bytes(hold) / n
    print(f"\n{per_inode:.1f} B per held inode, consecutive numbers")
    assert per_inode < 16


def test_one_held_inode_per_block_still_costs_less_than_an_object_each() -> None:
    n = 1 << 13

    def hold() -> KernelRefs:
        refs = KernelRefs()
        for i in range(n):
            refs.add_lookups(i * BLOCK_INOS + 5, 1)
        return refs
    per_inode = python_bytes(hold) / n
    print(f"\n{per_inode:.0f} B per held inode, one per block")
    assert per_inode < 512


def test_a_set_of_a_tree_costs_a_fraction_of_a_byte_per_inode() -> None:
    n = 1 << 16

    def fill() -> InodeSet:
        cached = InodeSet()
        for ino in range(2, 2 + n):
            cached.add(ino)
        return cached
    per_inode = python_bytes(fill) / n
    print(f"\n{per_inode:.2f} B per member, consecutive numbers")
    assert per_inode < 2


def test_forgotten_blocks_give_their_memory_back() -> None:
    refs = KernelRefs()

    def churn() -> KernelRefs:
        for ino in range(2, 2 + (1 << 14)):
            refs.add_lookups(ino, 2)
            refs.drop_lookups(ino, 2)
        return refs
    assert python_bytes(churn) < 4096

    def hold_then_forget() -> KernelRefs:
        for ino in range(2, 2 + (1 << 16)):
            refs.add_lookups(ino, 1)
        for ino in range(2, 2 + (1 << 16)):
            refs.drop_lookups(ino, 1)
        return refs
    assert python_bytes(hold_then_forget) < 4096


# --- the filesystem's use -------------------------------------------------------------


def test_forget_session_frees_unlinked_inodes_the_kernel_held(fs: Filesystem) -> None:
    free = fs.store.free_pages()
    held = fs.create(ROOT_INO, b"held", REG, ROOT)
    fs.write(held.ino, 0, b"x" * 8192)
    opened = fs.create(ROOT_INO, b"opened", REG, ROOT)
    kept = fs.create(ROOT_INO, b"kept", REG, ROOT)
    d = fs.mkdir(ROOT_INO, b"d", stat.S_IFDIR | 0o755, ROOT)
    for inode in (held, kept, d):
        fs.ref(inode.ino, 2)
    fs.open(opened.ino, os.O_RDWR)
    fs.unlink(ROOT_INO, b"held", ROOT)
    fs.unlink(ROOT_INO, b"opened", ROOT)
    fs.rmdir(ROOT_INO, b"d", ROOT)
    assert not gone(fs, held.ino) and not gone(fs, opened.ino) and not gone(fs, d.ino)
    fs.forget_session()
    assert gone(fs, held.ino) and gone(fs, opened.ino) and gone(fs, d.ino)
    assert not gone(fs, kept.ino) and fs.references(kept.ino) == (0, 0)
    assert fs.store.orphans() == []
    fs.unlink(ROOT_INO, b"kept", ROOT)
    # Every page is free again but the orphan list's leaf, which stays (empty).
    assert len(list(fs.store.orphan_pages())) == 1
    assert gone(fs, kept.ino) and fs.store.free_pages() == free - 1


def test_a_new_filesystem_object_adopts_the_mounts_references(fs: Filesystem) -> None:
    f = fs.create(ROOT_INO, b"f", REG, ROOT)
    fs.ref(f.ino, 3)
    fs.open(f.ino, os.O_RDONLY)
    fs.unlink(ROOT_INO, b"f", ROOT)
    again = Filesystem(fs.store)                 # as an in-process re-boot makes one
    again.adopt_kernel_refs(fs.kernel_refs())
    assert again.references(f.ino) == (3, 1)
    again.release(f.ino)
    again.forget(f.ino, 2)
    assert not gone(again, f.ino)
    again.forget(f.ino, 1)
    assert again.reap_pending() == 1    # a small file's free waits for others
    assert gone(again, f.ino) and again.store.orphans() == []


def test_finishing_orphans_spares_inodes_an_adopted_mount_still_holds(
        fs: Filesystem) -> None:
    held = fs.create(ROOT_INO, b"held", REG, ROOT)
    loose = fs.create(ROOT_INO, b"loose", REG, ROOT)
    fs.open(held.ino, os.O_RDONLY)
    fs.ref(loose.ino)
    fs.unlink(ROOT_INO, b"held", ROOT)
    fs.unlink(ROOT_INO, b"loose", ROOT)
    refs = fs.kernel_refs()
    refs.drop_lookups(loose.ino, 1)         # its forget was lost with the old process
    again = Filesystem(fs.store)
    again.adopt_kernel_refs(refs)
    assert again.finish_orphans() == 1
    assert gone(again, loose.ino) and not gone(again, held.ino)
    again.release(held.ino)
    assert again.reap_pending() == 1
    assert gone(again, held.ino) and again.store.orphans() == []
