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


def unsound(**change: object) -> bytes:
    state = connection.capture(OWNER, ([5], [1], [0]), [(1, 5, False, False)], 2, [])
    return connection.to_fdt(dataclasses.replace(state, **change))


@pytest.mark.parametrize("blob, reason", [
    (unsound(next_fh=1), "below next-fh"),
    (unsound(refs=np.zeros(1, connection.REF)), "inode 0"),
    (unsound(refs=np.array([(5, 1, 0), (5, 2, 0)], connection.REF)), "twice"),
    (unsound(handles=np.array([(1, 5, 8)], connection.HANDLE)), "unknown flags"),
])
def test_an_unsound_state_is_refused(blob: bytes, reason: str) -> None:
    with pytest.raises(HandoverError, match=reason):
        connection.from_fdt(blob)
    corrupt = bytearray(blob)
    corrupt[-20] ^= 1
    with pytest.raises(HandoverError):
        connection.from_fdt(bytes(corrupt))
