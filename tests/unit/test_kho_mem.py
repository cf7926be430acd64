"""The formats on their own, over a plain bytearray: the kho-v1 preserved-memory map
(khoser_mem_chunk, read only; tests/helpers/kho_v1.py writes it as release 0.2.0 did),
where a handover's blocks lie (kho_in.check_placement), page chains and the FDT
helpers."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.kho_v1 import V1Map, chunk_page
from kho_backend import chain, fdt
from kho_backend.errors import HandoverError
from kho_backend.kho_in import check_placement
from kho_backend.leaves import Leaves
from kho_backend.kho_mem import KHOSER_BITMAP_SIZE, PRESERVE_BITS, kho_mem_deserialize
from kho_backend.units import MAX_ORDER, PAGE_SIZE

NPAGES = 1 << 14   # a 64 MiB arena


class FakeMem:
    """Just enough of Arena for the readers."""

    def __init__(self, npages: int = NPAGES) -> None:
        self.npages = npages
        self.buf = bytearray(npages * PAGE_SIZE)

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        return memoryview(self.buf)[pfn * PAGE_SIZE:(pfn + npages) * PAGE_SIZE]


def serialize(mem: FakeMem, track: V1Map, first_chunk: int = 1) -> int:
    return track.serialize(mem, list(range(first_chunk, first_chunk + track.chunks_needed())))


def write_chunk(mem: FakeMem, pfn: int, order: int, elms: list[tuple[int, bytes]],
                nxt: int = 0, magic: bytes = b"KHOM") -> None:
    """A hand-made chunk with a correct CRC, for maps the writer would never write."""
    starts = np.array([start for start, _ in elms], np.uint64)
    bitmaps = np.array([np.frombuffer(bits.ljust(64, b"\0"), np.uint8) for _, bits in elms],
                       np.uint8).reshape(len(elms), 64)
    mem.view(pfn)[:] = chunk_page(order, starts, bitmaps, nxt, magic)


def read_v1(mem: FakeMem, phys: int, scratch: list[tuple[int, int]] = ()) -> dict:
    """The v1 map at ``phys``, checked as boot checks it (placement included)."""
    heads = kho_mem_deserialize(mem, phys).heads
    check_placement(mem.npages, [(f"order-{o} folio", Leaves.from_heads(h, o))
                                 for o, h in heads.items()],
                    scratch)
    return heads


# -- the kho-v1 preserved-memory map -------------------------------------------------------

folios = st.lists(st.tuples(st.integers(0, MAX_ORDER), st.integers(8, NPAGES - 1)),
                  max_size=300)


@settings(max_examples=60, deadline=None)
@given(folios)
def test_map_roundtrip(picks: list[tuple[int, int]]) -> None:
    """Whatever was preserved (non-overlapping folios of any order) comes back exactly."""
    track = V1Map(NPAGES)
    used = np.zeros(NPAGES, bool)
    want: dict[int, set[int]] = {}
    for order, pfn in picks:
        head = pfn >> order << order
        if head < 8 or head + (1 << order) > NPAGES or used[head:head + (1 << order)].any():
            continue
        used[head:head + (1 << order)] = True
        track.set(np.array([head]), order)
        want.setdefault(order, set()).add(head)
    if not want:
        return
    mem = FakeMem()
    heads = read_v1(mem, serialize(mem, track))
    assert {o: set(h.tolist()) for o, h in heads.items()} == want


def test_map_size_grows_with_ranges_not_bytes() -> None:
    """One 512-bit block per non-empty 512 folios: 2 MiB folios make a tiny map."""
    track = V1Map(NPAGES)
    track.set(np.arange(512, NPAGES, 512, dtype=np.int64), 9)
    assert track.chunks_needed() == 1
    track0 = V1Map(NPAGES)
    track0.set(np.arange(512, NPAGES, dtype=np.int64), 0)
    assert track0.chunks_needed() == -(-(NPAGES // PRESERVE_BITS - 1) // KHOSER_BITMAP_SIZE)


def test_map_bit_flips_refused() -> None:
    """Any single bit flipped anywhere in a chunk page is caught by its CRC."""
    track = V1Map(1024)
    track.set(np.arange(64, 200, dtype=np.int64), 0)
    mem = FakeMem(1024)
    phys = serialize(mem, track)
    rng = np.random.default_rng(1)
    for byte in rng.integers(0, PAGE_SIZE, 200).tolist():
        bad = FakeMem(1024)
        bad.buf[:] = mem.buf
        bad.buf[PAGE_SIZE + byte] ^= 1 << int(rng.integers(8))
        with pytest.raises(HandoverError, match="chunk|CRC|magic"):
            kho_mem_deserialize(bad, phys)


@pytest.mark.parametrize("case, expect", [
    ("cycle", "cycle"),
    ("next outside", "outside the arena"),
    ("next unaligned", "not page aligned"),
    ("bad magic", "magic"),
    ("bad order", "order 11"),
    ("elm outside", "outside the arena"),
    ("elm unaligned", "not aligned"),
    ("folio past end", "extends past the end"),
    ("same element twice", "overlap"),
    ("orders overlap", "overlaps itself at pfn 512: order-0 folio at pfn 512 and "
                       "order-9 folio at pfn 512"),
    ("covers header", "page 0"),
    ("in scratch", "Order-0 folio at pfn 512 lies in the scratch area"),
])
def test_bad_maps_refused(case: str, expect: str) -> None:
    mem = FakeMem(NPAGES - 8 if case == "folio past end" else NPAGES)
    one = b"\x01"
    chunks = {
        "cycle": [(1, 0, [(0x200000, one)], 2 * PAGE_SIZE), (2, 0, [], PAGE_SIZE)],
        "next outside": [(1, 0, [], NPAGES * PAGE_SIZE)],
        "next unaligned": [(1, 0, [], 2 * PAGE_SIZE + 8)],
        "bad magic": [(1, 0, [(0x200000, one)], 0, b"KHOX")],
        "bad order": [(1, 11, [], 0)],
        "elm outside": [(1, 0, [(NPAGES * PAGE_SIZE, one)], 0)],
        "elm unaligned": [(1, 0, [(0x201000, one)], 0)],
        "folio past end": [(1, 0, [((NPAGES - 512) * PAGE_SIZE, b"\xff" * 64)], 0)],
        "same element twice": [(1, 0, [(0x200000, one), (0x200000, b"\x02")], 0)],
        "orders overlap": [(1, 0, [(0x200000, one)], 2 * PAGE_SIZE),
                           (2, 9, [(0, b"\x02")], 0)],
        "covers header": [(1, 0, [(0, one)], 0)],
        "in scratch": [(1, 0, [(0x200000, one)], 0)],
    }[case]
    for pfn, order, elms, nxt, *magic in chunks:
        write_chunk(mem, pfn, order, elms, nxt, *magic)
    scratch = [(0x200, 16)] if case == "in scratch" else []
    before = bytes(mem.buf)
    with pytest.raises(HandoverError, match=expect):
        read_v1(mem, PAGE_SIZE, scratch)
    assert bytes(mem.buf) == before


def test_map_chain_length_bounded() -> None:
    """A list that never repeats a page still ends: more chunks than any map needs."""
    mem = FakeMem()
    for pfn in range(1, 200):
        write_chunk(mem, pfn, 0, [], (pfn + 1) * PAGE_SIZE)
    with pytest.raises(HandoverError, match="more than .* chunks"):
        kho_mem_deserialize(mem, PAGE_SIZE)


def test_placement_checks() -> None:
    """The coverage count boot uses for every handover: overlaps across lists and
    orders, page 0 and scratch refused, each naming the blocks."""
    scratch = [(100, 150)]
    def place(*lists: tuple[str, list[int], int]) -> list[tuple[str, Leaves]]:
        return [(what, Leaves.from_heads(np.array(heads), order)) for what, heads, order in lists]
    ok = place(("folio", [512, 1024], 9), ("page", [5, 7, 2100], 0), ("node", [3, 4], 0),
               ("pair", [10, 16382], 1), ("quad", [12, 16376], 2), ("eight", [2048, 16368], 3))
    check_placement(NPAGES, ok, scratch)
    check_placement(NPAGES, [], scratch)
    bad = {
        "overlaps itself at pfn 600: folio at pfn 512 and page at pfn 600":
            place(("folio", [512], 9), ("page", [600], 0)),
        "overlaps itself at pfn 8: page at pfn 8 and node at pfn 8":
            place(("page", [8], 0), ("node", [8, 9000], 0)),
        "overlaps itself at pfn 6: quad at pfn 4 and pair at pfn 6":
            place(("quad", [4, 40], 2), ("pair", [6, 10], 1), ("page", [3001], 0)),
        "overlaps itself at pfn 16383: page at pfn 16383 and pair at pfn 16382":
            place(("page", [16383], 0), ("pair", [16382], 1)),
        "Page at pfn 248 lies in the scratch area at pfns \\[100, 250\\)":
            place(("page", [248], 3)),
        "Node at pfn 0 covers page 0": place(("node", [0], 0)),
    }
    for match, placed in bad.items():
        with pytest.raises(HandoverError, match=match):
            check_placement(NPAGES, placed, scratch)


def test_placement_checks_against_a_dense_map() -> None:
    """A map of whole leaves of order-0 pages (a pool's file pages) is compared with the
    others by its bitmaps as they are: an overlap with it, page 0 and scratch in it are
    still found and named."""
    npages = 3 << 15
    dense = ("data", Leaves.from_heads(np.arange(40000, 90000), 0))
    ok = [dense, ("node", Leaves.from_heads(np.array([3, 39999, 90000]), 0)),
          ("folio", Leaves.from_heads(np.array([1 << 9]), 9))]
    check_placement(npages, ok, [(100, 150)])
    cases = {
        "overlaps itself at pfn 65536: data at pfn 65536 and node at pfn 65536":
            (ok + [("node", Leaves.from_heads(np.array([65536]), 0))], []),
        "overlaps itself at pfn 40960: data at pfn 40960 and folio at pfn 40960":
            (ok + [("folio", Leaves.from_heads(np.array([80 << 9]), 9))], []),
        "Data at pfn 69999 lies in the scratch area at pfns \\[69999, 70001\\)":
            (ok, [(69999, 2)]),
        "Data at pfn 0 covers page 0":
            ([("data", Leaves.from_heads(np.arange(0, 50000), 0))], []),
    }
    for match, (placed, scratch) in cases.items():
        with pytest.raises(HandoverError, match=match):
            check_placement(npages, placed, scratch)


# -- page chains ------------------------------------------------------------------------

def store(mem: FakeMem, payload: bytes, magic: bytes = b"TEST", first: int = 3) -> int:
    pfns = list(range(first, first + chain.chain_pages(len(payload))))
    chain.store_chain(mem, payload, magic, pfns)
    return first * PAGE_SIZE


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3 * chain.CHAIN_PAYLOAD + 10))
def test_chain_roundtrip(payload: bytes) -> None:
    mem = FakeMem(64)
    assert chain.read_chain(mem, store(mem, payload), b"TEST") == payload


def test_chain_bit_flips_refused() -> None:
    mem = FakeMem(64)
    phys = store(mem, bytes(range(256)) * 40)
    for offset in range(0, 3 * PAGE_SIZE, 97):
        bad = FakeMem(64)
        bad.buf[:] = mem.buf
        bad.buf[phys + offset] ^= 0x04
        with pytest.raises(HandoverError, match="chain b'TEST'"):
            chain.read_chain(bad, phys, b"TEST")


def _relink(mem: FakeMem, pfn: int, nxt: int, flags: int | None = None) -> None:
    page = mem.view(pfn)
    struct.pack_into("<Q", page, 16, nxt)
    if flags is not None:
        struct.pack_into("<H", page, 6, flags)
    struct.pack_into("<I", page, 12, 0)
    struct.pack_into("<I", page, 12, zlib.crc32(page))


def test_chain_corruptions_refused() -> None:
    mem = FakeMem(64)
    phys = store(mem, b"x" * (3 * chain.CHAIN_PAYLOAD))
    with pytest.raises(HandoverError, match="magic"):
        chain.read_chain(mem, phys, b"OTHR")
    with pytest.raises(HandoverError, match="longer than 2 pages"):
        chain.read_chain(mem, phys, b"TEST", max_pages=2)
    _relink(mem, 4, 3 * PAGE_SIZE)
    with pytest.raises(HandoverError, match="cycle"):
        chain.read_chain(mem, phys, b"TEST")
    _relink(mem, 4, 64 * PAGE_SIZE)
    with pytest.raises(HandoverError, match="outside"):
        chain.read_chain(mem, phys, b"TEST")
    _relink(mem, 4, 0)
    with pytest.raises(HandoverError, match="disagree"):
        chain.read_chain(mem, phys, b"TEST")
    _relink(mem, 4, 0, flags=chain.CHAIN_LAST)
    assert len(chain.read_chain(mem, phys, b"TEST")) == 2 * chain.CHAIN_PAYLOAD
    struct.pack_into("<I", mem.view(3), 8, 100)      # a short page that is not the last
    _relink(mem, 3, 4 * PAGE_SIZE)
    with pytest.raises(HandoverError, match="payload length 100"):
        chain.read_chain(mem, phys, b"TEST")


# -- FDT helpers ------------------------------------------------------------------------

def test_fdt_roundtrip_and_seal() -> None:
    root = fdt.FdtNode(props={"compatible": "kho-v1", "value": 1 << 40, "small": fdt.u32(7)})
    root.child("sub", fdt=0x1000)
    blob = fdt.build(root, sealed=True)
    r = fdt.FdtReader(blob, "the test FDT")
    r.check_seal()
    top = r.node("/")
    r.expect_compatible(top, "kho-v1")
    assert r.u64(top, "value") == 1 << 40 and r.u32(top, "small") == 7
    assert [name for name, _ in r.subnodes(top)] == ["sub"]
    with pytest.raises(HandoverError, match="property /small is 4 bytes"):
        r.u64(top, "small")
    with pytest.raises(HandoverError, match="no property 'missing'"):
        r.raw(top, "missing")
    with pytest.raises(HandoverError, match="'kho-v1'; this kernel supports only 'kho-v2'"):
        r.expect_compatible(top, "kho-v2")
    with pytest.raises(HandoverError, match="supports 'kho-v3' and 'kho-v2'"):
        r.expect_compatible(top, ("kho-v3", "kho-v2"))
    assert r.expect_compatible(top, ("kho-v3", "kho-v1")) == "kho-v1"


def test_fdt_every_bit_flip_refused() -> None:
    root = fdt.FdtNode(props={"compatible": "kho-v1", "preserved-memory-map": 0x5000})
    root.child("guestfs", fdt=0x9000, **{"fdt-size": 100})
    blob = fdt.build(root, sealed=True)
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(HandoverError):
                r = fdt.FdtReader(bytes(bad), "the KHO root FDT")
                r.check_seal()
    for cut in (0, 8, 40, len(blob) - 4):
        with pytest.raises(HandoverError):
            fdt.FdtReader(blob[:cut], "the KHO root FDT")
