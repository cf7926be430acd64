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
from guestfs.refs import BLOCK_INOS, KernelRefs
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
    state = connection.capture(OWNER, fs.kernel_refs(), [(3, f.ino, False, False)], 4, [])
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
    state = connection.capture(OWNER, refs_of((5, 1)), [(1, 5, False, False)], 2, [])
    return connection.encode(dataclasses.replace(state, **change))


def tampered(payload: bytes, offset: int, value: int) -> bytes:
    """`payload` with the u64 at `offset` (after the block size and the keys' count)."""
    out = bytearray(payload)
    out[offset:offset + 8] = value.to_bytes(8, "little")
    return bytes(out)


KEYS = 8            # the first key, after the block size and the keys' count
BLOCK = KEYS + 8 + 4    # the first block, after one key and the blocks' count


@pytest.mark.parametrize("payload, reason", [
    (unsound(refs=refs_of((0, 1))), "inode 0"),
    (tampered(unsound(), BLOCK + 8 * BLOCK_INOS, 2), "count of held inodes"),
    (tampered(unsound(), BLOCK + 8 * 6, 1), "count of held inodes"),
    (unsound(cached=np.array([5], connection.CACHED))[:-1], "past the end"),
    (unsound()[:-1], "ends before the count"),
    (unsound() + b"x", "after its tables"),
    (unsound(handles=np.array([(1, 5, 8)], connection.HANDLE)), "unknown flags"),
    (unsound(handles=np.array([(1, 0, 0)], connection.HANDLE)), "inode 0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_an_unsound_state_is_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(HandoverError, match=reason):
        connection.decode(payload)


def test_a_state_round_trips_through_its_payload() -> None:
    refs = refs_of((5, 3), (9, 1), (70_000, 2))
    refs.open(9)
    state = connection.capture(OWNER, refs, [(4, 9, False, True)], 5, [5])
    back, handles, cached = connection.decode(connection.encode(state))
    assert [(back.lookups(i), back.opens(i)) for i in (5, 9, 70_000, 6)] == [
        (3, 0), (1, 1), (2, 0), (0, 0)]
    assert handles.tolist() == state.handles.tolist() and cached.tolist() == [5]


def test_a_corrupt_subtree_is_refused() -> None:
    state = connection.capture(OWNER, refs_of((5, 1)), [], 2, [])
    blob = bytearray(connection.to_fdt(state, 0x5000))
    assert connection.from_fdt(bytes(blob)).tables == 0x5000
    blob[-20] ^= 1
    with pytest.raises(HandoverError):
        connection.from_fdt(bytes(blob))
