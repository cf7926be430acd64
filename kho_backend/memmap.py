"""The memmap: one byte of state per arena page, kept in the arena itself.

The kernel's ``struct page`` array lives in memory allocated from memblock at boot; so
does this one (on a KHO boot, from scratch), which makes boot-time memory use, and so
scratch sizing, real. It is rebuilt by every boot and is not part of the handover, but
the header records where the running kernel keeps it, so inspectors can read it live.

Encoding of a page's byte::

    bit  7     SCRATCH  the page lies in a scratch area (movable allocations only)
    bits 6..4  state    0 RESERVED   boot memory / metadata (header, memmap), never freed
                        1 FREE       head of a free buddy block
                        2 ALLOCATED  head of an allocated block
                        3 PRESERVED  head of a block handed over by the previous kernel
                                     and not yet restored (or released)
                        4 TAIL       any other page of a block; its head is the nearest
                                     non-TAIL page below it
    bits 3..0  order    order of the block, for heads; 0 otherwise

A zeroed memmap reads as "everything reserved", the safe default. Every call here is
vectorised with numpy; nothing loops over pages in Python.

Deferred initialisation (as the kernel's CONFIG_DEFERRED_STRUCT_PAGE_INIT and KHO's
on-restore init of preserved struct pages): boot writes no byte of a chunk (CHUNK pages,
the largest block) before something needs it. A chunk is *ready* once its bytes are
written; until then it reads, logically, as free order-0 pages plus the handed-over
blocks boot marked there without writing them (a ``_Deferred`` run of leaves, with the
state it is in: PRESERVED, or ALLOCATED once claimed whole). Boot's marks, the page
allocator's start (only chunks with free pages), every read and every change settle
the chunks they touch first; so a handover of a million pages costs boot and restore
a pass over their leaves (one bit per page), not over their bytes. :meth:`Memmap.settle`
writes all the rest (the daemon calls it once the mount answers); until then another
process reading the live memmap may find stale bytes in chunks not yet ready.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from .errors import HandoverError
from .leaves import LEAF_BITS, LEAF_SHIFT, Leaves
from .units import MAX_ORDER, PAGE_SIZE

#: Pages of the largest block: no block crosses a multiple of it.
CHUNK = 1 << MAX_ORDER
#: Chunks settled (or claimed) in one pass: their temporaries (a byte per page) stay
#: small enough to be reused from the heap, not mapped and faulted in anew.
_SETTLE = 128

if TYPE_CHECKING:
    from .arena import Arena


class PageState(IntEnum):
    """State of a page (bits 6..4 of its memmap byte)."""

    RESERVED = 0
    FREE = 1
    ALLOCATED = 2
    PRESERVED = 3
    TAIL = 4


class PageCategory(IntEnum):
    """What a page is used for, for the memory-map picture."""

    FREE = 0
    USED = 1  # allocated (unmovable, or movable outside scratch)
    PRESERVED = 2  # handed over and not yet restored
    SCRATCH = 3  # in a scratch area: free, or allocated movable
    RESERVED = 4  # boot memory / metadata


SCRATCH_FLAG = 0x80
STATE_SHIFT = 4
STATE_MASK = 0x70
ORDER_MASK = 0x0F


def encode(state: PageState, order: int = 0, scratch: bool = False) -> int:
    """The memmap byte for a page in ``state`` (``order`` for heads)."""
    return (SCRATCH_FLAG if scratch else 0) | (state << STATE_SHIFT) | order


FREE_PAGE = encode(PageState.FREE)  # a free order-0 head outside scratch: a reset page
TAIL = encode(PageState.TAIL)


def block_pages(pfns: np.ndarray, order: int) -> np.ndarray:
    """Every PFN of the blocks of ``order`` headed by ``pfns`` (flat, int64)."""
    if order == 0:
        return pfns
    return (pfns[:, None] + np.arange(1 << order, dtype=np.int64)).ravel()


def blocks_mask(npages: int, blocks: Iterable[tuple[np.ndarray, int]]) -> np.ndarray:
    """Bool per page of an arena of ``npages``: inside one of the ``blocks`` (head
    pfns, order)?"""
    mask = np.zeros(npages, bool)
    for pfns, order in blocks:
        mask[block_pages(pfns, order)] = True
    return mask


def is_strictly_increasing(pfns: np.ndarray) -> bool:
    """Whether ``pfns`` is sorted without duplicates (the cheap test first)."""
    return bool(np.all(pfns[1:] > pfns[:-1]))


def has_duplicates(pfns: np.ndarray) -> bool:
    """Whether a value occurs twice (by a sort: numpy's hash-based unique is slower)."""
    if is_strictly_increasing(pfns):
        return False
    ordered = np.sort(pfns)
    return bool(np.any(ordered[1:] == ordered[:-1]))


def _check_heads(pfns: np.ndarray, order: int, npages: int, what: str) -> None:
    if pfns.size == 0:
        return
    outside = (pfns < 0) | (pfns + (1 << order) > npages)
    if outside.any():
        pfn = int(pfns[np.argmax(outside)])
        raise HandoverError(
            f"A {what} folio of order {order} at PFN {pfn} lies outside the arena of {npages} pages."
        )
    misaligned = (pfns & ((1 << order) - 1)) != 0
    if misaligned.any():
        pfn = int(pfns[np.argmax(misaligned)])
        raise HandoverError(f"A {what} folio of order {order} at PFN {pfn} is not aligned to its size.")
    if has_duplicates(pfns):
        raise HandoverError(f"The {what} folios of order {order} list some PFN twice.")


class BootMarks:
    """What boot's marks did to a reset memmap, counted as they are made, so that the
    page allocator starts without reading it all: per chunk of CHUNK pages (the largest
    block), whether anything touched it, how many of its pages are no longer free
    (RESERVED or PRESERVED) and whether it has scratch pages; per node, the RESERVED and
    the scratch pages."""

    def __init__(self, npages: int, node_starts: np.ndarray) -> None:
        nchunks = -(-npages // CHUNK)
        self.touched = np.zeros(nchunks, bool)
        self.covered = np.zeros(nchunks, np.int64)
        self.scratched = np.zeros(nchunks, bool)
        self.reserved = np.zeros(len(node_starts) + 1, np.int64)
        self.scratch = np.zeros_like(self.reserved)
        self._node_starts = node_starts

    def note(self, pfn: int, changed: np.ndarray, per_node: np.ndarray) -> None:
        """Pages ``pfn + i`` with ``changed[i]`` change kind: count them per node."""
        self.touched[pfn // CHUNK:-(-(pfn + len(changed)) // CHUNK)] = True
        pages = pfn + np.flatnonzero(changed)
        per_node += np.bincount(np.searchsorted(self._node_starts, pages, side="right"),
                                minlength=len(per_node))

    def cover(self, heads: np.ndarray, order: int) -> None:
        """Blocks of ``order`` at ``heads``, all free until now, are not any more."""
        np.add.at(self.covered, heads >> MAX_ORDER, 1 << order)
        self.touched[heads >> MAX_ORDER] = True

    def cover_chunks(self, chunks: np.ndarray, pages: np.ndarray) -> None:
        """``pages[i]`` pages of chunk ``chunks[i]``, all free until now, are not any more."""
        self.covered[chunks] += pages
        self.touched[chunks] = True


@dataclass
class _Deferred:
    """Blocks marked by boot without writing their bytes: ``leaves`` in ``state``,
    wherever a chunk of theirs is not ready."""

    leaves: Leaves
    state: PageState
    chunks: np.ndarray      # ascending: those with blocks of ``leaves``
    #: Blocks claimed one by one while still PRESERVED here (bits as ``leaves.bitmaps``).
    claimed: np.ndarray | None = None


class Memmap:
    """Per-page state of the arena, stored in ``npages`` arena pages from ``first_pfn``."""

    def __init__(self, arena: Arena, first_pfn: int, *, reset: bool = False) -> None:
        """Attach to the memmap at ``first_pfn``: as found (an inspector reading the live
        memmap), or with ``reset=True`` (boot) every page a free order-0 page outside
        scratch, which the boot then marks: logically, since no chunk is written before
        it is needed (see the module docstring)."""
        self.arena = arena
        self.first_pfn = first_pfn
        self.npages = self.pages_needed(arena.npages)
        #: One uint8 per arena page: a view onto the arena bytes, not a copy. Only the
        #: bytes of ready chunks are meaningful (all of them once :attr:`settled`).
        self.map = np.frombuffer(arena.view(first_pfn, self.npages), dtype=np.uint8)[: arena.npages]
        self._node_starts = np.array([arena.node_range(n)[0] for n in range(1, arena.nodes)], dtype=np.int64)
        #: What boot marked since the reset, for the page allocator's start; None for
        #: a memmap attached as found.
        self.boot = BootMarks(arena.npages, self._node_starts) if reset else None
        nchunks = -(-arena.npages // CHUNK)
        #: Per chunk: are its bytes written? (None: all are, as found.)
        self._ready = np.zeros(nchunks, bool) if reset else None
        #: Per chunk: deferred runs of leaves that have blocks there.
        self._pending = np.zeros(nchunks, np.int16) if reset else None
        self._deferred: list[_Deferred] = []
        if reset:
            #: Pages in PRESERVED blocks, per node.
            self.preserved_per_node = np.zeros(arena.nodes, dtype=np.int64)
        else:
            self.preserved_per_node = self._count_preserved()

    @staticmethod
    def pages_needed(arena_npages: int) -> int:
        """Pages of memmap for an arena of ``arena_npages`` pages."""
        return -(-arena_npages // PAGE_SIZE)

    @property
    def preserved_pages(self) -> int:
        """Pages in blocks still PRESERVED."""
        return int(self.preserved_per_node.sum())

    # -- deferred initialisation ----------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Whether every chunk's bytes are written (no deferred initialisation left)."""
        return self._ready is None

    def settle(self) -> None:
        """Write every chunk not written yet: the rest of the deferred initialisation,
        after which :attr:`map` is the whole truth (for inspectors in other processes)."""
        if self._ready is not None:
            self._settle(np.flatnonzero(~self._ready))

    def settle_some(self) -> bool:
        """Write the next few chunks not written yet (a slice of the deferred
        initialisation, for a caller that interleaves it with other work); True once
        every chunk is written."""
        if self._ready is not None:
            self._settle(np.flatnonzero(~self._ready)[:_SETTLE])
        return self._ready is None

    def settle_pfns(self, pfns: np.ndarray) -> None:
        """Make the chunks of ``pfns`` (in the arena) ready before their bytes are read
        or changed."""
        if self._ready is not None:
            chunks = np.unique(np.asarray(pfns, np.int64) >> MAX_ORDER)
            self._settle(chunks[~self._ready[chunks]])

    def settle_range(self, pfn: int, npages: int) -> None:
        """Make the chunks of ``[pfn, pfn + npages)`` ready."""
        if self._ready is not None and npages > 0:
            chunks = np.arange(pfn >> MAX_ORDER, ((pfn + npages - 1) >> MAX_ORDER) + 1)
            self._settle(chunks[~self._ready[chunks]])

    def wrote(self, chunks: np.ndarray) -> None:
        """The page allocator wrote the whole of ``chunks`` (holding nothing boot marked)."""
        if self._ready is not None:
            self._ready[chunks] = True

    # -- boot-time set-up -----------------------------------------------------------------

    def mark_scratch(self, pfn: int, npages: int) -> None:
        """Flag ``[pfn, pfn + npages)`` as scratch (boot time)."""
        self.settle_range(pfn, npages)
        pages = self.map[pfn : pfn + npages]
        self.boot.note(pfn, pages < SCRATCH_FLAG, self.boot.scratch)
        self.boot.scratched[pfn // CHUNK:-(-(pfn + npages) // CHUNK)] = True
        pages |= SCRATCH_FLAG

    def mark_reserved(self, pfn: int, npages: int) -> None:
        """Make ``[pfn, pfn + npages)`` RESERVED, keeping the scratch flag (boot time,
        before the page allocator starts)."""
        self.settle_range(pfn, npages)
        pages = self.map[pfn : pfn + npages]
        fresh = (pages & STATE_MASK) != 0
        self.boot.note(pfn, fresh, self.boot.reserved)
        self.boot.cover(np.arange(pfn, pfn + npages, dtype=np.int64)[fresh], 0)
        pages &= SCRATCH_FLAG

    def set_preserved(self, leaves: Leaves, *, disjoint: bool = False) -> None:
        """Mark the blocks of ``leaves`` PRESERVED (boot time, on a reset memmap). In a
        chunk nothing touched yet, only logically: the leaves are kept and the bytes
        written when the chunk is first needed (or claimed before that: never as
        PRESERVED). Elsewhere (chunks boot marked, or a few blocks) byte by byte.

        HandoverError unless every page of those blocks is still a plain free page
        (not reserved, not scratch, not already preserved). ``disjoint``: the caller
        checked that no two blocks it marks share a page (a parsed handover's are), so
        blocks deferred before need not be compared with these.
        """
        order = leaves.order
        if self._ready is None:
            self._set_preserved_heads(leaves.heads(), order)
            return
        if leaves.sparse:               # a few blocks: their chunks from their heads
            chunks, count = np.unique(leaves.heads() >> MAX_ORDER, return_counts=True)
            pages = count.astype(np.int64) << order
        else:
            chunks, pages = _chunk_pages(leaves)
        eager = self._ready[chunks]
        if not disjoint:
            eager |= self._overlaps(leaves, chunks)
        if eager.any():
            self._write_chunks(leaves, chunks[eager], PageState.PRESERVED, check=FREE_PAGE)
        lazy = chunks[~eager]
        if lazy.size:
            self._deferred.append(_Deferred(leaves, PageState.PRESERVED, chunks))
            self._pending[lazy] += 1
        self.boot.cover_chunks(chunks, pages)
        self._count(leaves, sign=+1)

    def _set_preserved_heads(self, heads: np.ndarray, order: int) -> None:
        """set_preserved for a few blocks: page by page."""
        self.settle_pfns(heads)
        pages = block_pages(heads, order)
        busy = self.map[pages] != FREE_PAGE
        if busy.any():
            self._refuse_busy(int(pages[np.argmax(busy)]), order)
        self.map[pages] = TAIL
        self.map[heads] = encode(PageState.PRESERVED, order)
        self.boot.cover(heads, order)
        self._count(heads, order, sign=+1)

    def _refuse_busy(self, pfn: int, order: int) -> None:
        raise HandoverError(
            f"A preserved folio of order {order} covers PFN {pfn}, which is {self.describe(pfn)}."
        )

    # -- the handover -----------------------------------------------------------------------

    def claim_preserved(self, pfns: np.ndarray, order: int) -> None:
        """PRESERVED -> ALLOCATED for the blocks of ``order`` at ``pfns`` (restore).

        HandoverError unless each is exactly the head of a preserved block of that order.
        """
        pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        if not 0 <= order <= MAX_ORDER:
            raise HandoverError(f"Order {order} is not a folio order (0..{MAX_ORDER}).")
        _check_heads(pfns, order, self.arena.npages, "restored")
        lazy = (~self._ready[pfns >> MAX_ORDER] if self._ready is not None
                else np.zeros(len(pfns), bool))
        now = pfns[~lazy]
        wrong = self.map[now] != encode(PageState.PRESERVED, order)
        if wrong.any():
            self._refuse_unpreserved(int(now[np.argmax(wrong)]), order)
        marks = self._deferred_claims(pfns[lazy], order)      # all checked: now change
        self.map[now] = encode(PageState.ALLOCATED, order)
        for deferred, rows, bits in marks:
            if deferred.claimed is None:
                deferred.claimed = np.zeros_like(deferred.leaves.bitmaps)
            np.bitwise_or.at(deferred.claimed, (rows, bits >> 3),
                             np.left_shift(1, bits & 7).astype(np.uint8))
        self._count(pfns, order, sign=-1)

    def _deferred_claims(self, pfns: np.ndarray, order: int
                         ) -> list[tuple[_Deferred, np.ndarray, np.ndarray]]:
        """Where ``pfns`` (in chunks not ready) lie in deferred blocks still PRESERVED
        and not claimed: (deferred, leaf rows, bits) each; HandoverError naming one that
        does not."""
        out = []
        left = np.ones(len(pfns), bool)
        for deferred in self._deferred:
            leaves = deferred.leaves
            if leaves.order != order or not left.any():
                continue
            hit = np.flatnonzero(left)
            hit = hit[leaves.contains(pfns[hit])]
            if not hit.size:
                continue
            rows = np.searchsorted(leaves.index, pfns[hit] >> (order + LEAF_SHIFT))
            bits = (pfns[hit] >> order) & (LEAF_BITS - 1)
            taken = np.zeros(len(hit), bool) if deferred.claimed is None else \
                (deferred.claimed[rows, bits >> 3] >> (bits & 7)) & 1 != 0
            if deferred.state is not PageState.PRESERVED or taken.any():
                self._refuse_unpreserved(int(pfns[hit[np.argmax(taken)]]), order)
            out.append((deferred, rows, bits))
            left[hit] = False
        if left.any():
            self._refuse_unpreserved(int(pfns[np.argmax(left)]), order)
        return out

    def claim_leaves(self, leaves: Leaves) -> None:
        """PRESERVED -> ALLOCATED for every block of ``leaves`` (a pool restored whole):
        where boot deferred these very leaves, by changing their state only; in ready
        chunks, head bytes, whole rows at a time. HandoverError unless each is exactly
        the head of a preserved block of that order; nothing changes then."""
        order = leaves.order
        deferred = next((d for d in self._deferred if d.leaves is leaves), None)
        if deferred is None:            # marked byte by byte (or settled since)
            chunks = _chunk_pages(leaves)[0]
            self.settle_pfns(chunks << MAX_ORDER)
        else:
            chunks = deferred.chunks
        ready = chunks if self._ready is None else chunks[self._ready[chunks]]
        before, after = encode(PageState.PRESERVED, order), encode(PageState.ALLOCATED, order)
        bad = None if deferred is None else \
            self._unclaimable(deferred, chunks[~self._ready[chunks]])
        parts = [ready[lo:lo + _SETTLE] for lo in range(0, len(ready), _SETTLE)]
        for done, part in enumerate(parts):     # all or nothing: a refusal undoes
            rows, heads = self._head_rows(leaves, part)
            wrong = rows != before
            wrong &= heads
            if wrong.any() or (bad is not None and done == len(parts) - 1):
                for undo in parts[:done]:
                    rows_, heads_ = self._head_rows(leaves, undo)
                    self._put_rows(undo, np.where(heads_, before, rows_))
                found = [self._pfn_at(part, int(np.argmax(wrong)))] if wrong.any() else []
                self._refuse_unpreserved(min(found + ([] if bad is None else [bad])), order)
            self._put_rows(part, np.where(heads, after, rows))
        if bad is not None:             # no ready chunk to check
            self._refuse_unpreserved(bad, order)
        if deferred is not None:
            deferred.state = PageState.ALLOCATED
        self._count(leaves, sign=-1)

    def _unclaimable(self, deferred: _Deferred, waiting: np.ndarray) -> int | None:
        """The first block of ``deferred`` in the chunks ``waiting`` (not ready) that is
        no longer PRESERVED (claimed whole, or one by one), or None."""
        leaves = deferred.leaves
        found = []
        if deferred.claimed is not None and deferred.claimed.any():
            found.append(int(Leaves(leaves.order, leaves.index, deferred.claimed).heads()[0]))
        if deferred.state is not PageState.PRESERVED and waiting.size:
            found.append(int(self._heads_in(leaves, waiting[:1])[0]))
        return min(found, default=None)

    def _refuse_unpreserved(self, pfn: int, order: int) -> None:
        raise HandoverError(
            f"PFN {pfn} was not preserved as a folio of order {order}; it is {self.describe(pfn)}."
        )

    def preserved_heads(self) -> Iterator[tuple[np.ndarray, int]]:
        """``(pfns, order)`` for the blocks still PRESERVED, ascending PFNs per order."""
        self.settle()
        heads = np.flatnonzero((self.map & STATE_MASK) == PageState.PRESERVED << STATE_SHIFT)
        orders = self.map[heads] & ORDER_MASK
        for order in np.unique(orders):
            yield heads[orders == order], int(order)

    # -- reading ----------------------------------------------------------------------------

    def head(self, pfn: int) -> tuple[PageState, int]:
        """``(state, order)`` of page ``pfn``'s own byte."""
        self.settle_range(pfn, 1)
        byte = int(self.map[pfn])
        return PageState((byte & STATE_MASK) >> STATE_SHIFT), byte & ORDER_MASK

    def is_scratch(self, pfn: int) -> bool:
        """Whether ``pfn`` lies in a scratch area."""
        self.settle_range(pfn, 1)
        return bool(self.map[pfn] & SCRATCH_FLAG)

    def describe(self, pfn: int) -> str:
        """A phrase for error messages: what page ``pfn`` is."""
        state, order = self.head(pfn)
        where = " in scratch" if self.is_scratch(pfn) else ""
        if state is PageState.RESERVED:
            return f"reserved boot memory{where}"
        if state is PageState.TAIL:
            self.settle_range(max(0, pfn - (1 << MAX_ORDER)), 1 << MAX_ORDER)
            window = self.map[max(0, pfn - (1 << MAX_ORDER)) : pfn]
            heads = np.flatnonzero((window & STATE_MASK) != PageState.TAIL << STATE_SHIFT)
            head = pfn - len(window) + int(heads[-1]) if heads.size else None
            return f"inside the block headed by PFN {head}{where}"
        return f"the head of a {state.name.lower()} block of order {order}{where}"

    def block_states_of(self, pfns: np.ndarray) -> np.ndarray:
        """State (as uint8) of the block containing each of ``pfns`` (in the arena).

        A tail's head is the first non-TAIL page among ``pfn`` rounded down to 2, 4, ...
        pages; so this costs MAX_ORDER passes over ``pfns``, whatever the arena size.
        """
        pfns = np.asarray(pfns, dtype=np.int64)
        self.settle_pfns(pfns)     # a tail's head is in the same chunk
        states = (self.map[pfns] & STATE_MASK) >> STATE_SHIFT
        pending = np.flatnonzero(states == PageState.TAIL)
        for order in range(1, MAX_ORDER + 1):
            if not pending.size:
                break
            byte = self.map[pfns[pending] & ~((1 << order) - 1)]
            head = (byte & STATE_MASK) != PageState.TAIL << STATE_SHIFT
            # A head whose block is too small to reach the page means a corrupt memmap:
            # leave such a page as TAIL, which no caller takes for allocated.
            covers = head & ((byte & ORDER_MASK) >= order)
            states[pending[covers]] = (byte[covers] & STATE_MASK) >> STATE_SHIFT
            pending = pending[~head]
        return states

    def allocated_mask(self, pfns: np.ndarray) -> np.ndarray:
        """Whether each of ``pfns`` lies in an ALLOCATED block (head or tail page)."""
        return self.block_states_of(pfns) == PageState.ALLOCATED

    def block_states(self) -> np.ndarray:
        """For every page, the state (as uint8) of the block it belongs to."""
        self.settle()
        states = (self.map & STATE_MASK) >> STATE_SHIFT
        is_tail = states == PageState.TAIL
        if not is_tail.any():
            return states
        # Each tail takes the state of the nearest non-tail page below it: its head.
        # int32 indices: an arena would need 8 TiB to overflow them.
        head = np.arange(self.map.size, dtype=np.int32)
        head[is_tail] = 0
        np.maximum.accumulate(head, out=head)
        return states[head]

    def categories(self) -> np.ndarray:
        """A PageCategory (as uint8) per page, for the memory-map picture."""
        self.settle()
        state = self.block_states()
        cat = np.full(self.map.size, PageCategory.FREE, dtype=np.uint8)
        cat[state == PageState.ALLOCATED] = PageCategory.USED
        cat[(self.map & SCRATCH_FLAG) != 0] = PageCategory.SCRATCH
        cat[state == PageState.PRESERVED] = PageCategory.PRESERVED
        cat[state == PageState.RESERVED] = PageCategory.RESERVED
        return cat

    # -- internals --------------------------------------------------------------------------

    def _count(self, blocks: Leaves | np.ndarray, order: int = 0, *, sign: int) -> None:
        """Add ``sign`` times the pages of ``blocks`` (leaves, or head pfns of ``order``)
        to the per-node preserved counts."""
        if isinstance(blocks, Leaves):
            order = blocks.order
            if self.arena.nodes == 1:
                self.preserved_per_node[0] += sign * blocks.pages()
                return
            blocks = blocks.heads()
        nodes = np.searchsorted(self._node_starts, blocks, side="right")
        self.preserved_per_node += sign * (np.bincount(nodes, minlength=self.arena.nodes) << order)

    def _settle(self, chunks: np.ndarray) -> None:
        """Write ``chunks`` (ascending, none ready): free pages, and the deferred blocks
        there in their state. A slice of chunks at a time, one write of each byte."""
        assert self._ready is not None
        for lo in range(0, len(chunks), _SETTLE):
            part = chunks[lo:lo + _SETTLE]
            view = None if self._deferred else self._rows_view(part)
            if view is not None:            # nothing deferred yet: free pages, in place
                self._prefault(part)
                view.fill(FREE_PAGE)
                self._ready[part] = True
                continue
            rows = None         # free pages, until a deferred map has blocks there
            for deferred in self._deferred:
                mine = part[_member(part, deferred)]
                if mine.size:
                    rows = self._fill(rows, part, np.searchsorted(part, mine), deferred, mine)
            if rows is None:
                rows = np.full((len(part), CHUNK), FREE_PAGE, np.uint8)
            self._prefault(part)
            self._put_rows(part, rows)
            self._ready[part] = True
        if self._ready.all():
            self._ready = self._pending = None
            self._deferred.clear()

    def _fill(self, rows: np.ndarray | None, part: np.ndarray, at: np.ndarray,
              deferred: _Deferred, chunks: np.ndarray) -> np.ndarray:
        """The rows of ``part`` (``rows``, or free pages if None) with the deferred
        blocks in ``chunks`` (``part[at]``) written: in their state, or ALLOCATED where
        claimed one by one."""
        order = deferred.leaves.order
        tail = np.arange(CHUNK) & ((1 << order) - 1) != 0
        if rows is None and len(at) == len(part):
            mine = np.uint8(FREE_PAGE)      # every row: written by the first np.where
        else:
            if rows is None:
                rows = np.full((len(part), CHUNK), FREE_PAGE, np.uint8)
            mine = rows[at]
        for bitmaps, state in ((deferred.leaves.bitmaps, deferred.state),
                               (deferred.claimed, PageState.ALLOCATED)):
            if bitmaps is None:
                continue
            pages = _chunk_bits(deferred.leaves, chunks, bitmaps)
            if order:
                pages = np.repeat(pages, 1 << order, axis=1)
                value = np.where(tail, TAIL, encode(state, order)).astype(np.uint8)
            else:
                value = np.uint8(encode(state, 0))
            mine = np.where(pages, value, mine)       # np.copyto(where=) is slower
        if rows is None:
            return mine
        rows[at] = mine
        return rows

    def _overlaps(self, leaves: Leaves, chunks: np.ndarray) -> np.ndarray:
        """Per chunk of ``chunks`` (not ready ones): do blocks of ``leaves`` share a
        page there with blocks deferred before?"""
        out = np.zeros(len(chunks), bool)
        shared = np.flatnonzero(self._pending[chunks] > 0)
        if not shared.size:
            return out
        mine = np.repeat(_chunk_bits(leaves, chunks[shared]), 1 << leaves.order, axis=1)
        for deferred in self._deferred:
            at = shared[_member(chunks[shared], deferred)]
            if at.size:
                theirs = _chunk_bits(deferred.leaves, chunks[at])
                theirs = np.repeat(theirs, 1 << deferred.leaves.order, axis=1)
                out[at] |= (mine[np.searchsorted(shared, at)] & theirs).any(axis=1)
        return out

    def _write_chunks(self, leaves: Leaves, chunks: np.ndarray, state: PageState, *,
                      check: int) -> None:
        """Write the blocks of ``leaves`` in ``chunks`` as ``state``, byte by byte, after
        checking that each of their pages is ``check``; HandoverError naming one that
        is not, with nothing changed."""
        self.settle_pfns(chunks << MAX_ORDER)
        order = leaves.order
        if leaves.sparse:       # a few blocks: picked from their heads
            heads = leaves.heads()
            heads = heads[np.isin(heads >> MAX_ORDER, chunks)]
        else:
            heads = self._heads_in(leaves, chunks)
        pages = block_pages(heads, order)
        busy = self.map[pages] != check
        if busy.any():
            self._refuse_busy(int(pages[np.argmax(busy)]), order)
        self.map[pages] = TAIL
        self.map[heads] = encode(state, order)

    def _head_rows(self, leaves: Leaves, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bytes of ``chunks`` (ready), a row each (the memmap itself when the
        chunks are consecutive, else a copy), and where the heads of the blocks of
        ``leaves`` are in them (whole-row passes, for many chunks)."""
        order = leaves.order
        if order:
            heads = np.zeros((len(chunks), CHUNK), bool)
            heads[:, ::1 << order] = _chunk_bits(leaves, chunks)
        else:
            heads = _chunk_bits(leaves, chunks)
        view = self._rows_view(chunks)
        if view is not None:
            return view, heads
        nfull = self.arena.npages // CHUNK
        if not len(chunks) or chunks[-1] < nfull:
            return self.map[:nfull * CHUNK].reshape(nfull, CHUNK)[chunks], heads
        pfns = (chunks[:, None] << MAX_ORDER) + np.arange(CHUNK, dtype=np.int64)
        inside = pfns < self.arena.npages        # the arena's last chunk is partial
        rows = np.full((len(chunks), CHUNK), FREE_PAGE, np.uint8)
        rows[inside] = self.map[pfns[inside]]
        return rows, heads & inside

    def _rows_view(self, chunks: np.ndarray) -> np.ndarray | None:
        """The memmap of ``chunks`` as rows, a view (no copy), if they are consecutive
        whole chunks; else None."""
        if not len(chunks) or int(chunks[-1]) - int(chunks[0]) != len(chunks) - 1 \
                or int(chunks[-1]) >= self.arena.npages // CHUNK:
            return None
        first = int(chunks[0]) << MAX_ORDER
        return self.map[first:first + len(chunks) * CHUNK].reshape(len(chunks), CHUNK)

    def _prefault(self, chunks: np.ndarray) -> None:
        """Map the memmap pages of ``chunks`` (ascending) for writing in one call, when
        there are many (a page fault each costs twice as much)."""
        if len(chunks) >= _SETTLE // 2:
            first = self.first_pfn + (int(chunks[0]) << MAX_ORDER) // PAGE_SIZE
            last = self.first_pfn + ((int(chunks[-1]) + 1) << MAX_ORDER) // PAGE_SIZE
            self.arena.prefault(first, min(last, self.first_pfn + self.npages) - first)

    def _put_rows(self, chunks: np.ndarray, rows: np.ndarray) -> None:
        """Write ``rows`` (from :meth:`_head_rows`) back to ``chunks``."""
        view = self._rows_view(chunks)
        if view is not None:
            view[:] = rows
            return
        nfull = self.arena.npages // CHUNK
        whole = chunks < nfull
        self.map[:nfull * CHUNK].reshape(nfull, CHUNK)[chunks[whole]] = rows[whole]
        if not whole.all():
            self.map[nfull * CHUNK:] = rows[-1, :self.arena.npages - nfull * CHUNK]

    @staticmethod
    def _pfn_at(chunks: np.ndarray, flat: int) -> int:
        """The pfn of position ``flat`` of rows of ``chunks``."""
        return (int(chunks[flat // CHUNK]) << MAX_ORDER) + flat % CHUNK

    def _heads_in(self, leaves: Leaves, chunks: np.ndarray) -> np.ndarray:
        """Head pfns of the blocks of ``leaves`` in ``chunks`` (ascending)."""
        order = leaves.order
        per = CHUNK >> order
        at = np.flatnonzero(_chunk_bits(leaves, chunks))     # 2-D np.nonzero is slow
        return (chunks[at // per] << MAX_ORDER) + ((at % per) << order)

    def _count_preserved(self) -> np.ndarray:
        counts = np.zeros(self.arena.nodes, dtype=np.int64)
        for pfns, order in self.preserved_heads():
            nodes = np.searchsorted(self._node_starts, pfns, side="right")
            counts += np.bincount(nodes, minlength=self.arena.nodes) << order
        return counts


#: Up to this order, a chunk's blocks are whole bytes of a leaf.
_BYTE_ORDER = MAX_ORDER - 3


def _chunk_pages(leaves: Leaves) -> tuple[np.ndarray, np.ndarray]:
    """(chunks, pages): the chunks holding blocks of ``leaves``, ascending, and how many
    of their pages those blocks take; a pass over the leaves' bitmaps, one bit per
    block."""
    order = leaves.order
    per_leaf = LEAF_BITS >> (MAX_ORDER - order)        # chunks a leaf spans
    if not len(leaves.index):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if order <= _BYTE_ORDER:        # a chunk's blocks are whole bytes of the leaf
        counts = np.bitwise_count(_as_words(leaves.bitmaps, per_leaf))
    else:                           # fewer than eight: bit by bit (few leaves then)
        counts = np.unpackbits(leaves.bitmaps, axis=1, bitorder="little")
    counts = counts.reshape(len(leaves.index), per_leaf, -1).sum(axis=2, dtype=np.int64).ravel()
    chunks = ((leaves.index[:, None] * per_leaf) + np.arange(per_leaf)).ravel()
    used = np.flatnonzero(counts)
    return chunks[used].astype(np.int64), counts[used] << order


def _chunk_bits(leaves: Leaves, chunks: np.ndarray,
                bitmaps: np.ndarray | None = None) -> np.ndarray:
    """Bool (chunk, block slot in it): which blocks of ``leaves`` the chunks hold, from
    the leaves' bits (or from ``bitmaps``, bits laid out as theirs)."""
    bitmaps = leaves.bitmaps if bitmaps is None else bitmaps
    order = leaves.order
    per = CHUNK >> order                                      # blocks in a chunk
    if not len(leaves.index):
        return np.zeros((len(chunks), per), bool)
    first = (chunks << MAX_ORDER) >> order                    # first block number
    leaf = first >> LEAF_SHIFT
    row = np.minimum(np.searchsorted(leaves.index, leaf), len(leaves.index) - 1)
    have = (leaves.index[row] == leaf)[:, None]
    if order <= _BYTE_ORDER:
        if have.all() and int(chunks[-1]) - int(chunks[0]) == len(chunks) - 1 and \
                int(leaves.index[row[-1]] - leaves.index[row[0]]) == int(row[-1] - row[0]):
            # Consecutive chunks in consecutive leaves: one slice of the bitmaps.
            start = int(row[0]) * bitmaps.shape[1] + (int(first[0] & (LEAF_BITS - 1)) >> 3)
            packed = bitmaps.reshape(-1)[start:start + len(chunks) * (per >> 3)]
            packed = packed.reshape(len(chunks), -1)
        else:
            cols = ((first & (LEAF_BITS - 1)) >> 3)[:, None] + np.arange(per >> 3)
            packed = bitmaps[row[:, None], cols] * have
        return np.unpackbits(packed, axis=1, bitorder="little").view(bool)
    bit = (first & (LEAF_BITS - 1))[:, None] + np.arange(per)
    return ((bitmaps[row[:, None], bit >> 3] >> (bit & 7)) & 1).astype(bool) & have


def _member(chunks: np.ndarray, deferred: _Deferred) -> np.ndarray:
    """Per chunk (ascending): does ``deferred`` have blocks there?"""
    mine = deferred.chunks
    at = np.minimum(np.searchsorted(mine, chunks), max(len(mine) - 1, 0))
    return (mine[at] == chunks) if len(mine) else np.zeros(len(chunks), bool)


def _as_words(bitmaps: np.ndarray, parts: int) -> np.ndarray:
    """``bitmaps`` (a row per leaf) as u64 words when each of ``parts`` equal parts of a
    row is a whole number of them (eight times fewer elements to count), else bytes."""
    return bitmaps.view(np.uint64) if bitmaps.shape[1] % (parts * 8) == 0 else bitmaps
