"""The machine header in page 0: layout, round trip, and every corruption refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest_machine import machine_env, machine_name  # noqa: F401
from kho_backend.cmdline import ScratchPolicy
from kho_backend.errors import ArenaError, HeaderError
from kho_backend.header import (
    CMDLINE_MAX,
    CRC_OFFSET,
    HEADER_SIZE,
    MAGIC,
    SCRATCH_TABLE_OFFSET,
    BootParams,
    MachineHeader,
    MachineState,
    ScratchArea,
    ScratchKind,
)
from kho_backend.machine import create_machine, machine_path, open_machine

MiB = 1 << 20
SIZE = 64 * MiB
NPAGES = SIZE // 4096


def sample() -> MachineHeader:
    h = MachineHeader(
        arena_size=SIZE, nr_nodes=2, state=MachineState.RUNNING, pid=4242, boot_count=7,
        release="guestfs 0.1.0", memmap_pfn=16000, memmap_npages=4,
        scratch_policy=ScratchPolicy(percent=150),
        scratch=[ScratchArea(ScratchKind.LOWMEM, 0, 1, 64),
                 ScratchArea(ScratchKind.GLOBAL, 1, 15000, 512),
                 ScratchArea(ScratchKind.NODE, 0, 7000, 256),
                 ScratchArea(ScratchKind.NODE, 1, 14000, 256)],
    )  # fmt: skip
    h.set_boot_params(fdt_phys=0x200000, fdt_size=1234, cmdline="kho_poison quiet")
    return h


def reseal(page: bytearray) -> bytes:
    """Recompute the CRC, so that a test reaches the checks behind it."""
    struct.pack_into("<I", page, CRC_OFFSET, 0)
    struct.pack_into("<I", page, CRC_OFFSET, zlib.crc32(page))
    return bytes(page)


def test_layout_is_fixed() -> None:
    page = sample().pack()
    assert len(page) == HEADER_SIZE == 4096
    assert page[:8] == MAGIC == b"GUESTMEM"
    assert struct.unpack_from("<I", page, 8)[0] == 1
    assert struct.unpack_from("<QII", page, 16) == (SIZE, 4096, 2)
    assert struct.unpack_from("<IIQ", page, 32) == (MachineState.RUNNING, 4242, 7)
    assert struct.unpack_from("<QQ", page, 48) == (16000, 4)
    assert page[64:77] == b"guestfs 0.1.0"
    assert struct.unpack_from("<II", page, 128) == (1, 150)
    assert struct.unpack_from("<I", page, 160)[0] == 4
    assert struct.unpack_from("<IIQQQQ", page, 168) == (1, 16, 0x200000, 1234, 1232, 96)
    assert page[208:224] == b"kho_poison quiet"
    assert SCRATCH_TABLE_OFFSET == 1232
    assert struct.unpack_from("<IIQQ", page, 1232 + 24) == (1, 1, 15000, 512)
    assert page[2816:] == bytes(4096 - 2816)


def test_round_trip() -> None:
    h = sample()
    assert MachineHeader.unpack(h.pack(), SIZE) == h


@given(
    nodes=st.integers(1, 4),
    state=st.sampled_from(MachineState),
    pid=st.integers(0, 2**32 - 1),
    boots=st.integers(0, 2**64 - 1),
    # A release is UTF-8 text: no NUL, no lone surrogates (which cannot be encoded).
    release=st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                    max_size=16),
    policy=st.one_of(
        st.none(),
        st.builds(ScratchPolicy, percent=st.integers(1, 10_000)),
        st.builds(ScratchPolicy, percent=st.none(), lowmem=st.integers(0, 2**40),
                  global_=st.integers(0, 2**40), pernode=st.integers(0, 2**40)),
    ),
    cmdline=st.text(max_size=CMDLINE_MAX // 4),
    handed_over=st.booleans(),
)  # fmt: skip
def test_round_trip_property(nodes, state, pid, boots, release, policy, cmdline, handed_over) -> None:
    h = MachineHeader(arena_size=SIZE, nr_nodes=nodes, state=state, pid=pid, boot_count=boots,
                      release=release, scratch_policy=policy,
                      scratch=[ScratchArea(ScratchKind.NODE, n, 1 + 100 * n, 50) for n in range(nodes)])  # fmt: skip
    if handed_over:
        h.set_boot_params(4096 * 10, 100, cmdline)
    assert MachineHeader.unpack(h.pack(), SIZE) == h


def test_clear_boot_params() -> None:
    h = sample()
    h.clear_boot_params()
    assert h.boot_params == BootParams()
    assert not MachineHeader.unpack(h.pack()).boot_params.valid


def test_fields_that_do_not_fit_are_refused() -> None:
    h = sample()
    h.boot_params.cmdline = "x" * (CMDLINE_MAX + 1)
    with pytest.raises(HeaderError, match="longer than 1024"):
        h.pack()
    h = sample()
    h.release = "r" * 65
    with pytest.raises(HeaderError, match="at most 64 bytes"):
        h.pack()
    with pytest.raises(HeaderError, match="outside the arena"):
        sample().set_boot_params(SIZE - 10, 100)


def corrupt(offset: int, data: bytes, *, seal: bool = True) -> bytes:
    page = bytearray(sample().pack())
    page[offset : offset + len(data)] = data
    return reseal(page) if seal else bytes(page)


CORRUPTIONS = {
    "magic": (corrupt(0, b"GUESTMEN"), HeaderError, "not a guestfs arena"),
    "version": (corrupt(8, struct.pack("<I", 2)), HeaderError, "version 2"),
    "bit flip": (corrupt(300, b"\x01", seal=False), HeaderError, "checksum"),
    "crc": (corrupt(CRC_OFFSET, b"\0\0\0\0", seal=False), HeaderError, "checksum"),
    "page size": (corrupt(24, struct.pack("<I", 8192)), HeaderError, "page size"),
    "nodes": (corrupt(28, struct.pack("<I", 0)), HeaderError, "impossible machine"),
    "state": (corrupt(32, struct.pack("<I", 9)), HeaderError, "unknown state"),
    "policy": (corrupt(128, struct.pack("<I", 7)), HeaderError, "unknown scratch policy"),
    "flags": (corrupt(168, struct.pack("<I", 3)), HeaderError, "unknown flags"),
    "cmdline length": (corrupt(172, struct.pack("<I", 5000)), HeaderError, "command line"),
    "scratch count": (corrupt(160, struct.pack("<I", 67)), HeaderError, "scratch areas"),
    "scratch kind": (corrupt(1232, struct.pack("<I", 5)), HeaderError, "unknown kind"),
    "scratch outside": (corrupt(1232 + 8, struct.pack("<Q", NPAGES)), HeaderError, "does not fit"),
    "scratch at page 0": (corrupt(1232 + 8, struct.pack("<Q", 0)), HeaderError, "does not fit"),
    "scratch overlap": (corrupt(1232 + 24 * 2 + 8, struct.pack("<Q", 14100)), HeaderError, "overlap"),
    "scratch node": (corrupt(1232 + 24 * 3 + 4, struct.pack("<I", 2)), HeaderError, "does not fit"),
    "memmap": (corrupt(48, struct.pack("<Q", NPAGES)), HeaderError, "memmap"),
    "fdt outside": (corrupt(176, struct.pack("<Q", SIZE)), HeaderError, "KHO FDT"),
    "fdt in page 0": (corrupt(176, struct.pack("<Q", 0)), HeaderError, "KHO FDT"),
    "scratch table ptr": (corrupt(192, struct.pack("<Q", 4096)), HeaderError, "scratch table"),
    "utf-8": (corrupt(64, b"\xff\xfe"), HeaderError, "not UTF-8"),
    "size": (corrupt(16, struct.pack("<Q", 2 * SIZE)), ArenaError, "header says 128 MiB"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_refused(name: str) -> None:
    page, error, match = CORRUPTIONS[name]
    with pytest.raises(error, match=match):
        MachineHeader.unpack(page, SIZE)


def test_short_page_refused() -> None:
    with pytest.raises(ArenaError, match="shorter than"):
        MachineHeader.unpack(b"GUESTMEM")


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_machine_is_refused_and_left_untouched(machine_env: Path, machine_name: str, name: str) -> None:
    arena, _ = create_machine(machine_name, SIZE, nodes=2)
    arena.close()
    path = machine_path(machine_name)
    page, error, match = CORRUPTIONS[name]
    with open(path, "r+b") as f:
        f.write(page)
    before = path.read_bytes()
    with pytest.raises(error, match=match):
        open_machine(machine_name)
    assert path.read_bytes() == before
