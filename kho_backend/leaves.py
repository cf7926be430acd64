"""Blocks of one order kept as radix-tree leaves: bitmaps, one bit per block.

A handed-over map reaches the next kernel as leaves (``kho_radix``): each a page of
32768 bits, leaf *i* of order *k* holding the blocks from pfn ``i << (15 + k)``. Boot and
restore work on those bitmaps as they are, a whole run of consecutive leaves at a time,
as the kernel's stateless KHO reserves per leaf: checking and marking a million
order-0 pages is a few vector passes over one byte per page, and the head pfns are only
unpacked for the few callers that want them. :class:`Leaves` is that form.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .units import PAGE_SHIFT

#: A leaf is a page of bits: 32768 blocks.
LEAF_SHIFT = PAGE_SHIFT + 3
LEAF_BITS = 1 << LEAF_SHIFT
#: Leaves taken in one run: the temporaries of a pass over a run (a byte per block)
#: stay small enough to be reused from the heap, not mapped and faulted in anew.
RUN_LEAVES = 4


def leaf_slots(npages: int, order: int) -> int:
    """Leaves of ``order`` an arena of ``npages`` pages can need."""
    return (npages >> (order + LEAF_SHIFT)) + 1


def set_bits(packed: np.ndarray) -> np.ndarray:
    """Positions of the set bits of a packed bitmap (bit *i* in byte *i* / 8, bit
    *i* % 8), ascending: only the non-zero bytes are unpacked."""
    nonzero = np.flatnonzero(packed)
    rows, bits = np.nonzero(np.unpackbits(packed[nonzero, None], axis=1, bitorder="little"))
    return (nonzero[rows] << 3) | bits


@dataclass(frozen=True)
class Run:
    """Consecutive leaves of one order: ``slots`` blocks from pfn ``first``, one bit each
    in ``packed`` (clipped to the arena)."""

    order: int
    first: int
    slots: int
    packed: np.ndarray
    count: int

    @property
    def dense(self) -> bool:
        """Cheaper as whole-run vector passes than block by block?"""
        return self.count * 16 >= self.slots

    def bits(self) -> np.ndarray:
        """One uint8 (0 or 1) per slot."""
        return np.unpackbits(self.packed, bitorder="little", count=self.slots)

    def positions(self) -> np.ndarray:
        """Slots whose bit is set, ascending."""
        return set_bits(self.packed)

    def heads(self) -> np.ndarray:
        """Head pfns of the run's blocks, ascending."""
        return self.first + (self.positions() << self.order)


@dataclass
class Leaves:
    """Blocks of ``order``: leaves ``index`` (ascending) with one bitmap row each; for a
    tree read from the arena, ``pfns`` are the leaf pages."""

    order: int
    index: np.ndarray
    bitmaps: np.ndarray
    pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _heads: np.ndarray | None = field(default=None, repr=False)
    _count: int | None = field(default=None, repr=False)

    @classmethod
    def from_heads(cls, heads: np.ndarray, order: int) -> Leaves:
        """The leaves holding the blocks of ``order`` at ``heads`` (aligned, not
        negative; a pfn listed twice is one block)."""
        heads = np.asarray(heads, np.int64).ravel()
        bad = (heads < 0) | (heads & ((1 << order) - 1) != 0)
        if bad.any():
            raise ValueError(f"PFN {int(heads[np.argmax(bad)])} cannot head a block of order "
                             f"{order}: it is negative or not aligned to it.")
        slots = np.unique(heads >> order)                    # block numbers, ascending
        index, row = np.unique(slots >> LEAF_SHIFT, return_inverse=True)
        at = (row << (LEAF_SHIFT - 3)) | ((slots & (LEAF_BITS - 1)) >> 3)   # byte of each bit
        first = np.flatnonzero(np.diff(at, prepend=-1))      # the bits of a byte are adjacent
        bitmaps = np.zeros((len(index), LEAF_BITS >> 3), np.uint8)
        bitmaps.reshape(-1)[at[first]] = np.bitwise_or.reduceat(
            np.left_shift(1, slots & 7).astype(np.uint8), first) if len(first) else 0
        return cls(order, index, bitmaps, _heads=slots << order, _count=len(slots))

    @property
    def sparse(self) -> bool:
        """So few blocks for their leaves that block by block is cheaper than passes
        over whole leaves."""
        return self.count() * 64 < len(self.index) << LEAF_SHIFT

    def count(self) -> int:
        """Blocks held (counted once, then kept: the bitmaps are not changed)."""
        if self._count is None:
            self._count = int(np.bitwise_count(self.bitmaps.view(np.uint64)).sum())
        return self._count

    def pages(self) -> int:
        return self.count() << self.order

    def heads(self) -> np.ndarray:
        """Head pfns of every block, ascending (unpacked once, then kept)."""
        if self._heads is None:
            # Only the non-zero bytes unpacked; flat positions, as 2-D np.nonzero is slow.
            flat = np.flatnonzero(self.bitmaps)
            rows, cols = flat // self.bitmaps.shape[1], flat % self.bitmaps.shape[1]
            set_ = np.flatnonzero(np.unpackbits(self.bitmaps.reshape(-1)[flat][:, None], axis=1,
                                                bitorder="little"))
            which, bits = set_ >> 3, set_ & 7
            slots = (self.index[rows[which]] << LEAF_SHIFT) | (cols[which] << 3) | bits
            self._heads = slots.astype(np.int64) << self.order
        return self._heads

    def contains(self, pfns: np.ndarray) -> np.ndarray:
        """Per pfn (aligned to the order, not negative): is its block held?"""
        pfns = np.asarray(pfns, np.int64)
        if not len(self.index):
            return np.zeros(pfns.shape, bool)
        leaf = pfns >> (self.order + LEAF_SHIFT)
        row = np.minimum(np.searchsorted(self.index, leaf), len(self.index) - 1)
        bit = (pfns >> self.order) & (LEAF_BITS - 1)
        byte = self.bitmaps[row, bit >> 3]
        return (self.index[row] == leaf) & ((byte >> (bit & 7)) & 1 != 0)

    def without(self, other: np.ndarray) -> Leaves:
        """These leaves less the bits set in ``other`` (same shape as ``bitmaps``)."""
        return Leaves(self.order, self.index, self.bitmaps & ~other, self.pfns)

    def runs(self, npages: int) -> Iterator[Run]:
        """The blocks as runs of up to RUN_LEAVES consecutive leaves, clipped to an arena
        of ``npages`` pages (whose blocks all end inside it)."""
        if not len(self.index):
            return
        cuts = np.flatnonzero((np.diff(self.index) != 1)
                              | (np.arange(1, len(self.index)) % RUN_LEAVES == 0)) + 1
        counts = np.bitwise_count(self.bitmaps).sum(axis=1, dtype=np.int64)
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(self.index)]):
            count = int(counts[lo:hi].sum())
            if not count:
                continue
            first = int(self.index[lo]) << (LEAF_SHIFT + self.order)
            slots = min((hi - lo) << LEAF_SHIFT, (npages - first) >> self.order)
            packed = self.bitmaps[lo:hi].reshape(-1)[: -(-slots // 8)]
            yield Run(self.order, first, slots, packed, count)
