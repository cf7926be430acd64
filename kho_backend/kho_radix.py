"""The preserved-memory map of stateless KHO: a radix tree of page-sized nodes, kept
current in the arena as blocks are preserved and unpreserved (Linux 7.1's KHO radix tree).

The key of a block of ``2**order`` pages at physical address ``pa`` is the kernel's::

    key = (1 << (64 - PAGE_SHIFT - order)) | (pa >> (PAGE_SHIFT + order))

so the position of its highest bit gives the order (bit 52 for order 0, bit 42 for
order 10) and all orders share one key space. Six levels: five of inner nodes, each a
page of 512 u64 physical addresses (0: no child) indexed by 9 bits of the key (59:51 at
the root, then 50:42, 41:33, 32:24, 23:15), then leaves, each a page whose 32768 bits
are indexed by bits 14:0 (bit *i* in byte *i* / 8, bit *i* % 8). A leaf holds one order;
one leaf covers 128 MiB of order-0 pages. Layout: docs/handover-abi.md, "Preserved-memory
map".

Crash safety. The arena is shared memory: every store a process completes survives its
SIGKILL, so only program order matters. A new node is zeroed before its address is
stored in its parent (one aligned 8-byte store); preserving or unpreserving a block is
one byte store in its leaf; an emptied node is unlinked from its parent before its page
is freed. The tree in the arena is therefore whole at every instant.

:class:`RadixTree` is a live tree (KHO's global map, or a pool's). Its nodes are
unmovable pages from the buddy allocator (never scratch), found again by walking the
tree. Per order it keeps a small table of its leaves' addresses and bit counts, so that
one preserve costs a few microseconds and bulk calls are vectorised per leaf (no Python
loop per page). :func:`read_radix` walks a tree another kernel left, validating every
pointer and bit before anything is trusted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .arena import Arena, PhysMemory
from .errors import HandoverError, OutOfMemory
from .leaves import LEAF_BITS, LEAF_SHIFT, Leaves, leaf_slots
from .page_alloc import PageAllocator
from .units import MAX_ORDER, PAGE_SHIFT, PAGE_SIZE

#: The highest key bit of an order-0 block (the kernel's KHO_ORDER_0_LOG2).
ORDER0_BIT = 64 - PAGE_SHIFT
#: An inner node: 512 u64 physical addresses.
TABLE_SHIFT = 9
TABLE_ENTRIES = 1 << TABLE_SHIFT
#: The lowest key bit each inner level indexes, root first (the leaves index bits 14:0).
LEVEL_SHIFTS = (51, 42, 33, 24, 15)
DEPTH = len(LEVEL_SHIFTS) + 1
#: Keys of orders MAX_ORDER .. 0 lie in [KEY_LOW, KEY_END).
KEY_LOW = 1 << (ORDER0_BIT - MAX_ORDER)
KEY_END = 1 << (ORDER0_BIT + 1)
#: Parents gathered at once while reading a tree (4 MiB of tables), leaves (1 MiB).
_READ_CHUNK = 1024
_LEAF_CHUNK = 256


def block_key(pfn: int, order: int) -> int:
    """The radix key of the block of ``order`` at ``pfn`` (the kernel's encode)."""
    return (1 << (ORDER0_BIT - order)) | (pfn >> order)


def key_block(key: int) -> tuple[int, int]:
    """(pfn, order) of a key (the kernel's decode)."""
    top = key.bit_length() - 1
    order = ORDER0_BIT - top
    return (key ^ (1 << top)) << order, order


def leaf_heads(bitmaps: np.ndarray, index: np.ndarray, order: int) -> np.ndarray:
    """Head pfns of the blocks whose bits are set in ``bitmaps`` (one leaf page a row),
    leaf ``index[i]`` of ``order`` (its blocks start at ``index << (LEAF_SHIFT + order)``);
    ascending when ``index`` is."""
    rows, bits = np.nonzero(np.unpackbits(bitmaps, axis=1, bitorder="little"))
    return ((index[rows] << LEAF_SHIFT) | bits) << order


class RadixTree:
    """A live radix tree in the arena; build one with :meth:`create` or :meth:`adopt`.

    It records blocks and nothing more: whether a block may be preserved (allocated,
    not overlapping another, not in scratch) is the caller's check.
    """

    def __init__(self, arena: Arena, buddy: PageAllocator, root_pfn: int = 0,
                 nodes: set[int] | None = None) -> None:
        """A tree over ``arena`` whose root is ``root_pfn``; 0: none yet, made when the
        first block is recorded or :meth:`ensure_root` is called."""
        self.arena = arena
        self.buddy = buddy
        self.root_pfn = root_pfn
        self._nodes = set() if nodes is None else nodes
        self._bytes = arena.array()
        self._pages = self._bytes.reshape(-1, PAGE_SIZE)
        # Scalar loads and stores through a memoryview are the fastest Python has; the
        # 'Q' view stores a whole aligned u64 at once.
        self._mv = memoryview(self._bytes)
        self._mv64 = self._mv.cast("Q")
        #: Per order: the pfn of leaf i (0: none) and how many bits it has set. Leaf i
        #: holds the blocks from pfn i << (LEAF_SHIFT + order).
        self._leaf = [np.zeros(leaf_slots(arena.npages, o), np.int64)
                      for o in range(MAX_ORDER + 1)]
        self._count = [np.zeros_like(t) for t in self._leaf]
        self._blocks = [0] * (MAX_ORDER + 1)

    @classmethod
    def create(cls, arena: Arena, buddy: PageAllocator) -> RadixTree:
        """A new, empty tree: one zeroed root node. OutOfMemory if there is no page."""
        tree = cls(arena, buddy)
        tree.ensure_root()
        return tree

    def ensure_root(self) -> int:
        """The root node's pfn, allocated (zeroed) if the tree has none yet."""
        if not self.root_pfn:
            self.root_pfn = self.buddy.alloc(0, zero=True)
            self._nodes.add(self.root_pfn)
        return self.root_pfn

    @classmethod
    def adopt(cls, arena: Arena, buddy: PageAllocator, found: RadixMap) -> RadixTree:
        """Go on with a tree another kernel left (validated by :func:`read_radix`; its
        node pages already belong to the caller): same pages, counts recomputed."""
        tree = cls(arena, buddy, found.root_pfn, set(found.nodes.tolist()))
        for order, leaves in found.leaves.items():
            tree._leaf[order][leaves.index] = leaves.pfns
            tree._count[order][leaves.index] = np.bitwise_count(leaves.bitmaps).sum(axis=1, dtype=np.int64)
            tree._blocks[order] = int(tree._count[order].sum())
        return tree

    # -- reading ---------------------------------------------------------------------

    @property
    def root_phys(self) -> int:
        return self.root_pfn << PAGE_SHIFT

    def nr_pages(self) -> int:
        """Pages in the recorded blocks, all orders together."""
        return sum(n << order for order, n in enumerate(self._blocks))

    def nr_blocks(self, order: int) -> int:
        return self._blocks[order]

    @property
    def nr_nodes(self) -> int:
        """Node pages (root, inner nodes and leaves)."""
        return len(self._nodes)

    @property
    def nr_leaves(self) -> int:
        return sum(int(np.count_nonzero(t)) for t in self._leaf)

    def node_pfns(self) -> np.ndarray:
        """Every node page, ascending."""
        return np.array(sorted(self._nodes), np.int64)

    def contains(self, pfn: int, order: int) -> bool:
        """Is the block of ``order`` at ``pfn`` recorded (at exactly that order)?"""
        leaf = int(self._leaf[order][pfn >> (order + LEAF_SHIFT)])
        bit = (pfn >> order) & (LEAF_BITS - 1)
        return bool(leaf) and bool(self._mv[(leaf << PAGE_SHIFT) + (bit >> 3)] >> (bit & 7) & 1)

    def is_set(self, pfns: np.ndarray, order: int) -> np.ndarray:
        """Per pfn (inside the arena): is the block of ``order`` there recorded?"""
        leaf = self._leaf[order][pfns >> (order + LEAF_SHIFT)]
        bit = (pfns >> order) & (LEAF_BITS - 1)
        byte = self._bytes[(leaf << PAGE_SHIFT) + (bit >> 3)]
        return (leaf != 0) & ((byte >> (bit & 7)) & 1 != 0)

    def overlapping(self, pfns: np.ndarray, order: int) -> np.ndarray:
        """Per aligned pfn: does its block of ``order`` share a page with a recorded block
        of any order?"""
        hit = np.zeros(len(pfns), bool)
        for other in range(MAX_ORDER + 1):
            if not self._blocks[other]:
                continue
            if other >= order:
                # Natural alignment: the larger block holding pfn holds the whole block.
                hit |= self.is_set(pfns >> other << other, other)
            else:
                hit |= self._any_below(pfns, order, other)
        return hit

    def _any_below(self, pfns: np.ndarray, order: int, small: int) -> np.ndarray:
        """Per pfn: is any block of the smaller order ``small`` inside its block of
        ``order``? Those bits are consecutive and aligned, in one leaf."""
        span = 1 << (order - small)
        leaf = self._leaf[small][pfns >> (small + LEAF_SHIFT)]
        first = (pfns >> small) & (LEAF_BITS - 1)
        at = (leaf << PAGE_SHIFT) + (first >> 3)
        if span >= 8:
            found = self._bytes[at[:, None] + np.arange(span >> 3)].any(axis=1)
        else:
            found = (self._bytes[at] >> (first & 7)) & ((1 << span) - 1) != 0
        return (leaf != 0) & found

    def blocks(self) -> Iterator[tuple[np.ndarray, int]]:
        """(heads, order) for every order with blocks, heads ascending: unpacked per
        leaf, vectorised."""
        for order in range(MAX_ORDER + 1):
            if self._blocks[order]:
                index = np.flatnonzero(self._leaf[order])
                yield leaf_heads(self._pages[self._leaf[order][index]], index, order), order

    # -- one block ---------------------------------------------------------------------

    def set(self, pfn: int, order: int) -> None:
        """Record one block (ValueError if it is recorded already). A missing leaf is
        made first; OutOfMemory then leaves the tree as it was."""
        index = pfn >> (order + LEAF_SHIFT)
        leaf = int(self._leaf[order][index]) or self._add_leaf(order, index)
        bit = (pfn >> order) & (LEAF_BITS - 1)
        at, mask = (leaf << PAGE_SHIFT) + (bit >> 3), 1 << (bit & 7)
        byte = self._mv[at]
        if byte & mask:
            raise ValueError(f"The order-{order} block at pfn {pfn} is recorded already.")
        self._mv[at] = byte | mask            # the one store that records the block
        self._count[order][index] += 1
        self._blocks[order] += 1

    def clear(self, pfn: int, order: int) -> None:
        """Forget one block (ValueError if it is not recorded); a leaf left empty is
        unlinked and freed, and so is every inner node that is then empty."""
        index = pfn >> (order + LEAF_SHIFT)
        leaf = int(self._leaf[order][index])
        bit = (pfn >> order) & (LEAF_BITS - 1)
        at, mask = (leaf << PAGE_SHIFT) + (bit >> 3), 1 << (bit & 7)
        if not leaf or not self._mv[at] & mask:
            raise ValueError(f"The order-{order} block at pfn {pfn} is not recorded.")
        self._mv[at] &= ~mask                 # the one store that forgets it
        self._count[order][index] -= 1
        self._blocks[order] -= 1
        if not self._count[order][index]:
            self._leaf[order][index] = 0
            self._prune(block_key(pfn, order))

    # -- many blocks -------------------------------------------------------------------

    def set_many(self, pfns: np.ndarray, order: int) -> None:
        """Record many blocks of one order (ValueError, changing nothing, if one is
        recorded already): the missing leaves first, then each leaf's new bits in one
        pass over the leaves touched."""
        pfns = np.asarray(pfns, np.int64)
        if self.is_set(pfns, order).any():
            first = int(pfns[np.argmax(self.is_set(pfns, order))])
            raise ValueError(f"The order-{order} block at pfn {first} is recorded already.")
        touched, bitmaps = self._bitmaps(pfns, order)
        table = self._leaf[order]
        made = []
        try:
            for index in touched[table[touched] == 0].tolist():
                self._add_leaf(order, index)
                made.append(index)
        except OutOfMemory:
            for index in made:
                table[index] = 0
                self._prune(block_key(index << (order + LEAF_SHIFT), order))
            raise
        rows = table[touched]
        self._pages[rows] |= bitmaps
        self._account(order, touched, np.bitwise_count(bitmaps).sum(axis=1, dtype=np.int64))

    def clear_many(self, pfns: np.ndarray, order: int) -> None:
        """Forget many blocks of one order (ValueError, changing nothing, if one is not
        recorded), pruning the leaves and nodes left empty."""
        pfns = np.asarray(pfns, np.int64)
        missing = ~self.is_set(pfns, order)
        if missing.any():
            raise ValueError(f"The order-{order} block at pfn {int(pfns[np.argmax(missing)])} "
                             "is not recorded.")
        touched, bitmaps = self._bitmaps(pfns, order)
        rows = self._leaf[order][touched]
        self._pages[rows] &= ~bitmaps
        self._account(order, touched, -np.bitwise_count(bitmaps).sum(axis=1, dtype=np.int64))
        for index in touched[self._count[order][touched] == 0].tolist():
            self._leaf[order][index] = 0
            self._prune(block_key(index << (order + LEAF_SHIFT), order))

    def _bitmaps(self, pfns: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
        """The leaves ``pfns`` fall in (ascending indexes) and, one row each, the bitmap
        of those blocks in that leaf."""
        index = pfns >> (order + LEAF_SHIFT)
        present = np.zeros(len(self._leaf[order]), bool)
        present[index] = True
        touched = np.flatnonzero(present)
        rank = np.cumsum(present) - 1
        bits = np.zeros((len(touched), LEAF_BITS), bool)
        bits[rank[index], (pfns >> order) & (LEAF_BITS - 1)] = True
        return touched, np.packbits(bits, axis=1, bitorder="little")

    def _account(self, order: int, touched: np.ndarray, delta: np.ndarray) -> None:
        self._count[order][touched] += delta
        self._blocks[order] += int(delta.sum())

    # -- nodes -------------------------------------------------------------------------

    def _add_leaf(self, order: int, index: int) -> int:
        """Make the leaf ``index`` of ``order`` and the inner nodes above it; returns its
        pfn. Each node is zeroed before the one store that links it; on OutOfMemory the
        nodes made are unlinked and freed again."""
        key = block_key(index << (order + LEAF_SHIFT), order)
        node = self.ensure_root()
        try:
            for shift in LEVEL_SHIFTS:
                slot = (node << TABLE_SHIFT) + ((key >> shift) & (TABLE_ENTRIES - 1))
                child = self._mv64[slot] >> PAGE_SHIFT
                if not child:
                    child = self.buddy.alloc(0, zero=True)
                    self._nodes.add(child)
                    self._mv64[slot] = child << PAGE_SHIFT
                node = child
        except OutOfMemory:
            self._prune(key)
            raise
        self._leaf[order][index] = node
        return node

    def _prune(self, key: int) -> None:
        """Unlink and free the empty nodes on the path of ``key``, deepest first; each is
        unlinked (one store) before its page is freed."""
        path = []
        node = self.root_pfn
        for shift in LEVEL_SHIFTS:
            slot = (node << TABLE_SHIFT) + ((key >> shift) & (TABLE_ENTRIES - 1))
            node = self._mv64[slot] >> PAGE_SHIFT
            if not node:
                break
            path.append((slot, node))
        for slot, node in reversed(path):
            if self._pages[node].any():
                return
            self._mv64[slot] = 0
            self._nodes.discard(node)
            self.buddy.free(node, 0)


@dataclass(frozen=True)
class RadixMap:
    """A tree read from the arena and validated by :func:`read_radix`."""

    root_pfn: int
    #: Per order with blocks: its leaves (a copy of their bitmaps, and their pages).
    leaves: dict[int, Leaves]
    #: Every node page (root, inner nodes, leaves).
    nodes: np.ndarray

    def ranges(self) -> Iterator[tuple[np.ndarray, int]]:
        """(heads, order) per order with blocks, ascending orders (unpacked: for
        callers that want every head, not for boot)."""
        for order in sorted(self.leaves):
            yield self.leaves[order].heads(), order

    def nr_pages(self) -> int:
        return sum(leaves.pages() for leaves in self.leaves.values())

    @property
    def nr_leaves(self) -> int:
        return sum(len(leaves.index) for leaves in self.leaves.values())


def read_radix(mem: PhysMemory, root_phys: int, what: str) -> RadixMap:
    """Walk and validate the tree at ``root_phys`` (``what`` names it in errors); reads
    only. HandoverError names the node and slot of the first problem: a pointer not page
    aligned or outside the arena (0 means no child); a node where no key of order 0..MAX_ORDER
    can be; a node linked twice (a cycle or a shared node); a block past the end of the
    arena; more pages than the arena has. Overlaps between blocks, and with scratch, are
    the caller's check (it sees every map of the handover together).
    """
    npages = mem.npages
    pages = np.frombuffer(mem.view(0, npages), np.uint8).reshape(npages, PAGE_SIZE)
    root = _node_pfn(mem, root_phys, f"{what.capitalize()}: its root pointer")
    level, prefixes = np.array([root], np.int64), np.zeros(1, np.int64)
    nodes = level
    for depth, shift in enumerate(LEVEL_SHIFTS):
        level, prefixes = _children(pages, level, prefixes, shift, depth, npages, what)
        # Level by level, so that a node reached twice (a cycle, or two parents) is named
        # before its page is read as a node of the next level.
        nodes = np.sort(np.concatenate([nodes, level]))
        twice = np.flatnonzero(nodes[1:] == nodes[:-1])
        if len(twice):
            raise HandoverError(f"{what.capitalize()} links the node at "
                                f"{int(nodes[twice[0]]) << PAGE_SHIFT:#x} twice (a cycle or "
                                "a shared node).")
    return RadixMap(root, _read_leaves(pages, level, prefixes, npages, what), nodes)


def _node_pfn(mem: PhysMemory, phys: int, where: str) -> int:
    if phys % PAGE_SIZE or not 0 < phys >> PAGE_SHIFT < mem.npages:
        raise HandoverError(f"{where} is {phys:#x}, which is not the address of a page of "
                            f"the arena (1 to {mem.npages - 1}, page aligned).")
    return phys >> PAGE_SHIFT


def _children(pages: np.ndarray, parents: np.ndarray, prefixes: np.ndarray, shift: int,
              depth: int, npages: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The children of one level's nodes (ascending key prefixes), validated."""
    found, found_prefixes, total = [], [], 0
    for start in range(0, len(parents), _READ_CHUNK):
        tables = pages[parents[start:start + _READ_CHUNK]].view(np.uint64)
        rows, slots = np.nonzero(tables)
        phys = tables[rows, slots].astype(np.int64)
        rows += start
        child_prefix = (prefixes[rows] << TABLE_SHIFT) | slots
        where = _where(parents, rows, slots, depth, what)
        # A child covers keys [prefix << shift, (prefix + 1) << shift).
        _refuse(((child_prefix + 1) << shift <= KEY_LOW) | (child_prefix << shift >= KEY_END),
                where, phys, f"where no key of order 0 to {MAX_ORDER} can be")
        _refuse(phys < 0, where, phys, "outside the arena")   # a u64 past 2**63
        _refuse(phys % PAGE_SIZE != 0, where, phys, "not page aligned")
        _refuse(phys >> PAGE_SHIFT >= npages, where, phys, "outside the arena")
        total += len(phys)
        if total > npages:
            raise HandoverError(f"{what.capitalize()} has more nodes than the arena has "
                                "pages.")
        found.append(phys >> PAGE_SHIFT)
        found_prefixes.append(child_prefix)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found), np.concatenate(found_prefixes)


def _where(parents: np.ndarray, rows: np.ndarray, slots: np.ndarray, depth: int,
           what: str):
    def describe(i: int) -> str:
        return (f"{what.capitalize()}: slot {int(slots[i])} of the level-{DEPTH - 1 - depth} "
                f"node at {int(parents[rows[i]]) << PAGE_SHIFT:#x}")
    return describe


def _refuse(bad: np.ndarray, where, phys: np.ndarray, why: str) -> None:
    hit = np.flatnonzero(bad)
    if len(hit):
        i = int(hit[0])
        raise HandoverError(f"{where(i)} points at {int(phys[i]) & (2**64 - 1):#x}, {why}.")


def _read_leaves(pages: np.ndarray, leaves: np.ndarray, prefixes: np.ndarray, npages: int,
                 what: str) -> dict[int, Leaves]:
    """The leaves per order with blocks; every block must end inside the arena. The
    bitmaps are copied and checked as they are, never unpacked."""
    # A leaf's prefix (key >> 15) lies in [2**27, 2**38); its highest bit gives the order.
    top = np.searchsorted(1 << np.arange(KEY_LOW.bit_length() - 1 - LEAF_SHIFT,
                                         KEY_END.bit_length() - 1 - LEAF_SHIFT),
                          prefixes, side="right") - 1
    orders = MAX_ORDER - top
    found: dict[int, Leaves] = {}
    pages_seen = 0
    for order in range(MAX_ORDER + 1):
        mine = np.flatnonzero(orders == order)
        if not len(mine):
            continue
        index = prefixes[mine] ^ (1 << (ORDER0_BIT - order - LEAF_SHIFT))
        pfns = leaves[mine]
        beyond = np.flatnonzero(index >= leaf_slots(npages, order))
        if len(beyond):
            raise HandoverError(f"{what.capitalize()} has an order-{order} leaf at "
                                f"{int(pfns[beyond[0]]) << PAGE_SHIFT:#x} for blocks past the "
                                f"end of the arena ({npages} pages).")
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(mine), _LEAF_CHUNK):   # memory bounded by what counts
            bitmaps = pages[pfns[start:start + _LEAF_CHUNK]]
            counts = np.bitwise_count(bitmaps.view(np.uint64)).sum(axis=1, dtype=np.int64)
            pages_seen += int(counts.sum()) << order
            if pages_seen > npages:
                raise HandoverError(f"{what.capitalize()} records more pages than the "
                                    "arena has: its blocks must overlap.")
            keep = np.flatnonzero(counts)     # a crash may leave a leaf linked but empty
            kept.append((start + keep, bitmaps[keep]))
        rows = np.concatenate([k for k, _ in kept])
        if len(rows):
            bitmaps = np.concatenate([b for _, b in kept])
            _refuse_past_end(bitmaps, index[rows], order, npages, what)
            found[order] = Leaves(order, index[rows], bitmaps, pfns[rows])
    return found


def _refuse_past_end(bitmaps: np.ndarray, index: np.ndarray, order: int, npages: int,
                     what: str) -> None:
    """HandoverError if a block ends past the arena: only the last leaf can hold one."""
    last = np.flatnonzero(index == leaf_slots(npages, order) - 1)
    if not len(last):
        return
    fits = (npages >> order) - (int(index[last[0]]) << LEAF_SHIFT)   # whole blocks inside
    past = np.flatnonzero(np.unpackbits(bitmaps[last[0]], bitorder="little")[fits:])
    if len(past):
        pfn = ((int(index[last[0]]) << LEAF_SHIFT) + fits + int(past[0])) << order
        raise HandoverError(f"{what.capitalize()} records an order-{order} block at pfn "
                            f"{pfn}, which ends past the arena ({npages} pages).")
