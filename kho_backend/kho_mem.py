"""The ``kho-v1`` format, read only: the ``khoser_mem_chunk`` preserved-memory map and
the v1 root FDT's property names, as release 0.2.0 (and Linux 6.16) wrote them.

The v1 map is a linked list of page-sized ``khoser_mem_chunk`` pages, each holding one
order's elements ``{ phys_start, 512-bit bitmap }`` (the bitmap inline, unlike the
kernel's pointer, and every chunk with a magic and a CRC32; see docs/handover-abi.md).
This kernel writes ``kho-v3`` (``kho_radix``); it reads v1 handovers so that an arena
handed over by 0.2.0 still boots. :func:`kho_mem_deserialize` (the kernel's
``kho_mem_deserialize()``) walks the chunk list with full validation and returns the head
pfns of the preserved folios per order, vectorised with ``np.unpackbits``; whether they
overlap or reach into page 0 or scratch is checked with every other map of a handover,
by ``kho_in``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .arena import PhysMemory
from .checksum import crc32_at
from .errors import HandoverError
from .units import MAX_ORDER, PAGE_SHIFT, PAGE_SIZE

#: The v1 root FDT: its ``compatible``, and each subtree node's properties.
KHO_V1_COMPATIBLE = "kho-v1"
PROP_FDT = "fdt"
PROP_FDT_SIZE = "fdt-size"
PROP_FDT_CRC = "fdt-crc32"

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


def folio_count(npages: int, order: int) -> int:
    """Flags kept for ``order``: whole folios that fit, rounded up to whole bitmaps."""
    folios = npages >> order
    return -(-folios // PRESERVE_BITS) * PRESERVE_BITS


def max_chunks(npages: int) -> int:
    """An upper bound on the chunks a valid map of an arena this size can have."""
    return sum(-(-folio_count(npages, o) // PRESERVE_BITS // KHOSER_BITMAP_SIZE) + 1
               for o in range(MAX_ORDER + 1))


@dataclass
class ChunkMap:
    """A v1 map read back: per order the preserved folios' head pfns (ascending), and
    the chunk pages, which are preserved order-0 folios themselves."""

    heads: dict[int, np.ndarray] = field(default_factory=dict)
    chunk_pfns: list[int] = field(default_factory=list)


def kho_mem_deserialize(mem: PhysMemory, first_phys: int) -> ChunkMap:
    """Read and validate the chunk list starting at ``first_phys``.

    Raises HandoverError naming the first thing wrong: a chunk address outside the arena
    or not page aligned, a bad magic or CRC, an unknown order, a cycle or an over-long
    list, an element outside the arena or misaligned, two elements of one order for the
    same folios, a folio past the end of the arena.  Reads only.
    """
    starts: dict[int, list[np.ndarray]] = {}
    bitmaps: dict[int, list[np.ndarray]] = {}
    result = ChunkMap()
    for pfn, page in _walk_chunks(mem, first_phys):
        order, elms = _parse_chunk(mem, pfn, page)
        result.chunk_pfns.append(pfn)
        starts.setdefault(order, []).append(elms["phys_start"])
        bitmaps.setdefault(order, []).append(elms["bitmap"])
    for order in sorted(starts):
        heads = _order_heads(mem, order, np.concatenate(starts[order]),
                             np.concatenate(bitmaps[order]))
        if len(heads):
            result.heads[order] = heads
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
