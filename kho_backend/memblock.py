"""memblock: the boot-time allocator.

Like the kernel's memblock it knows *memory* regions (here: the NUMA nodes) and
*reserved* regions, and hands out physically contiguous ranges, top-down by default.
Everything is in PFNs. It lives only until the page allocator starts; its reserved
regions then become RESERVED pages in the memmap.

Scratch: once scratch areas exist (placed at the first boot, recorded in the header),
ordinary allocations keep out of them, because during a kernel's life scratch only takes
movable memory. In ``scratch_only`` mode (a boot with a KHO handover, before the
preserved memory is known) allocations come *only* from scratch: the requested node's
area first (every node's if none is given), then the global area, then the lowmem one.

For scratch sizing, memblock counts what it allocated: in total, per node, and below
``low_limit`` (the "low" part of memory; see :func:`kho_backend.scratch.low_limit`).
Preserved ranges are not entered as reserved regions here: in scratch-only mode nothing
can land on them, and the memmap records them in bulk (a Python list of a million
regions would be the slow path the kernel avoids with its per-order bitmaps).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import OutOfMemory
from .header import ScratchArea, ScratchKind
from .units import PAGE_SHIFT, format_size

Span = tuple[int, int]  # [start_pfn, end_pfn)

# Scratch-only allocations try node-local areas first, then global, lowmem last (it is the
# scarcest: only it can serve allocations that must be low).
_SCRATCH_PREFERENCE = {ScratchKind.NODE: 0, ScratchKind.GLOBAL: 1, ScratchKind.LOWMEM: 2}


@dataclass
class MemblockUsage:
    """Pages allocated through memblock (scratch placement excluded)."""

    total: int = 0
    low: int = 0
    per_node: list[int] = field(default_factory=list)


class Memblock:
    """Boot-time range allocator over the arena's nodes."""

    def __init__(self, node_ranges: Sequence[Span], *, low_limit: int,
                 scratch: Iterable[ScratchArea] = (), scratch_only: bool = False) -> None:  # fmt: skip
        self.memory: list[Span] = list(node_ranges)
        self.reserved: list[Span] = []
        self.scratch: list[ScratchArea] = list(scratch)
        self.scratch_only = scratch_only
        self.low_limit = low_limit
        self.usage = MemblockUsage(per_node=[0] * len(self.memory))

    # -- public calls ---------------------------------------------------------------------

    def reserve(self, pfn: int, npages: int) -> None:
        """Mark ``[pfn, pfn + npages)`` reserved (may overlap earlier reservations)."""
        if npages <= 0:
            return
        spans = sorted(self.reserved + [(pfn, pfn + npages)])
        merged = [spans[0]]
        for start, end in spans[1:]:
            if start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        self.reserved = merged

    def alloc(self, npages: int, *, node: int | None = None, align: int = 1) -> int:
        """Allocate and reserve ``npages`` pages (top-down); returns the first PFN.

        In scratch-only mode the pages come from scratch areas only. OutOfMemory names
        the request and the largest free range that was available.
        """
        for lo, hi in self._candidates(node):
            pfn = self.find(npages, lo, hi, align=align)
            if pfn is not None:
                self.reserve(pfn, npages)
                self._account(pfn, npages)
                return pfn
        raise OutOfMemory(self._failure(npages, node))

    def find(self, npages: int, lo: int, hi: int, *, align: int = 1, top_down: bool = True) -> int | None:
        """First PFN of a free, aligned, ``npages`` range inside ``[lo, hi)``, or None.

        Free means not reserved and (unless in scratch-only mode) not scratch.
        """
        gaps = self.free_spans(lo, hi)
        for start, end in reversed(gaps) if top_down else gaps:
            if top_down:
                pfn = (end - npages) // align * align
                if pfn >= start:
                    return pfn
            else:
                pfn = -(-start // align) * align
                if pfn + npages <= end:
                    return pfn
        return None

    def add_scratch(self, area: ScratchArea) -> None:
        """Record a newly placed scratch area, which ordinary allocations then avoid."""
        self.scratch.append(area)

    def largest_free(self, node: int | None = None) -> int:
        """Largest free range (pages) that :meth:`alloc` could use for ``node``."""
        return max((e - s for lo, hi in self._candidates(node) for s, e in self.free_spans(lo, hi)), default=0)

    def total_free(self, node: int | None = None) -> int:
        """Free pages (summed over ranges) that :meth:`alloc` could use for ``node``."""
        return sum(e - s for lo, hi in self._candidates(node) for s, e in self.free_spans(lo, hi))

    def free_spans(self, lo: int, hi: int) -> list[Span]:
        """Free spans inside ``[lo, hi)``, ascending (not reserved; not scratch unless
        in scratch-only mode)."""
        blocked = list(self.reserved)
        if not self.scratch_only:
            blocked += [(a.start_pfn, a.end_pfn) for a in self.scratch]
        gaps, cursor = [], lo
        for start, end in sorted(blocked):
            if end <= cursor or start >= hi:
                continue
            if start > cursor:
                gaps.append((cursor, start))
            cursor = max(cursor, end)
        if cursor < hi:
            gaps.append((cursor, hi))
        return gaps

    # -- internals --------------------------------------------------------------------------

    def _candidates(self, node: int | None) -> list[Span]:
        """Ranges to try, in order of preference."""
        nodes = range(len(self.memory)) if node is None else [node]
        if not self.scratch_only:
            return [self.memory[n] for n in reversed(nodes)]
        by_kind = sorted(self.scratch, key=lambda a: (_SCRATCH_PREFERENCE[a.kind], -a.node))
        return [
            (a.start_pfn, a.end_pfn)
            for a in by_kind
            if a.kind != ScratchKind.NODE or a.node in nodes
        ]

    def _account(self, pfn: int, npages: int) -> None:
        self.usage.total += npages
        self.usage.low += max(0, min(pfn + npages, self.low_limit) - pfn)
        for n, (lo, hi) in enumerate(self.memory):
            self.usage.per_node[n] += max(0, min(hi, pfn + npages) - max(lo, pfn))

    def _failure(self, npages: int, node: int | None) -> str:
        where = "" if node is None else f" on node {node}"
        mode = " from scratch" if self.scratch_only else ""
        largest = self.largest_free(node)
        return (
            f"memblock cannot allocate {npages} pages ({format_size(npages << PAGE_SHIFT)})"
            f"{mode}{where}: the largest free range is {largest} pages "
            f"({format_size(largest << PAGE_SHIFT)})."
        )
