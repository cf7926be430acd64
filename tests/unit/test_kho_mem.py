"""The serializers on their own, over a plain bytearray: the preserved-memory map
(khoser_mem_chunk), page chains and the FDT helpers."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho_backend import chain, fdt
from kho_backend.errors import HandoverError
from kho_backend.checksum import crc32_at
from kho_backend.kho_mem import (CHUNK_CRC_OFFSET, CHUNK_HDR, ELM_DTYPE, KHOSER_BITMAP_SIZE,
                                 PRESERVE_BITS, KhoMemTrack, kho_mem_deserialize,
                                 kho_mem_serialize)
from kho_backend.units import MAX_ORDER, PAGE_SIZE

NPAGES = 1 << 14   # a 64 MiB arena


class FakeMem:
    """Just enough of Arena for the serializers."""

    def __init__(self, npages: int = NPAGES) -> None:
        self.npages = npages
        self.buf = bytearray(npages * PAGE_SIZE)

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        return memoryview(self.buf)[pfn * PAGE_SIZE:(pfn + npages) * PAGE_SIZE]


def serialize(mem: FakeMem, track: KhoMemTrack, first_chunk: int = 1) -> int:
    chunks = list(range(first_chunk, first_chunk + track.chunks_needed()))
    return kho_mem_serialize(mem, track, chunks)


def write_chunk(mem: FakeMem, pfn: int, order: int, elms: list[tuple[int, bytes]],
                nxt: int = 0, magic: bytes = b"KHOM") -> None:
    """A hand-made chunk with a correct CRC, for maps the serializer would never write."""
    arr = np.zeros(len(elms), ELM_DTYPE)
    for i, (start, bits) in enumerate(elms):
        arr[i]["phys_start"] = start
        arr[i]["bitmap"] = np.frombuffer(bits.ljust(64, b"\0"), np.uint8)
    page = bytearray(PAGE_SIZE)
    CHUNK_HDR.pack_into(page, 0, magic, order, len(elms), 0, nxt)
    page[CHUNK_HDR.size:CHUNK_HDR.size + arr.nbytes] = arr.tobytes()
    struct.pack_into("<I", page, 12, crc32_at(page, CHUNK_CRC_OFFSET))
    mem.view(pfn)[:] = page


# -- the preserved-memory map ----------------------------------------------------------

folios = st.lists(st.tuples(st.integers(0, MAX_ORDER), st.integers(8, NPAGES - 1)),
                  max_size=300)


@settings(max_examples=60, deadline=None)
@given(folios)
def test_map_roundtrip(picks: list[tuple[int, int]]) -> None:
    """Whatever was preserved (non-overlapping folios of any order) comes back exactly."""
    track = KhoMemTrack(NPAGES)
    want: dict[int, set[int]] = {}
    for order, pfn in picks:
        head = np.array([pfn >> order << order], np.int64)
        if head[0] < 8 or head[0] + (1 << order) > NPAGES or track.overlapping(head, order)[0]:
            continue
        track.set(head, order)
        want.setdefault(order, set()).add(int(head[0]))
    if not want:
        return
    mem = FakeMem()
    pmap = kho_mem_deserialize(mem, serialize(mem, track))
    assert {o: set(h.tolist()) for o, h in pmap.heads.items()} == want
    assert pmap.nr_pages() == track.nr_pages()
    assert np.array_equal(pmap.page_mask(NPAGES), track.page_mask())


def test_map_size_grows_with_ranges_not_bytes() -> None:
    """One 512-bit block per non-empty 512 folios: 2 MiB folios make a tiny map."""
    track = KhoMemTrack(NPAGES)
    track.set(np.arange(512, NPAGES, 512, dtype=np.int64), 9)
    assert track.chunks_needed() == 1
    track0 = KhoMemTrack(NPAGES)
    track0.set(np.arange(512, NPAGES, dtype=np.int64), 0)
    assert track0.chunks_needed() == -(-(NPAGES // PRESERVE_BITS - 1) // KHOSER_BITMAP_SIZE)


def test_overlapping_detects_every_order() -> None:
    track = KhoMemTrack(NPAGES)
    track.set(np.array([1024], np.int64), 9)
    assert track.overlapping(np.array([1024, 1030, 1536, 0], np.int64), 0).tolist() == \
        [True, True, False, False]
    assert track.overlapping(np.array([1024, 2048], np.int64), 10).tolist() == [True, False]


def test_map_bit_flips_refused() -> None:
    """Any single bit flipped anywhere in a chunk page is caught by its CRC."""
    track = KhoMemTrack(1024)
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
    ("orders overlap", "overlap"),
    ("covers header", "page 0"),
    ("in scratch", "scratch"),
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
        kho_mem_deserialize(mem, PAGE_SIZE, scratch)
    assert bytes(mem.buf) == before


def test_map_chain_length_bounded() -> None:
    """A list that never repeats a page still ends: more chunks than any map needs."""
    mem = FakeMem()
    for pfn in range(1, 200):
        write_chunk(mem, pfn, 0, [], (pfn + 1) * PAGE_SIZE)
    with pytest.raises(HandoverError, match="more than .* chunks"):
        kho_mem_deserialize(mem, PAGE_SIZE)


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
