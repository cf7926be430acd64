"""KHO, the incoming side: the handover this kernel was booted with (``kernel.kho_in``).

``IncomingHandover.parse`` validates the whole handover (root FDT, preserved-memory map,
every sub-FDT, kexec-metadata) before boot changes anything in the arena, and refuses it
with a HandoverError naming what is wrong.  Boot then reserves ``preserved_ranges()``,
``attach``es the kernel, and subsystems take their state back with ``retrieve_subtree``
and the ``restore_*`` calls (the kernel's kho_retrieve_subtree / kho_restore_folio).  At
the end of boot ``release_unclaimed`` frees every preserved page nobody restored,
including the handover's own metadata pages (root FDT, chunks, sub-FDTs).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .chain import Chain, walk_chain
from .errors import HandoverError
from .fdt import FdtReader
from .kexec_metadata import METADATA_NODE, KexecMetadata
from .kho import (KHO_COMPATIBLE, PROP_FDT, PROP_FDT_CRC, PROP_FDT_SIZE,
                  PROP_MEM_MAP, split_natural)
from .kho_mem import PhysMemory, PreservedMap, kho_mem_deserialize
from .memmap import has_duplicates
from .page_alloc import PageAllocator
from .units import PAGE_SHIFT, PAGE_SIZE


log = logging.getLogger(__name__)

#: Largest root FDT a reader accepts: it holds a few properties per subtree, nothing more.
MAX_ROOT_FDT = 1 << 20


@dataclass(frozen=True, slots=True)
class InSubtree:
    """A validated sub-FDT of the incoming handover."""

    name: str
    phys: int
    blob: bytes


def read_phys(mem: PhysMemory, phys: int, size: int) -> bytes:
    """Copy ``size`` bytes at ``phys`` (the caller has bounds-checked them)."""
    first = phys >> PAGE_SHIFT
    last = (phys + size - 1) >> PAGE_SHIFT
    start = phys - (first << PAGE_SHIFT)
    return bytes(mem.view(first, last - first + 1)[start:start + size])


def _check_range(mem: PhysMemory, phys: int, size: int, what: str) -> None:
    end = mem.npages << PAGE_SHIFT
    if size <= 0 or phys < PAGE_SIZE or phys + size > end:
        raise HandoverError(f"{what} is at [{phys:#x}, {phys + size:#x}), outside the "
                            f"arena's memory [{PAGE_SIZE:#x}, {end:#x})")


class IncomingHandover:
    """A validated handover, and the restore calls over it."""

    def __init__(self, mem: PhysMemory, fdt_phys: int, fdt_size: int, pmap: PreservedMap,
                 subtrees: dict[str, InSubtree], metadata: KexecMetadata | None) -> None:
        self.mem = mem
        self.fdt_phys = fdt_phys
        self.fdt_size = fdt_size
        self.pmap = pmap
        self.subtrees = subtrees
        #: The kexec-metadata subtree; None if the previous kernel did not write one.
        self.metadata = metadata
        self.buddy: PageAllocator | None = None
        # Per order, parallel to pmap.heads[order]: restored (or released) already?
        self._claimed = {o: np.zeros(len(h), bool) for o, h in pmap.heads.items()}

    # -- validation ---------------------------------------------------------------------

    @classmethod
    def parse(cls, mem: PhysMemory, fdt_phys: int, fdt_size: int, *,
              scratch: Sequence[tuple[int, int]] = ()) -> IncomingHandover:
        """Read and validate the whole handover; reads only, changes nothing.

        ``scratch`` lists the scratch areas ``(start_pfn, npages)``: preserved memory
        there is refused.  Raises HandoverError naming the first problem found.
        """
        _check_range(mem, fdt_phys, fdt_size, "the KHO root FDT")
        if fdt_size > MAX_ROOT_FDT:
            raise HandoverError(f"the KHO root FDT claims {fdt_size} bytes; a root FDT "
                                f"is at most {MAX_ROOT_FDT} bytes")
        root = FdtReader(read_phys(mem, fdt_phys, fdt_size), "the KHO root FDT")
        top = root.node("/")
        root.expect_compatible(top, KHO_COMPATIBLE)
        root.check_seal()
        pmap = kho_mem_deserialize(mem, root.u64(top, PROP_MEM_MAP), scratch)
        _check_preserved(pmap, fdt_phys, fdt_size, "the KHO root FDT")
        subtrees = {name: _parse_subtree(mem, pmap, root, name, off)
                    for name, off in root.subnodes(top)}
        meta = subtrees.get(METADATA_NODE)
        metadata = KexecMetadata.from_fdt(meta.blob) if meta else None
        log.info("KHO handover at %#x: %d pages preserved, %d subtrees%s", fdt_phys,
                 pmap.nr_pages(), len(subtrees),
                 f"; exec from: {metadata.previous_release} (count {metadata.kexec_count})"
                 if metadata else "")
        return cls(mem, fdt_phys, fdt_size, pmap, subtrees, metadata)

    # -- boot hooks -----------------------------------------------------------------------

    def preserved_ranges(self) -> Iterator[tuple[np.ndarray, int]]:
        """(head pfns, order) of every preserved folio, per order: what boot reserves."""
        return self.pmap.ranges()

    def attach(self, buddy: PageAllocator) -> None:
        """Bind to the booted kernel's buddy allocator, which takes back what the
        restores free."""
        self.buddy = buddy

    def release_unclaimed(self) -> int:
        """Free every preserved folio nobody restored (end of boot); returns pages freed."""
        buddy = self._attached()
        freed = 0
        for heads, order in self.pmap.ranges():
            idx = np.flatnonzero(~self._claimed[order])
            if not len(idx):
                continue
            buddy.free_pfns(heads[idx], order)
            self._claimed[order][idx] = True
            freed += len(idx) << order
        log.info("KHO: released %d preserved pages that nobody restored", freed)
        return freed

    # -- subsystem calls ---------------------------------------------------------------------

    def retrieve_subtree(self, name: str) -> tuple[int, bytes]:
        """(phys, blob) of the sub-FDT ``name`` (validated at parse); HandoverError if
        the previous kernel did not hand one over."""
        sub = self.subtrees.get(name)
        if sub is None:
            raise HandoverError(f"the handover has no subtree {name!r} (it has: "
                                f"{', '.join(sorted(self.subtrees)) or 'none'})")
        return sub.phys, sub.blob

    def restore_folio(self, pfn: int) -> int:
        """Take back the preserved folio whose head is ``pfn``; returns its order."""
        order = self.pmap.order_of(pfn)
        if order is None:
            raise HandoverError(f"pfn {pfn} is not the head of a preserved folio")
        self.restore_pfns(np.array([pfn], np.int64), order)
        return order

    def restore_pages(self, pfn: int, n: int) -> None:
        """Take back ``n`` pages preserved with ``preserve_pages(pfn, n)`` (same split)."""
        pieces = list(split_natural(pfn, n))
        for head, order in pieces:
            self._claimable(np.array([head], np.int64), order)
        for head, order in pieces:
            self.restore_pfns(np.array([head], np.int64), order)

    def restore_pfns(self, pfns: np.ndarray, order: int) -> None:
        """Take back many preserved folios of one order; all or none.

        HandoverError unless every pfn is the head of a folio preserved at exactly
        ``order`` and not restored yet.
        """
        pfns = np.asarray(pfns, np.int64).ravel()
        idx = self._claimable(pfns, order)
        self._attached().memmap.claim_preserved(pfns, order)
        self._claimed[order][idx] = True

    def consume_chain(self, phys: int, magic: bytes) -> bytes:
        """Read and validate a chain written by ``chain.write_chain``, then free its
        pages (they are handover metadata).  Returns the payload."""
        chain = walk_chain(self.mem, phys, magic)
        self.free_chain(chain)
        return chain.payload

    def free_chain(self, chain: Chain) -> None:
        """Claim and free the pages of a chain already read with ``walk_chain``, once
        what it holds is taken over (a caller that must check the payload before it
        changes anything reads first and frees last)."""
        pfns = np.asarray(chain.pfns, np.int64)
        self.restore_pfns(pfns, 0)
        self._attached().free_pfns(pfns, 0)

    def _attached(self) -> PageAllocator:
        if self.buddy is None:
            raise RuntimeError("IncomingHandover.attach(buddy) has not been called")
        return self.buddy

    def _claimable(self, pfns: np.ndarray, order: int) -> np.ndarray:
        """Indexes into pmap.heads[order] of ``pfns``; HandoverError naming a bad one."""
        heads = self.pmap.heads.get(order, np.zeros(0, np.int64))
        idx = np.searchsorted(heads, pfns)
        found = idx < len(heads)
        found[found] = heads[idx[found]] == pfns[found]
        if not found.all():
            pfn = int(pfns[np.flatnonzero(~found)[0]])
            actual = self.pmap.order_of(pfn)
            why = (f"it was preserved as an order-{actual} folio" if actual is not None
                   else "it was not preserved")
            raise HandoverError(f"cannot restore pfn {pfn} as an order-{order} folio: {why}")
        claimed = self._claimed[order][idx]
        if claimed.any():
            pfn = int(pfns[np.flatnonzero(claimed)[0]])
            raise HandoverError(f"the order-{order} folio at pfn {pfn} was already restored")
        if has_duplicates(idx):
            raise HandoverError(f"restore_pfns was given an order-{order} folio twice")
        return idx


def _check_preserved(pmap: PreservedMap, phys: int, size: int, what: str) -> None:
    first = phys >> PAGE_SHIFT
    if phys % PAGE_SIZE or not pmap.covers(first, -(-size // PAGE_SIZE)):
        raise HandoverError(f"{what} at {phys:#x} ({size} bytes) is not in preserved, "
                            "page-aligned memory")


def _parse_subtree(mem: PhysMemory, pmap: PreservedMap, root: FdtReader, name: str,
                   off: int) -> InSubtree:
    what = f"the KHO subtree {name!r}"
    phys, size = root.u64(off, PROP_FDT), root.u64(off, PROP_FDT_SIZE)
    crc = root.u32(off, PROP_FDT_CRC)
    _check_range(mem, phys, size, what)
    _check_preserved(pmap, phys, size, what)
    blob = read_phys(mem, phys, size)
    if zlib.crc32(blob) != crc:
        raise HandoverError(f"{what} fails its CRC32 check (root FDT says {crc:#010x}, "
                            f"contents give {zlib.crc32(blob):#010x})")
    FdtReader(blob, what)
    return InSubtree(name, phys, blob)
