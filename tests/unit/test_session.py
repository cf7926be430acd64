"""The session, the one owner of a kernel's life cycle, without FUSE: its states follow
the machine, every injected fault is undone in full and the same kernel can hand over
after it, and the handover comes back in the next boot."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest_machine import machine_env, unique_name  # noqa: F401

from guestfs.filesystem import Ctx
from guestfs.session import Fault, Options, Session, State
from kho_backend.errors import HandoverError, KexecError
from kho_backend.header import MachineHeader
from kho_backend.kexec_metadata import METADATA_NODE

ROOT = Ctx(uid=0, gid=0)
MEMORY = 32 << 20


@pytest.fixture
def options(machine_env: Path) -> Options:
    return Options(unique_name("session"), memory=MEMORY)


def write_tree(session: Session) -> None:
    fs = session.fs
    d = fs.mkdir(1, b"d", 0o755, ROOT)
    f = fs.create(d.ino, b"f", 0o644, ROOT)
    fs.write(f.ino, 0, b"kept" * 1000)


def test_a_handover_comes_back_in_the_next_boot(options: Options) -> None:
    session = Session.open(options)
    assert session.state is State.RUNNING and session.booted_by_kexec is None
    write_tree(session)
    session.hand_over({}, for_exec=False)
    assert session.state is State.HANDED_OVER
    session.close()
    assert session.state is State.CLOSED
    again = Session.open(options)
    try:
        d = again.fs.lookup(1, b"d")
        f = again.fs.lookup(d.ino, b"f")
        assert bytes(again.fs.read(f.ino, 0, 8)) == b"keptkept"
        # an unmount's handover is not a kexec: nothing counted, no blackout
        assert again.booted_by_kexec is None
        assert again.kernel.kho_in.metadata.kexec_count == 0
    finally:
        again.close()


def test_every_fault_is_undone_and_the_same_kernel_hands_over_after(options: Options) -> None:
    faults = [Fault.SERIALIZE, Fault.FINALIZE, Fault.BOOT_PARAMS]
    session = Session.open(options)
    write_tree(session)
    free = session.kernel.buddy.free_pages()
    preserved = session.kernel.kho.track.nr_pages()     # the guestfs subtree, from mount
    for fault in faults:
        session._fault = fault      # as open(fault=...) arms it, once per handover
        with pytest.raises(KexecError) as failed:
            session.hand_over({}, for_exec=False)
        assert failed.value.phase == fault.value and "injected" in str(failed.value)
        assert session.state is State.RUNNING
        assert not MachineHeader.read(session.kernel.arena).boot_params.valid
        assert session.kernel.buddy.free_pages() == free, f"{fault} left pages behind"
        assert session.kernel.kho.track.nr_pages() == preserved
    session.hand_over({}, for_exec=False)
    session.abort()
    assert session.state is State.RUNNING
    session.hand_over({}, for_exec=False)
    session.close()
    again = Session.open(options)
    try:
        assert again.fs.lookup(1, b"d").ino > 1
    finally:
        again.close()


def test_kexec_metadata_comes_after_every_participant(options: Options) -> None:
    session = Session.open(options)
    session.hand_over({}, for_exec=False)
    session.abort()

    class Late:
        name = "late"

        def kho_finalize(self, kho) -> None:
            kho.add_subtree("late", _tiny_fdt())

        def kho_abort(self, kho) -> None:
            kho.remove_subtree("late")

    session.kernel.kho.register(Late())
    session.hand_over({}, for_exec=False)
    try:
        assert list(session.kernel.kho.subtrees)[-1] == METADATA_NODE
    finally:
        session.close()


def test_a_refused_handover_leaves_the_arena_as_it_was(options: Options,
                                                       machine_env: Path) -> None:
    session = Session.open(options)
    write_tree(session)
    session.hand_over({}, for_exec=False)
    table = session.kernel.kho.subtrees["guestfs"]
    session.close()
    arena = machine_env / f"{options.machine}.mem"
    with open(arena, "r+b") as f:           # break the guestfs sub-FDT's seal
        f.seek(table.phys + table.size - 1)
        byte = f.read(1)
        f.seek(table.phys + table.size - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = hashlib.sha256(arena.read_bytes()).hexdigest()
    for _attempt in range(2):
        with pytest.raises(HandoverError):
            Session.open(options)
        assert hashlib.sha256(arena.read_bytes()).hexdigest() == before


def test_an_unknown_fault_is_refused(options: Options) -> None:
    session = Session.open(options)
    try:
        with pytest.raises(ValueError, match="no phase"):
            session.kernel.kexec.prepare({}, fault="teatime")
        assert session.state is State.RUNNING
    finally:
        session.close()


def _tiny_fdt() -> bytes:
    from kho_backend.fdt import FdtNode, build
    return build(FdtNode(props={"compatible": "late-v1"}))
