"""The FUSE connection's state across an in-process kexec, without FUSE: a next kernel
booted for the same connection adopts the references (an unlinked but open file stays
until its last close); any other boot ignores the state and frees such a file; a state
that is not sound, or is another connection's, is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest_machine import machine_env, unique_name  # noqa: F401

from guestfs import connection
from guestfs.connection import ConnectionHandover, ConnectionId
from guestfs.errors import FsError
from guestfs.filesystem import Ctx
from guestfs.refs import BLOCK_INOS, InodeSet, KernelRefs
from guestfs.session import Fault, Options, Session
from kho_backend.errors import BootError, HandoverError

ROOT = Ctx(uid=0, gid=0)
OWNER = ConnectionId(1234, 56)


@pytest.fixture
def options(machine_env: Path) -> Options:
    return Options(unique_name("conn"), memory=32 << 20)


def orphan_handed_over(options: Options) -> int:
    """A kernel with a file open (lookup and open held) and unlinked, handed over with its
    connection state for an exec; returns the orphan's inode."""
    session = Session.open(options)
    fs = session.fs
    f = fs.create(1, b"gone", 0o644, ROOT)
    fs.ref(f.ino)
    fs.open(f.ino, 0)
    fs.write(f.ino, 0, b"still here")
    fs.unlink(1, b"gone", ROOT)
    state = connection.capture(OWNER, fs.kernel_refs(), [(3, f.ino, False, False)], 4,
                               InodeSet.of([f.ino]))
    session.kernel.kho.register(ConnectionHandover(lambda: state))
    session.load(["true"])
    session.hand_over({}, for_exec=True)
    session.leave()
    return f.ino


def test_the_same_connection_keeps_an_open_orphan_until_its_close(options: Options) -> None:
    ino = orphan_handed_over(options)
    session = Session.open(dataclasses.replace(options, connection=OWNER))
    try:
        assert session.booted_by_kexec is not None
        assert session.kept.handle_rows() == [(3, ino, False, False)]
        assert ino in session.kept.cached and len(session.kept.cached) == 1
        assert bytes(session.fs.read(ino, 0, 10)) == b"still here"
        assert session.fs.references(ino) == (1, 1)
        session.fs.release(ino)
        session.fs.forget(ino, 1)
        with pytest.raises(FsError):
            session.fs.get(ino)         # freed at its last reference
    finally:
        session.close()


def test_any_other_boot_ignores_the_connection_and_frees_the_orphan(options: Options) -> None:
    ino = orphan_handed_over(options)
    session = Session.open(options)     # an exec'd image or a later mount
    try:
        assert session.kept is None
        with pytest.raises(FsError):
            session.fs.get(ino)
        assert connection.NAME not in session.kernel.kho.subtrees
    finally:
        session.close()


def test_another_connection_or_a_failed_boot_leaves_the_handover_whole(options: Options) -> None:
    ino = orphan_handed_over(options)
    with pytest.raises(HandoverError, match="not this one"):
        Session.open(dataclasses.replace(options, connection=ConnectionId(1, 2)))
    with pytest.raises(BootError, match="injected"):
        Session.open(dataclasses.replace(options, connection=OWNER), fault=Fault.BOOT)
    session = Session.open(dataclasses.replace(options, connection=OWNER))
    try:
        assert bytes(session.fs.read(ino, 0, 10)) == b"still here"
    finally:
        session.close()


def refs_of(*held: tuple[int, int]) -> KernelRefs:
    refs = KernelRefs()
    for ino, n in held:
        refs.add_lookups(ino, n)
    return refs


def unsound(**change: object) -> bytes:
    state = connection.capture(OWNER, refs_of((5, 1)), [(1, 5, False, False)], 2,
                               InodeSet())
    return connection.encode(dataclasses.replace(state, **change))


def entry(payload: bytes, table: str, field: str, index: int = 0) -> int:
    """The offset in `payload` of `field` of entry `index` of `table`."""
    offset = connection._HEADER.size
    for name, dtype in connection.TABLES:
        count = int.from_bytes(payload[offset:offset + 4], "little")
        offset += 4
        if name == table:
            assert index < count
            return offset + index * dtype.itemsize + dtype.fields[field][1]
        offset += count * dtype.itemsize
    raise KeyError(table)


def tampered(payload: bytes, table: str, field: str, value: int, index: int = 0) -> bytes:
    """`payload` with `field` of entry `index` of `table` set to `value`."""
    offset = entry(payload, table, field, index)
    size = dict(connection.TABLES)[table].fields[field][0].itemsize
    out = bytearray(payload)
    out[offset:offset + size] = value.to_bytes(size, "little")
    return bytes(out)


def header(block_inos: int, set_inos: int) -> bytes:
    return connection._HEADER.pack(block_inos, set_inos) + unsound()[connection._HEADER.size:]


TWO_BLOCKS = unsound(refs=refs_of((5, 1), (5 + BLOCK_INOS, 1)))
WIDE = unsound(refs=refs_of((5, 300)))
BIG = unsound(refs=refs_of((5, 1 << 20)))


@pytest.mark.parametrize("payload, reason", [
    (b"abc", "ends before its header"),
    (header(64, 64), "blocks of 64 inodes and masks of 64"),
    (unsound(refs=refs_of((0, 1))), "inode 0"),
    (tampered(unsound(), "blocks", "counts", 0), "holds no inode"),
    (tampered(TWO_BLOCKS, "blocks", "key", 0, index=1), "a block twice"),
    (tampered(unsound(refs=refs_of((5, 1), (5 + BLOCK_INOS, 300))), "wide", "key", 0),
     "a block twice"),
    (tampered(WIDE, "wide", "counts", 0), "holds no inode"),
    (tampered(BIG, "big", "count", 0xFFFE), "below 65535"),
    (tampered(BIG, "big", "ino", 6), "not those of the wide counts"),
    (tampered(BIG, "big", "ino", 5 + BLOCK_INOS), "not those of the wide counts"),
    (tampered(WIDE, "wide", "counts", 0xFFFF << 16 * 5), "not those of the wide counts"),
    (tampered(unsound(refs=refs_of((5, 1 << 20), (6, 1 << 21))), "big", "ino", 5, index=1),
     "an inode twice"),
    (unsound(cached=InodeSet.of([5]))[:-1], "past the end"),
    (tampered(unsound(cached=InodeSet.of([5])), "cached", "bits", 0), "an empty one"),
    (unsound(cached=InodeSet.of([0])), "cached inodes name inode 0"),
    (tampered(unsound(), "blocks", "key", (1 << 64) // BLOCK_INOS), "past the last inode"),
    (tampered(unsound(cached=InodeSet.of([5])), "cached", "key", 1 << 60),
     "past the last inode"),
    (unsound()[:-1], "ends before the count"),
    (unsound() + b"x", "after its tables"),
    (unsound(handles=np.array([(1, 5, 8)], connection.HANDLE)), "unknown flags"),
    (unsound(handles=np.array([(1, 0, 0)], connection.HANDLE)), "inode 0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_an_unsound_state_is_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(HandoverError, match=reason):
        connection.decode(payload)


def test_a_state_round_trips_through_its_payload() -> None:
    refs = refs_of((5, 3), (9, 1), (70_000, 2), (70_001, 255), (70_002, 1 << 40),
                   (70_003, 0xFFFE), (70_004, 0xFFFF))
    refs.open(9)
    state = connection.capture(OWNER, refs, [(4, 9, False, True)], 5, InodeSet.of([5]))
    back, handles, cached = connection.decode(connection.encode(state))
    probe = (5, 9, 70_000, 6, 70_001, 70_002, 70_003, 70_004)
    assert [(back.lookups(i), back.opens(i)) for i in probe] == [
        (3, 0), (1, 1), (2, 0), (0, 0), (255, 0), (1 << 40, 0), (0xFFFE, 0), (0xFFFF, 0)]
    assert handles.tolist() == state.handles.tolist()
    assert 5 in cached and len(cached) == 1


def test_a_large_state_round_trips_and_packs_small() -> None:
    """Blocks made and freed out of order, counts of 1 and above, the kernel's whole
    count range; a tree held whole packs to about 1.5 bytes per inode."""
    rng = np.random.default_rng(7)
    inos = rng.choice(1 << 22, 1 << 16, replace=False) + 1
    counts = np.where(rng.random(len(inos)) < 0.1, rng.integers(2, 1 << 40, len(inos)),
                      1).astype(np.uint64)
    counts[0] = (1 << 64) - 1
    refs, cached = KernelRefs(), InodeSet()
    for ino, n in zip(inos.tolist(), counts.tolist()):
        refs.add_lookups(ino, n)
        cached.add(ino)
    for ino, n in zip(inos[::3].tolist(), counts[::3].tolist()):
        refs.drop_lookups(ino, n)
        cached.discard(ino)
    state = connection.capture(OWNER, refs, [], 1, cached)
    back, _, back_cached = connection.decode(connection.encode(state))
    probe = np.concatenate([inos, inos + 1]).tolist()
    assert [back.lookups(i) for i in probe] == [refs.lookups(i) for i in probe]
    assert [i in back_cached for i in probe] == [i in cached for i in probe]
    assert len(back_cached) == len(cached)
    whole, tree = KernelRefs(), InodeSet()
    for ino in range(2, 2 + (1 << 16)):
        whole.add_lookups(ino, 1)
        tree.add(ino)
    payload = connection.encode(connection.capture(OWNER, whole, [], 1, tree))
    assert len(payload) < (1 << 16) * 1.6


def test_a_corrupt_subtree_is_refused() -> None:
    state = connection.capture(OWNER, refs_of((5, 1)), [], 2, InodeSet())
    blob = bytearray(connection.to_fdt(state, 0x5000))
    assert connection.from_fdt(bytes(blob)).tables == 0x5000
    blob[-20] ^= 1
    with pytest.raises(HandoverError):
        connection.from_fdt(bytes(blob))
