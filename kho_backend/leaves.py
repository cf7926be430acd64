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

    @classmethod
    def from_heads(cls, heads: np.ndarray, order: int) -> Leaves:
        """The leaves holding the blocks of ``order`` at ``heads`` (aligned, not
        negative; a pfn listed twice is one block)."""
        heads = np.asarray(heads, np.int64).ravel()
        bad = (heads < 0) | (heads & ((1 << order) - 1) != 0)
        if bad.any():
            raise ValueError(f"PFN {int(heads[np.argmax(bad)])} cannot head a block of order "
                             f"{order}: it is negative or not aligned to it.")
        leaf = heads >> (order + LEAF_SHIFT)
        index, row = np.unique(leaf, return_inverse=True)
        bits = np.zeros((len(index), LEAF_BITS), bool)
        bits[row, (heads >> order) & (LEAF_BITS - 1)] = True
        return cls(order, index, np.packbits(bits, axis=1, bitorder="little"))

    def count(self) -> int:
        """Blocks held."""
        return int(np.bitwise_count(self.bitmaps).sum())

    def pages(self) -> int:
        return self.count() << self.order

    def heads(self) -> np.ndarray:
        """Head pfns of every block, ascending (unpacked once, then kept)."""
        if self._heads is None:
            heads = [((self.index[row] << LEAF_SHIFT) | set_bits(self.bitmaps[row])) << self.order
                     for row in range(len(self.index))]
            self._heads = np.concatenate(heads) if heads else np.zeros(0, np.int64)
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
