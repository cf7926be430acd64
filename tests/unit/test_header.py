"""The machine header in page 0: layout, round trip, every corruption refused, the two
copies of the dynamic part (A/B), version 1 read and converted, and every write readable
as before or after whatever store a kill interrupts."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest_machine import machine_env, machine_name  # noqa: F401
from kho_backend.checksum import seal_crc32
from kho_backend.cmdline import ScratchPolicy
from kho_backend.errors import ArenaError, HeaderError
from kho_backend.header import (
    CMDLINE_MAX,
    CRC_OFFSET,
    DYNAMIC,
    DYNAMIC_CRC_OFFSET,
    DYNAMIC_OFFSETS,
    HEADER_SIZE,
    MAGIC,
    SCRATCH_TABLE_OFFSET,
    STATIC_RANGES,
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
A = DYNAMIC_OFFSETS[0]          # copy 0 of the dynamic part
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "guestfs-0.2.0.arena.xz"


def sample() -> MachineHeader:
    h = MachineHeader(
        arena_size=SIZE, nr_nodes=2, state=MachineState.RUNNING, pid=4242, boot_count=7,
        release="guestfs 0.1.0", memmap_pfn=16000, memmap_npages=4,
        scratch_policy=ScratchPolicy(percent=150),
        scratch=[ScratchArea(ScratchKind.LOWMEM, 0, 1, 64),
                 ScratchArea(ScratchKind.GLOBAL, 1, 15000, 512),
                 ScratchArea(ScratchKind.NODE, 0, 7000, 256),
                 ScratchArea(ScratchKind.NODE, 1, 14000, 256)],
        live_root_phys=0x300000, live_root_size=400,
    )  # fmt: skip
    h.set_boot_params(fdt_phys=0x200000, fdt_size=1234, cmdline="kho_poison quiet")
    return h


class Page:
    """Just enough of an Arena for MachineHeader.read/write: one page."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.size = struct.unpack_from("<Q", data, 16)[0]

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        assert pfn == 0 and npages == 1
        return memoryview(self.data)[:HEADER_SIZE]


def reseal_static(page: bytearray) -> None:
    """Recompute the static CRC, so that a test reaches the checks behind it."""
    static = bytearray(b"".join(page[a:b] for a, b in STATIC_RANGES))
    seal_crc32(static, CRC_OFFSET)
    page[CRC_OFFSET:CRC_OFFSET + 4] = static[CRC_OFFSET:CRC_OFFSET + 4]


def reseal_copy(page: bytearray, slot: int = 0) -> None:
    start = DYNAMIC_OFFSETS[slot]
    copy = bytearray(page[start:start + DYNAMIC.size])
    seal_crc32(copy, DYNAMIC_CRC_OFFSET)
    page[start:start + DYNAMIC.size] = copy


def test_layout_is_fixed() -> None:
    page = sample().pack()
    assert len(page) == HEADER_SIZE == 4096
    assert page[:8] == MAGIC == b"GUESTMEM"
    assert struct.unpack_from("<I", page, 8)[0] == 2
    assert struct.unpack_from("<QII", page, 16) == (SIZE, 4096, 2)
    assert page[32:128] == bytes(96)
    assert struct.unpack_from("<II", page, 128) == (1, 150)
    assert struct.unpack_from("<I", page, 160)[0] == 4
    assert SCRATCH_TABLE_OFFSET == 1232 and DYNAMIC_OFFSETS == (168, 2816)
    assert struct.unpack_from("<IIQQ", page, 1232 + 24) == (1, 1, 15000, 512)
    assert struct.unpack_from("<QIIII", page, A)[0::2] == (1, MachineState.RUNNING, 1)
    assert struct.unpack_from("<QIIII", page, A)[3] == 4242
    assert struct.unpack_from("<QQQQQ", page, A + 24) == (7, 16000, 4, 0x300000, 400)
    assert struct.unpack_from("<QQQQI", page, A + 64) == (0x200000, 1234, 1232, 96, 16)
    assert page[A + 104:A + 117] == b"guestfs 0.1.0"
    assert page[A + 168:A + 184] == b"kho_poison quiet"
    assert page[2816:] == bytes(4096 - 2816)        # copy 1 unwritten, then the tail


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
    crashed=st.booleans(),
)  # fmt: skip
def test_round_trip_property(nodes, state, pid, boots, release, policy, cmdline, handed_over,
                             crashed) -> None:
    h = MachineHeader(arena_size=SIZE, nr_nodes=nodes, state=state, pid=pid, boot_count=boots,
                      release=release, scratch_policy=policy,
                      scratch=[ScratchArea(ScratchKind.NODE, n, 1 + 100 * n, 50) for n in range(nodes)])  # fmt: skip
    if handed_over:
        h.set_boot_params(4096 * 10, 100, cmdline, crashed=crashed)
    assert MachineHeader.unpack(h.pack(), SIZE) == h


def test_clear_boot_params() -> None:
    h = sample()
    h.clear_boot_params()
    assert h.boot_params == BootParams()
    assert not MachineHeader.unpack(h.pack()).boot_params.valid


def test_fields_that_do_not_fit_are_refused() -> None:
    h = sample()
    h.boot_params.cmdline = "x" * (CMDLINE_MAX + 1)
    with pytest.raises(HeaderError, match="longer than 896 bytes.*version 1 kept 1024"):
        h.pack()
    h = sample()
    h.release = "r" * 65
    with pytest.raises(HeaderError, match="at most 64 bytes"):
        h.pack()
    with pytest.raises(HeaderError, match="outside the arena"):
        sample().set_boot_params(SIZE - 10, 100)
    with pytest.raises(HeaderError, match="live KHO root"):
        sample().set_live_root(0x1001, 100)


def corrupt(offset: int, data: bytes, *, seal: str | None = None) -> bytes:
    """Sample page with ``data`` at ``offset``, resealed: "static", "copy" or not at all."""
    page = bytearray(sample().pack())
    page[offset : offset + len(data)] = data
    if seal == "static":
        reseal_static(page)
    elif seal == "copy":
        reseal_copy(page)
    return bytes(page)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


CORRUPTIONS = {
    "magic": (corrupt(0, b"GUESTMEN"), HeaderError, "not a guestfs arena"),
    "version": (corrupt(8, u32(3)), HeaderError, "version 3"),
    "static bit flip": (corrupt(1300, b"\x01"), HeaderError, "static part"),
    "static crc": (corrupt(CRC_OFFSET, b"\0\0\0\0"), HeaderError, "checksum"),
    "copy bit flip": (corrupt(A + 300, b"\x01"), HeaderError, "neither copy"),
    "page size": (corrupt(24, u32(8192), seal="static"), HeaderError, "page size"),
    "nodes": (corrupt(28, u32(0), seal="static"), HeaderError, "impossible machine"),
    "policy": (corrupt(128, u32(7), seal="static"), HeaderError, "unknown scratch policy"),
    "scratch count": (corrupt(160, u32(67), seal="static"), HeaderError, "scratch areas"),
    "scratch kind": (corrupt(1232, u32(5), seal="static"), HeaderError, "unknown kind"),
    "scratch outside": (corrupt(1232 + 8, u64(NPAGES), seal="static"), HeaderError, "does not fit"),
    "scratch at page 0": (corrupt(1232 + 8, u64(0), seal="static"), HeaderError, "does not fit"),
    "scratch overlap": (corrupt(1232 + 24 * 2 + 8, u64(14100), seal="static"), HeaderError, "overlap"),
    "scratch node": (corrupt(1232 + 24 * 3 + 4, u32(2), seal="static"), HeaderError, "does not fit"),
    "size": (corrupt(16, u64(2 * SIZE), seal="static"), ArenaError, "header says 128 MiB"),
    "state": (corrupt(A + 12, u32(9), seal="copy"), HeaderError, "unknown state"),
    "flags": (corrupt(A + 20, u32(5), seal="copy"), HeaderError, "unknown flags"),
    "crashed, not valid": (corrupt(A + 20, u32(2), seal="copy"), HeaderError, "unknown flags"),
    "memmap": (corrupt(A + 32, u64(NPAGES), seal="copy"), HeaderError, "memmap"),
    "live root": (corrupt(A + 48, u64(0x300008), seal="copy"), HeaderError, "live KHO root"),
    "fdt outside": (corrupt(A + 64, u64(SIZE), seal="copy"), HeaderError, "KHO FDT"),
    "fdt in page 0": (corrupt(A + 64, u64(0), seal="copy"), HeaderError, "KHO FDT"),
    "scratch table ptr": (corrupt(A + 80, u64(4096), seal="copy"), HeaderError, "scratch table"),
    "cmdline length": (corrupt(A + 96, u32(5000), seal="copy"), HeaderError, "command line"),
    "utf-8": (corrupt(A + 104, b"\xff\xfe", seal="copy"), HeaderError, "not UTF-8"),
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


# -- two copies of the dynamic part --------------------------------------------------------


def test_writes_alternate_between_the_copies() -> None:
    page = Page(sample().pack())
    h = MachineHeader.read(page)
    assert (h.slot, h.sequence) == (0, 1)
    for step in range(1, 6):
        h.pid = 1000 + step
        h.write(page)
        assert (h.slot, h.sequence) == (step % 2, step + 1)
        again = MachineHeader.read(page)
        assert again == h and (again.slot, again.sequence) == (h.slot, h.sequence)


def test_a_torn_copy_leaves_the_other() -> None:
    """The copy a kill tore fails its CRC: the reader takes the other, the state before."""
    page = Page(sample().pack())
    h = MachineHeader.read(page)
    h.state = MachineState.HANDED_OVER
    h.write(page)                                    # into copy 1, sequence 2
    before = MachineHeader.read(page)
    h.pid = 99
    h.write(page)                                    # into copy 0, sequence 3
    page.data[A + 500] ^= 0x10                       # ... torn
    after = MachineHeader.read(page)
    assert after == before and (after.slot, after.sequence) == (1, 2)
    h.pid = 100
    h.write(page)                                    # the older (torn) copy is rewritten
    assert (MachineHeader.read(page).pid, MachineHeader.read(page).slot) == (100, 0)
    page.data[DYNAMIC_OFFSETS[0] + 9] ^= 1
    page.data[DYNAMIC_OFFSETS[1] + 9] ^= 1
    with pytest.raises(HeaderError, match="neither copy"):
        MachineHeader.read(page)


def applied(page: bytes, stores: list[tuple[int, bytes]], count: int,
            torn: tuple[int, bool] | None = None) -> bytes:
    """``page`` after the first ``count`` stores, and then part of the next one: its
    first (or, written backwards, last) ``torn[0]`` bytes."""
    data = bytearray(page)
    for offset, chunk in stores[:count]:
        data[offset:offset + len(chunk)] = chunk
    if torn is not None and count < len(stores):
        offset, chunk = stores[count]
        cut, backwards = torn
        if backwards:
            data[offset + len(chunk) - cut:offset + len(chunk)] = chunk[len(chunk) - cut:]
        else:
            data[offset:offset + cut] = chunk[:cut]
    return bytes(data)


def every_interruption(page: bytes, stores: list[tuple[int, bytes]]):
    """Every page a kill can leave: after each prefix of the stores, and inside each
    store that is not one aligned 8-byte word (cut at several places, both ways)."""
    for count in range(len(stores) + 1):
        yield applied(page, stores, count)
        if count < len(stores) and len(stores[count][1]) != 8:
            size = len(stores[count][1])
            for cut in (1, 7, 8, size // 2, size - 8, size - 1):
                for backwards in (False, True):
                    yield applied(page, stores, count, (cut, backwards))


def test_every_interrupted_write_reads_as_before_or_after() -> None:
    page = sample().pack()
    h = MachineHeader.unpack(page)
    h.state, h.pid = MachineState.HANDED_OVER, 7
    plan = h.plan_write(page)
    before, after = MachineHeader.unpack(page), MachineHeader.unpack(applied(page, plan.stores, 99))
    assert after == h
    for seen in every_interruption(page, plan.stores):
        assert MachineHeader.unpack(seen) in (before, after)


def test_first_sizing_of_scratch_interrupted_reads_as_unsized() -> None:
    """The static part changes once, when the first boot sizes scratch: a kill in the
    middle leaves the old CRC, which reads as 'not sized yet' on a machine never run."""
    fresh = MachineHeader(arena_size=SIZE, nr_nodes=2).pack()
    h = MachineHeader.unpack(fresh)
    h.scratch_policy = ScratchPolicy(percent=200)
    h.scratch = [ScratchArea(ScratchKind.NODE, n, 100 + 8192 * n, 64) for n in range(2)]
    h.state, h.pid, h.boot_count = MachineState.RUNNING, 5, 1
    plan = h.plan_write(fresh)
    assert len(plan.stores) == 4                     # table, policy, version word, copy
    before = MachineHeader.unpack(fresh)
    for seen in every_interruption(fresh, plan.stores):
        got = MachineHeader.unpack(seen)
        # Before the version word: unsized; after it, sized but not run yet; then after.
        assert got in (before, h) or (got.state is MachineState.FRESH
                                      and got.scratch == h.scratch and got.pid == 0)
    # Once the machine has run, the static part is never rewritten again.
    with pytest.raises(HeaderError, match="written once"):
        sized = MachineHeader.unpack(applied(fresh, plan.stores, 4))
        sized.scratch_policy = ScratchPolicy(percent=300)
        sized.plan_write(applied(fresh, plan.stores, 4))


def test_torn_static_part_of_a_machine_that_ran_is_refused() -> None:
    page = bytearray(sample().pack())
    page[1300] ^= 1
    reseal_static(page)                              # a sized CRC over different bytes
    page[1301] ^= 1
    with pytest.raises(HeaderError, match="static part"):
        MachineHeader.unpack(bytes(page))


# -- version 1 (release 0.2.0) ---------------------------------------------------------------


def release_page() -> bytes:
    """Page 0 of the arena release 0.2.0 handed over (tests/fixtures)."""
    with lzma.open(FIXTURE) as f:
        return f.read(HEADER_SIZE)


def test_a_version_1_header_is_read() -> None:
    page = release_page()
    assert struct.unpack_from("<I", page, 8)[0] == 1
    h = MachineHeader.unpack(page, 16 * MiB)
    assert h.version == 1 and h.state is MachineState.HANDED_OVER
    assert h.boot_params.valid and not h.boot_params.crashed and h.release == "guestfs 0.2.0"
    assert h.scratch_policy == ScratchPolicy() and len(h.scratch) == 3
    assert (h.live_root_phys, h.live_root_size) == (0, 0)
    bad = bytearray(page)
    bad[300] ^= 1
    with pytest.raises(HeaderError, match=r"version 1\) is corrupt"):
        MachineHeader.unpack(bytes(bad))


def test_a_version_1_header_is_converted_at_any_interruption() -> None:
    """Rewritten as version 2 in place; a kill at any store leaves a page that reads as
    the version-1 header or as the new one."""
    page = release_page()
    old = MachineHeader.unpack(page)
    h = MachineHeader.unpack(page)
    h.state, h.pid, h.boot_count = MachineState.RUNNING, 77, old.boot_count + 1
    plan = h.plan_write(page)
    after = MachineHeader.unpack(applied(page, plan.stores, 99))
    assert after == h and after.version == 2 and after.boot_params == old.boot_params
    assert applied(page, plan.stores, 99)[32:128] == bytes(96)
    for seen in every_interruption(page, plan.stores):
        got = MachineHeader.unpack(seen)
        assert got in (old, after)
    converted = Page(page)
    h.write(converted)
    assert MachineHeader.read(converted) == h
