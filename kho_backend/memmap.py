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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from .errors import HandoverError
from .leaves import Leaves, Run
from .units import MAX_ORDER, PAGE_SIZE

#: Pages of the largest block: no block crosses a multiple of it.
CHUNK = 1 << MAX_ORDER
#: A byte value times this: that byte in each of a u64's eight bytes.
_WORD = 0x0101010101010101

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


def _mismatch(heads: np.ndarray, run: Run, bits: np.ndarray | None, value: int) -> int | None:
    """Index of the first byte of ``heads`` (one per slot of ``run``; ``bits`` its slots
    as 0/1 bytes, None when all are set) whose slot is set and which is not ``value``,
    or None. Compared eight bytes at a time where the bytes are contiguous."""
    words = _words(heads)
    pattern = np.uint64(_WORD * value)
    if bits is None:
        if words is not None and (words == pattern).all():
            return None
        wrong = heads != value
    else:
        if words is not None and not ((words ^ pattern) & (_words(bits) * np.uint64(0xFF))).any():
            return None
        wrong = (heads != value) & bits.view(bool)
    return int(np.argmax(wrong)) if wrong.any() else None


def _turn(heads: np.ndarray, bits: np.ndarray | None, before: int, after: int) -> None:
    """Set to ``after`` the bytes of ``heads`` whose slot is set (all ``before``)."""
    if bits is None:
        heads.fill(after)
        return
    words = _words(heads)
    if words is not None:
        words ^= _words(bits) * np.uint64(before ^ after)   # 0/1 bytes: no carries
    else:
        heads ^= bits * (before ^ after)


def _words(pages: np.ndarray) -> np.ndarray | None:
    """``pages`` (bytes) as u64 words, if they are contiguous and a whole number of them."""
    return pages.view(np.uint64) if pages.flags.c_contiguous and not len(pages) % 8 else None


def _run_bits(run: Run) -> np.ndarray | None:
    """The run's slots as 0/1 bytes; None when every slot is set."""
    return None if run.count == run.slots else run.bits()


class BootMarks:
    """What boot's marks did to a reset memmap, counted as they are made, so that the
    page allocator starts without reading it all: per chunk of CHUNK pages (the largest
    block), whether anything touched it and how many of its pages are no longer free
    (RESERVED or PRESERVED); per node, the RESERVED and the scratch pages."""

    def __init__(self, npages: int, node_starts: np.ndarray) -> None:
        nchunks = -(-npages // CHUNK)
        self.touched = np.zeros(nchunks, bool)
        self.covered = np.zeros(nchunks, np.int64)
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

    def cover_bits(self, first: int, packed: np.ndarray) -> None:
        """The order-0 pages set in ``packed`` from ``first`` (a multiple of CHUNK)."""
        per_byte = np.bitwise_count(packed)
        counts = np.add.reduceat(per_byte, np.arange(0, len(per_byte), CHUNK >> 3), dtype=np.int64)
        self.covered[first // CHUNK:first // CHUNK + len(counts)] += counts
        self.touched[first // CHUNK:first // CHUNK + len(counts)] |= counts != 0


class Memmap:
    """Per-page state of the arena, stored in ``npages`` arena pages from ``first_pfn``."""

    def __init__(self, arena: Arena, first_pfn: int, *, reset: bool = False) -> None:
        """Attach to the memmap at ``first_pfn``: as found (an inspector reading the live
        memmap), or with ``reset=True`` (boot) every page a free order-0 page outside
        scratch, which the boot then marks."""
        self.arena = arena
        self.first_pfn = first_pfn
        self.npages = self.pages_needed(arena.npages)
        #: One uint8 per arena page: a view onto the arena bytes, not a copy.
        self.map = np.frombuffer(arena.view(first_pfn, self.npages), dtype=np.uint8)[: arena.npages]
        self._node_starts = np.array([arena.node_range(n)[0] for n in range(1, arena.nodes)], dtype=np.int64)
        #: What boot marked since the reset, for the page allocator's start; None for
        #: a memmap attached as found.
        self.boot = BootMarks(arena.npages, self._node_starts) if reset else None
        if reset:
            arena.prefault(first_pfn, self.npages)
            self.map[:] = FREE_PAGE
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

    # -- boot-time set-up -----------------------------------------------------------------

    def mark_scratch(self, pfn: int, npages: int) -> None:
        """Flag ``[pfn, pfn + npages)`` as scratch (boot time)."""
        pages = self.map[pfn : pfn + npages]
        self.boot.note(pfn, pages < SCRATCH_FLAG, self.boot.scratch)
        pages |= SCRATCH_FLAG

    def mark_reserved(self, pfn: int, npages: int) -> None:
        """Make ``[pfn, pfn + npages)`` RESERVED, keeping the scratch flag (boot time,
        before the page allocator starts)."""
        pages = self.map[pfn : pfn + npages]
        fresh = (pages & STATE_MASK) != 0
        self.boot.note(pfn, fresh, self.boot.reserved)
        self.boot.cover(np.arange(pfn, pfn + npages, dtype=np.int64)[fresh], 0)
        pages &= SCRATCH_FLAG

    def set_preserved(self, leaves: Leaves) -> None:
        """Mark the blocks of ``leaves`` PRESERVED (boot time, on a reset memmap), a run
        of leaves at a time: order-0 pages by whole-run vector passes over their bytes,
        larger blocks row by row.

        HandoverError unless every page of those blocks is still a plain free page
        (not reserved, not scratch, not already preserved).
        """
        order, head = leaves.order, encode(PageState.PRESERVED, leaves.order)
        if leaves.sparse:
            self._set_preserved_heads(leaves.heads(), order)
            return
        for run in leaves.runs(self.arena.npages):
            if order == 0 and run.dense:
                view = self.map[run.first:run.first + run.slots]
                bits = _run_bits(run)
                busy = _mismatch(view, run, bits, FREE_PAGE)
                if busy is not None:
                    self._refuse_busy(run.first + busy, 0)
                _turn(view, bits, FREE_PAGE, head)
                self.boot.cover_bits(run.first, run.packed)
                continue
            rows = run.positions()
            blocks = self.map[run.first:run.first + (run.slots << order)].reshape(run.slots, 1 << order)
            busy = blocks[rows] != FREE_PAGE
            bad = np.flatnonzero(busy.any(axis=1))
            if len(bad):
                first = run.first + (int(rows[bad[0]]) << order)
                self._refuse_busy(first + int(np.argmax(busy[bad[0]])), order)
            blocks[rows] = TAIL
            blocks[rows, 0] = head
            self.boot.cover(run.first + (rows << order), order)
        self._count(leaves, sign=+1)

    def _set_preserved_heads(self, heads: np.ndarray, order: int) -> None:
        """set_preserved for a few blocks: page by page."""
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
        wrong = self.map[pfns] != encode(PageState.PRESERVED, order)
        if wrong.any():
            self._refuse_unpreserved(int(pfns[np.argmax(wrong)]), order)
        self.map[pfns] = encode(PageState.ALLOCATED, order)
        self._count(pfns, order, sign=-1)

    def claim_leaves(self, leaves: Leaves) -> None:
        """PRESERVED -> ALLOCATED for every block of ``leaves`` (a pool restored whole):
        only head bytes change, a run of leaves at a time. HandoverError unless each is
        exactly the head of a preserved block of that order; nothing changes then."""
        order = leaves.order
        if leaves.sparse:
            self.claim_preserved(leaves.heads(), order)
            return
        before, after = encode(PageState.PRESERVED, order), encode(PageState.ALLOCATED, order)
        runs = [(run, self.map[run.first:run.first + (run.slots << order):1 << order],
                 _run_bits(run)) for run in leaves.runs(self.arena.npages)]
        for run, heads, bits in runs:            # check all, then write all
            wrong = _mismatch(heads, run, bits, before)
            if wrong is not None:
                self._refuse_unpreserved(run.first + (wrong << order), order)
        for _, heads, bits in runs:
            _turn(heads, bits, before, after)
        self._count(leaves, sign=-1)

    def _refuse_unpreserved(self, pfn: int, order: int) -> None:
        raise HandoverError(
            f"PFN {pfn} was not preserved as a folio of order {order}; it is {self.describe(pfn)}."
        )

    def preserved_heads(self) -> Iterator[tuple[np.ndarray, int]]:
        """``(pfns, order)`` for the blocks still PRESERVED, ascending PFNs per order."""
        heads = np.flatnonzero((self.map & STATE_MASK) == PageState.PRESERVED << STATE_SHIFT)
        orders = self.map[heads] & ORDER_MASK
        for order in np.unique(orders):
            yield heads[orders == order], int(order)

    # -- reading ----------------------------------------------------------------------------

    def head(self, pfn: int) -> tuple[PageState, int]:
        """``(state, order)`` of page ``pfn``'s own byte."""
        byte = int(self.map[pfn])
        return PageState((byte & STATE_MASK) >> STATE_SHIFT), byte & ORDER_MASK

    def is_scratch(self, pfn: int) -> bool:
        """Whether ``pfn`` lies in a scratch area."""
        return bool(self.map[pfn] & SCRATCH_FLAG)

    def describe(self, pfn: int) -> str:
        """A phrase for error messages: what page ``pfn`` is."""
        state, order = self.head(pfn)
        where = " in scratch" if self.is_scratch(pfn) else ""
        if state is PageState.RESERVED:
            return f"reserved boot memory{where}"
        if state is PageState.TAIL:
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

    def _count_preserved(self) -> np.ndarray:
        counts = np.zeros(self.arena.nodes, dtype=np.int64)
        for pfns, order in self.preserved_heads():
            nodes = np.searchsorted(self._node_starts, pfns, side="right")
            counts += np.bincount(nodes, minlength=self.arena.nodes) << order
        return counts
