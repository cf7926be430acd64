"""A stand-in for kho_backend's PreservedPool, over a kernel's buddy allocator: the same
calls, with the pool's blocks kept in a Python dict instead of a preserved radix tree.
For unit tests of the metadata store that need no handover."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from kho_backend.page_alloc import PageAllocator


class FakePool:
    """`PreservedPool`'s calls, without preservation."""

    def __init__(self, buddy: PageAllocator) -> None:
        self.buddy = buddy
        self.owned: dict[int, int] = {}

    def alloc(self, order: int = 0, *, intent: Callable[[int], None] | None = None) -> int:
        pfn = self.buddy.alloc(order)
        if intent is not None:
            intent(pfn)
        self.owned[pfn] = order
        return pfn

    def free(self, pfn: int, order: int = 0) -> None:
        if self.owned.get(pfn) != order:
            raise ValueError(f"pfn {pfn} is not the pool's at order {order}")
        del self.owned[pfn]
        self.buddy.free(pfn, order)

    def release_if_owned(self, pfn: int, order: int) -> bool:
        if self.owned.get(pfn) != order:
            return False
        self.free(pfn, order)
        return True

    def owns(self, pfn: int, order: int) -> bool:
        return self.owned.get(pfn) == order

    @property
    def nr_pages(self) -> int:
        return sum(1 << order for order in self.owned.values())

    def free_pages(self) -> int:
        return self.buddy.free_pages()

    def blocks(self) -> Iterator[tuple[np.ndarray, int]]:
        for order in sorted(set(self.owned.values())):
            yield (np.array(sorted(p for p, o in self.owned.items() if o == order),
                            dtype=np.int64), order)
