"""A writer of the ``kho-v1`` preserved-memory map (``khoser_mem_chunk`` pages), as
release 0.2.0 wrote it, so that the tests can give the v1 reader maps of any shape.
kho_backend itself only reads v1 (docs/handover-abi.md, "kho-v1, read only")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kho_backend.arena import PhysMemory
from kho_backend.checksum import seal_crc32
from kho_backend.kho_mem import (CHUNK_CRC_OFFSET, CHUNK_HDR, CHUNK_MAGIC, ELM_DTYPE,
                                 KHOSER_BITMAP_SIZE, PRESERVE_BITS, folio_count)
from kho_backend.units import PAGE_SHIFT, PAGE_SIZE


class V1Map:
    """Per order, a flag per folio over the arena; serialized as 0.2.0 did."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.flags: dict[int, np.ndarray] = {}

    def set(self, pfns: np.ndarray, order: int) -> None:
        flags = self.flags.setdefault(order, np.zeros(folio_count(self.npages, order), bool))
        flags[np.asarray(pfns) >> order] = True

    def elements(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(order, phys_start, bitmaps) per chunk page, orders ascending."""
        pages = []
        for order in sorted(self.flags):
            rows = np.packbits(self.flags[order].reshape(-1, PRESERVE_BITS), axis=1,
                               bitorder="little")
            used = np.flatnonzero(rows.view(np.uint64).any(axis=1))
            starts = (used.astype(np.uint64) * PRESERVE_BITS) << np.uint64(order + PAGE_SHIFT)
            for i in range(0, len(used), KHOSER_BITMAP_SIZE):
                pages.append((order, starts[i:i + KHOSER_BITMAP_SIZE],
                              rows[used][i:i + KHOSER_BITMAP_SIZE]))
        return pages

    def chunks_needed(self) -> int:
        return len(self.elements())

    def serialize(self, mem: PhysMemory, chunk_pfns: Sequence[int]) -> int:
        """Write the chunk list into ``chunk_pfns``; the physical address of the first."""
        pages = self.elements()
        assert len(pages) == len(chunk_pfns)
        for i, (order, starts, bitmaps) in enumerate(pages):
            nxt = chunk_pfns[i + 1] << PAGE_SHIFT if i + 1 < len(pages) else 0
            mem.view(chunk_pfns[i])[:] = chunk_page(order, starts, bitmaps, nxt)
        return chunk_pfns[0] << PAGE_SHIFT


def chunk_page(order: int, starts: np.ndarray, bitmaps: np.ndarray, nxt: int,
               magic: bytes = CHUNK_MAGIC) -> bytes:
    """One chunk page with a correct CRC."""
    elms = np.zeros(len(starts), ELM_DTYPE)
    elms["phys_start"] = starts
    elms["bitmap"] = bitmaps
    page = bytearray(PAGE_SIZE)
    CHUNK_HDR.pack_into(page, 0, magic, order, len(starts), 0, nxt)
    page[CHUNK_HDR.size:CHUNK_HDR.size + elms.nbytes] = elms.tobytes()
    seal_crc32(page, CHUNK_CRC_OFFSET)
    return bytes(page)
