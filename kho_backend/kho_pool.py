"""Preserved pools: memory that is preserved from the moment it is allocated.

"Persistence asked at allocation", as the persistent memory pools proposed in 2023 and
PMDK's pools have it: ``kho.create_pool(name)`` gives a :class:`PreservedPool` whose
blocks are unmovable buddy blocks, each recorded in the pool's own radix tree
(``kho_radix``) as it is allocated. The KHO root lists every pool, so a kexec writes
nothing for them, and a kernel killed at any instant leaves each pool holding exactly
the blocks it had allocated and not freed: the next boot, by kexec or after a crash,
takes a pool back whole with ``kho_in.restore_pool(name)``, tree and all.

A block becomes the pool's with one byte store, after ``intent`` has run, so that a
caller's journal can name a block before the pool owns it; its recovery then calls
``release_if_owned`` for each journalled block it does not keep. A free lets go first
(one store) and gives the block back after. Bulk calls are vectorised per leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .arena import Arena
from .errors import KhoError
from .kho_radix import RadixTree
from .memmap import has_duplicates
from .page_alloc import PageAllocator
from .units import MAX_ORDER

#: A KHO check that blocks may become preserved (aligned, allocated, not in scratch,
#: not preserved already anywhere); KhoError naming the first that may not.
AdoptCheck = Callable[[np.ndarray, int], None]


class PreservedPool:
    """A named pool of preserved memory (see the module docstring). Made by
    ``KHO.create_pool`` and ``IncomingHandover.restore_pool``, not directly."""

    def __init__(self, name: str, arena: Arena, buddy: PageAllocator, tree: RadixTree,
                 check_adoptable: AdoptCheck) -> None:
        self.name = name
        self.arena = arena
        #: The pool's own preserved-memory map: exactly its blocks.
        self.tree = tree
        self._buddy = buddy
        self._check_adoptable = check_adoptable

    def alloc(self, order: int = 0, *, intent: Callable[[int], None] | None = None) -> int:
        """A new block of ``2**order`` pages from the buddy allocator (unmovable, so
        never scratch; OutOfMemory if none), handed to ``intent(pfn)`` if given (so that
        a caller's journal records it before it becomes the pool's), then recorded in
        the pool's tree. Contents undefined. Returns the head pfn; if ``intent`` or the
        tree fails, the block goes back and nothing is recorded."""
        pfn = self._buddy.alloc(order)
        try:
            if intent is not None:
                intent(pfn)
            self.tree.set(pfn, order)
        except BaseException:
            self._buddy.free(pfn, order)
            raise
        return pfn

    def free(self, pfn: int, order: int = 0) -> None:
        """Give back a block of the pool: it leaves the tree, then goes to the buddy
        allocator. KhoError if it is not the pool's block of that order."""
        if not self.owns(pfn, order):
            raise KhoError(f"Pool {self.name!r} has no order-{order} block at pfn {pfn}, "
                           "so it cannot free one there.")
        self.tree.clear(pfn, order)
        self._buddy.free(pfn, order)

    def release_if_owned(self, pfn: int, order: int) -> bool:
        """Free the block if it is the pool's (True), else do nothing (False): the
        idempotent free a crash recovery calls for every block its journal names."""
        if not self.owns(pfn, order):
            return False
        self.free(pfn, order)
        return True

    def owns(self, pfn: int, order: int) -> bool:
        """Is the block of ``order`` at ``pfn`` the pool's (recorded at that order)?"""
        return (0 <= order <= MAX_ORDER and 0 <= pfn < self.arena.npages
                and not pfn & ((1 << order) - 1) and self.tree.contains(pfn, order))

    def adopt(self, pfns: np.ndarray, order: int) -> None:
        """Make blocks this kernel already holds (e.g. restored from an older handover)
        the pool's, all or none. KhoError if one is misaligned, outside the arena, in
        scratch, not allocated, listed twice or preserved already (by KHO or a pool)."""
        pfns = np.asarray(pfns, np.int64).ravel()
        self._check_adoptable(pfns, order)
        self.tree.set_many(pfns, order)

    def free_bulk(self, pfns: np.ndarray, order: int) -> None:
        """Free many blocks of one order at once (vectorised), all or none: KhoError
        unless every one is the pool's block of that order, listed once."""
        pfns = np.asarray(pfns, np.int64).ravel()
        if not 0 <= order <= MAX_ORDER:
            raise KhoError(f"Order {order} is not a block order (0 to {MAX_ORDER}).")
        inside = (pfns >= 0) & (pfns < self.arena.npages) & (pfns & ((1 << order) - 1) == 0)
        owned = inside.copy()
        owned[inside] = self.tree.is_set(pfns[inside], order)
        if not owned.all():
            raise KhoError(f"Pool {self.name!r} has no order-{order} block at pfn "
                           f"{int(pfns[np.argmin(owned)])}, so it cannot free one there.")
        if has_duplicates(pfns):
            raise KhoError(f"The order-{order} blocks to free from pool {self.name!r} list "
                           "some pfn twice.")
        self.tree.clear_many(pfns, order)
        self._buddy.free_pfns(pfns, order)

    @property
    def nr_pages(self) -> int:
        """Pages the pool holds (per-order counters, recounted by popcount on restore)."""
        return self.tree.nr_pages()

    def free_pages(self) -> int:
        """Pages the buddy allocator could still give an unmovable allocation."""
        return self._buddy.free_pages()

    def blocks(self) -> Iterator[tuple[np.ndarray, int]]:
        """(heads, order) of every block, heads ascending, per order (for an fsck)."""
        return self.tree.blocks()

    def release_all(self) -> None:
        """Give every block and the tree's pages back (the pool has left the KHO root)."""
        self._buddy.free_blocks([*self.tree.blocks(), (self.tree.node_pfns(), 0)])
