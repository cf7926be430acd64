"""The preserved-memory map: which folios the next kernel must keep, per order.

Outgoing side, :class:`KhoMemTrack` (the kernel's ``struct kho_mem_track``): one dense
flag array per order over the arena's pfn space, one flag per naturally aligned folio of
that order, so that preserving or unpreserving a million pages is one numpy operation.

At finalize the map is serialized like the kernel's ``kho_mem_serialize()``: a linked
list of page-sized ``khoser_mem_chunk`` pages, each holding one order's elements
``{ phys_start, 512-bit bitmap }``.  Only non-empty 512-bit blocks are written, so the
size of the map (and the time to write and read it) grows with the number of preserved
ranges, not with the bytes preserved.  Unlike the kernel, where each element points at a
separately allocated bitmap, the 64-byte bitmap is stored inline in the chunk, and every
chunk carries a magic and a CRC32 (see docs/handover-abi.md).

Incoming side, :func:`kho_mem_deserialize` (the kernel's ``kho_mem_deserialize()``):
walks the chunk list with full validation and returns the head pfns of the preserved
folios per order, vectorised with ``np.unpackbits``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .checksum import crc32_at, seal_crc32
from .errors import HandoverError
from .units import MAX_ORDER, PAGE_SHIFT, PAGE_SIZE

#: Magic of a ``khoser_mem_chunk`` page (the kernel's chunks have none).
CHUNK_MAGIC = b"KHOM"
#: ``khoser_mem_chunk_hdr``: magic, order, num_elms, crc32, next (phys of the next chunk).
CHUNK_HDR = struct.Struct("<4sIIIQ")
CHUNK_CRC_OFFSET = 12
#: Folios described by one element's bitmap.
PRESERVE_BITS = 512
#: ``khoser_mem_bitmap_ptr`` with the bitmap inline: phys_start, then 512 bits LSB first.
ELM_DTYPE = np.dtype([("phys_start", "<u8"), ("bitmap", "u1", (PRESERVE_BITS // 8,))])
#: Elements per chunk page: (4096 - 24) // 72 = 56.
KHOSER_BITMAP_SIZE = (PAGE_SIZE - CHUNK_HDR.size) // ELM_DTYPE.itemsize


class PhysMemory(Protocol):
    """What the serializers need of the arena (``Arena`` has it; tests use a bytearray)."""

    npages: int

    def view(self, pfn: int, npages: int = 1) -> memoryview: ...


def folio_count(npages: int, order: int) -> int:
    """Flags kept for ``order``: whole folios that fit, rounded up to whole bitmaps."""
    folios = npages >> order
    return -(-folios // PRESERVE_BITS) * PRESERVE_BITS


@dataclass(frozen=True, slots=True)
class OrderBlocks:
    """One order's non-empty 512-bit blocks, ready to be written as chunk elements."""

    order: int
    phys_start: np.ndarray   # uint64, one per element
    bitmaps: np.ndarray      # uint8 (n, 64)

    @property
    def nr_chunks(self) -> int:
        return -(-len(self.phys_start) // KHOSER_BITMAP_SIZE)


class KhoMemTrack:
    """Outgoing preserved-memory map: per order, a flag per folio over the whole arena."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        # Created on first use: most kernels preserve one or two orders only.
        self._folios: dict[int, np.ndarray] = {}

    def orders(self) -> list[int]:
        """Orders that have at least one preserved folio."""
        return [o for o, f in sorted(self._folios.items()) if f.any()]

    def _flags(self, order: int) -> np.ndarray:
        flags = self._folios.get(order)
        if flags is None:
            flags = self._folios[order] = np.zeros(folio_count(self.npages, order), bool)
        return flags

    def is_set(self, pfns: np.ndarray, order: int) -> np.ndarray:
        """Per pfn: is it the head of a folio preserved at exactly ``order``?"""
        flags = self._folios.get(order)
        if flags is None:
            return np.zeros(len(pfns), bool)
        return flags[pfns >> order]

    def overlapping(self, pfns: np.ndarray, order: int) -> np.ndarray:
        """Per aligned pfn: does its folio share a page with any preserved folio?"""
        hit = np.zeros(len(pfns), bool)
        for other, flags in self._folios.items():
            if other >= order:
                # Natural alignment: the larger folio holding pfn holds the whole folio.
                hit |= flags[pfns >> other]
            else:
                hit |= _any_in_spans(flags, pfns >> other, 1 << (order - other))
        return hit

    def set(self, pfns: np.ndarray, order: int) -> None:
        """Mark folios preserved (the caller has validated them)."""
        self._flags(order)[pfns >> order] = True

    def clear(self, pfns: np.ndarray, order: int) -> None:
        """Mark folios no longer preserved (the caller has checked they were)."""
        self._flags(order)[pfns >> order] = False

    def nr_pages(self) -> int:
        """Pages covered by preserved folios, all orders together."""
        return sum(int(np.count_nonzero(f)) << o for o, f in self._folios.items())

    def page_mask(self) -> np.ndarray:
        """Bool per page of the arena: is it inside a preserved folio?"""
        mask = np.zeros(self.npages, bool)
        for order, flags in self._folios.items():
            whole = self.npages >> order
            mask[: whole << order] |= np.repeat(flags[:whole], 1 << order)
        return mask

    def blocks(self) -> list[OrderBlocks]:
        """The non-empty 512-bit blocks of every order (what finalize will write)."""
        out = []
        for order in self.orders():
            rows = np.packbits(self._folios[order].reshape(-1, PRESERVE_BITS),
                               axis=1, bitorder="little")
            used = np.flatnonzero(rows.view(np.uint64).any(axis=1))
            first_folio = used.astype(np.uint64) * PRESERVE_BITS
            out.append(OrderBlocks(order, first_folio << np.uint64(order + PAGE_SHIFT),
                                   rows[used]))
        return out

    def chunks_needed(self) -> int:
        """Chunk pages the map needs if serialized now."""
        return sum(b.nr_chunks for b in self.blocks())


def _any_in_spans(flags: np.ndarray, starts: np.ndarray, span: int) -> np.ndarray:
    """For each start, ``flags[start:start+span].any()``, by the cheaper of two ways."""
    if len(starts) * span <= len(flags):
        return flags[starts[:, None] + np.arange(span)].any(axis=1)
    whole = len(flags) // span * span
    return flags[:whole].reshape(-1, span).any(axis=1)[starts // span]


def kho_mem_serialize(mem: PhysMemory, track: KhoMemTrack,
                      chunk_pfns: Sequence[int]) -> int:
    """Write the map into ``chunk_pfns`` (exactly ``track.chunks_needed()`` pages).

    Returns the physical address of the first chunk.  The caller allocates (and
    preserves) the chunk pages first, so that they appear in the map they hold.
    """
    pages = [(b.order, b.phys_start[i:i + KHOSER_BITMAP_SIZE],
              b.bitmaps[i:i + KHOSER_BITMAP_SIZE])
             for b in track.blocks()
             for i in range(0, len(b.phys_start), KHOSER_BITMAP_SIZE)]
    if len(pages) != len(chunk_pfns):
        raise ValueError(f"the map needs {len(pages)} chunk pages, got {len(chunk_pfns)}")
    for i, (order, starts, bitmaps) in enumerate(pages):
        nxt = chunk_pfns[i + 1] << PAGE_SHIFT if i + 1 < len(pages) else 0
        mem.view(chunk_pfns[i])[:] = _chunk_page(order, starts, bitmaps, nxt)
    return chunk_pfns[0] << PAGE_SHIFT


def _chunk_page(order: int, starts: np.ndarray, bitmaps: np.ndarray, nxt: int) -> bytes:
    elms = np.zeros(len(starts), ELM_DTYPE)
    elms["phys_start"] = starts
    elms["bitmap"] = bitmaps
    page = bytearray(PAGE_SIZE)
    CHUNK_HDR.pack_into(page, 0, CHUNK_MAGIC, order, len(starts), 0, nxt)
    page[CHUNK_HDR.size:CHUNK_HDR.size + elms.nbytes] = elms.tobytes()
    seal_crc32(page, CHUNK_CRC_OFFSET)
    return bytes(page)


@dataclass
class PreservedMap:
    """The deserialized map: per order, the sorted head pfns of the preserved folios."""

    heads: dict[int, np.ndarray] = field(default_factory=dict)
    chunk_pfns: list[int] = field(default_factory=list)

    def ranges(self) -> Iterator[tuple[np.ndarray, int]]:
        """(head pfns, order) for every order with preserved folios, ascending order."""
        for order in sorted(self.heads):
            yield self.heads[order], order

    def nr_pages(self) -> int:
        return sum(len(h) << o for o, h in self.heads.items())

    def page_mask(self, npages: int) -> np.ndarray:
        """Bool per page: inside a preserved folio?"""
        mask = np.zeros(npages, bool)
        for heads, order in self.ranges():
            mask[(heads[:, None] + np.arange(1 << order)).ravel()] = True
        return mask

    def order_of(self, pfn: int) -> int | None:
        """The order of the preserved folio whose head is ``pfn``, or None."""
        for heads, order in self.ranges():
            i = np.searchsorted(heads, pfn)
            if i < len(heads) and heads[i] == pfn:
                return order
        return None

    def covers(self, pfn: int, npages: int) -> bool:
        """Is every page of [pfn, pfn + npages) inside some preserved folio?"""
        want = np.arange(pfn, pfn + npages, dtype=np.int64)
        covered = np.zeros(npages, bool)
        for heads, order in self.ranges():
            folio = want >> order << order
            idx = np.minimum(np.searchsorted(heads, folio), max(len(heads) - 1, 0))
            covered |= heads[idx] == folio if len(heads) else False
        return bool(covered.all())


def max_chunks(npages: int) -> int:
    """An upper bound on the chunks a valid map of an arena this size can have."""
    return sum(-(-folio_count(npages, o) // PRESERVE_BITS // KHOSER_BITMAP_SIZE) + 1
               for o in range(MAX_ORDER + 1))


def kho_mem_deserialize(mem: PhysMemory, first_phys: int,
                        scratch: Sequence[tuple[int, int]] = ()) -> PreservedMap:
    """Read and validate the chunk list starting at ``first_phys``.

    Raises HandoverError naming the first thing wrong: a chunk address outside the arena
    or not page aligned, a bad magic or CRC, an unknown order, a cycle or an over-long
    list, an element outside the arena, two elements or folios that overlap (across
    orders too), a preserved folio on page 0 or in one of the ``scratch`` areas
    ``(start_pfn, npages)``.  Reads only; the arena is not changed.
    """
    starts: dict[int, list[np.ndarray]] = {}
    bitmaps: dict[int, list[np.ndarray]] = {}
    result = PreservedMap()
    for pfn, page in _walk_chunks(mem, first_phys):
        order, elms = _parse_chunk(mem, pfn, page)
        result.chunk_pfns.append(pfn)
        starts.setdefault(order, []).append(elms["phys_start"])
        bitmaps.setdefault(order, []).append(elms["bitmap"])
    for order in sorted(starts):
        result.heads[order] = _order_heads(mem, order, np.concatenate(starts[order]),
                                           np.concatenate(bitmaps[order]))
    _check_no_overlap(result)
    _check_placement(result, scratch)
    return result


def _walk_chunks(mem: PhysMemory, phys: int) -> Iterator[tuple[int, bytes]]:
    seen: set[int] = set()
    limit = max_chunks(mem.npages)
    where = "the preserved-memory-map property"
    while phys:
        pfn = _chunk_pfn(mem, phys, where)
        if pfn in seen:
            raise HandoverError(f"the preserved-memory map has a cycle: chunk at {phys:#x} "
                                "is linked twice")
        if len(seen) >= limit:
            raise HandoverError(f"the preserved-memory map has more than {limit} chunks, "
                                "more than any map of this arena can need")
        seen.add(pfn)
        page = bytes(mem.view(pfn))
        yield pfn, page
        phys = CHUNK_HDR.unpack_from(page)[4]
        where = f"the next pointer of chunk {pfn << PAGE_SHIFT:#x}"


def _chunk_pfn(mem: PhysMemory, phys: int, where: str) -> int:
    if phys % PAGE_SIZE:
        raise HandoverError(f"{where} points at {phys:#x}, which is not page aligned")
    pfn = phys >> PAGE_SHIFT
    if pfn >= mem.npages:
        raise HandoverError(f"{where} points at {phys:#x}, outside the arena "
                            f"({mem.npages << PAGE_SHIFT:#x} bytes)")
    if pfn == 0:
        raise HandoverError(f"{where} points at page 0, the machine header")
    return pfn


def _parse_chunk(mem: PhysMemory, pfn: int, page: bytes) -> tuple[int, np.ndarray]:
    magic, order, num_elms, crc, _ = CHUNK_HDR.unpack_from(page)
    what = f"preserved-memory map chunk at {pfn << PAGE_SHIFT:#x}"
    if magic != CHUNK_MAGIC:
        raise HandoverError(f"{what} has magic {magic!r}, expected {CHUNK_MAGIC!r}")
    if crc != crc32_at(page, CHUNK_CRC_OFFSET):
        raise HandoverError(f"{what} fails its CRC32 check (stored {crc:#010x}, "
                            f"computed {crc32_at(page, CHUNK_CRC_OFFSET):#010x})")
    if order > MAX_ORDER:
        raise HandoverError(f"{what} has order {order}; orders go from 0 to {MAX_ORDER}")
    if num_elms > KHOSER_BITMAP_SIZE:
        raise HandoverError(f"{what} claims {num_elms} elements; a chunk holds at most "
                            f"{KHOSER_BITMAP_SIZE}")
    elms = np.frombuffer(page, ELM_DTYPE, count=num_elms, offset=CHUNK_HDR.size)
    block = PRESERVE_BITS << (order + PAGE_SHIFT)
    bad = np.flatnonzero((elms["phys_start"] % block != 0)
                         | (elms["phys_start"] >> np.uint64(PAGE_SHIFT) >= mem.npages))
    if len(bad):
        start = int(elms["phys_start"][bad[0]])
        raise HandoverError(f"{what}, element {bad[0]}: phys_start {start:#x} is outside "
                            f"the arena or not aligned to {block:#x} (order {order})")
    return order, elms


def _order_heads(mem: PhysMemory, order: int, starts: np.ndarray,
                 bitmaps: np.ndarray) -> np.ndarray:
    # Sorting the few elements (not the many heads) leaves the heads sorted.
    by_start = np.argsort(starts, kind="stable")
    starts, bitmaps = starts[by_start], bitmaps[by_start]
    dup = np.flatnonzero(np.diff(starts) == 0)
    if len(dup):
        raise HandoverError(f"preserved ranges overlap: two order-{order} elements both "
                            f"describe phys {int(starts[dup[0]]):#x}")
    rows, bits = np.nonzero(np.unpackbits(bitmaps, axis=1, bitorder="little"))
    first = (starts.astype(np.int64) >> PAGE_SHIFT)[rows]
    heads = first + (bits.astype(np.int64) << order)
    past = heads + (1 << order) > mem.npages
    if past.any():
        raise HandoverError(f"preserved order-{order} folio at pfn {int(heads[past][0])} "
                            f"extends past the end of the arena ({mem.npages} pages)")
    return heads


def _check_no_overlap(pmap: PreservedMap) -> None:
    orders = sorted(pmap.heads)
    for i, big in enumerate(orders):
        big_heads = pmap.heads[big]
        if not len(big_heads):
            continue
        dense = np.zeros(int(big_heads[-1] >> big) + 1, bool)
        dense[big_heads >> big] = True
        for small in orders[:i]:
            idx = pmap.heads[small] >> big
            inside = idx < len(dense)
            hit = np.flatnonzero(inside)[dense[idx[inside]]]
            if len(hit):
                pfn = int(pmap.heads[small][hit[0]])
                raise HandoverError(
                    f"preserved ranges overlap: order-{small} folio at pfn {pfn} lies "
                    f"inside the order-{big} folio at pfn {pfn >> big << big}")


def _check_placement(pmap: PreservedMap, scratch: Sequence[tuple[int, int]]) -> None:
    for heads, order in pmap.ranges():
        if len(heads) and heads[0] == 0:
            raise HandoverError(f"a preserved order-{order} folio covers page 0, "
                                "the machine header")
        ends = heads + (1 << order)
        for start, n in scratch:
            hit = np.flatnonzero((heads < start + n) & (ends > start))
            if len(hit):
                raise HandoverError(
                    f"preserved order-{order} folio at pfn {int(heads[hit[0]])} lies in "
                    f"the scratch area at pfns [{start}, {start + n})")
