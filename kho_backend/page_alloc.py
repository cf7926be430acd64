"""The buddy page allocator.

Blocks of 2**order pages, order 0 (4 KiB) to ``MAX_ORDER`` (4 MiB), naturally aligned.
Free lists are kept per node, per kind and per order; the kinds are *normal* memory and
*scratch* (the kernel's CMA): unmovable allocations never get scratch, movable ones take
scratch first. The memmap is the truth (a block's state and order sit in its head's byte);
the free lists are an index over it that can always be rebuilt: per list, a stack of head
PFNs in an ``array.array`` of int64, and per page, the position of a listed head in its
stack (an int32, meaningful only there), so that a block leaves its list in constant time
(the last one takes its place). The lists hold no Python object per block: a million
blocks are listed with a few numpy calls, are never scanned by the garbage collector, and
are dropped (the old kernel's, at a kexec's switch) by freeing a few buffers.

The free lists are built from the memmap per chunk of 4 MiB (the largest block, which no
block crosses). At start-up, boot's marks say which chunks it never touched (each one
free block) and which it filled (none): neither is read. Any other chunk is read as u64
words (no free head: skipped; all free: one block) and else cut into maximal aligned
blocks page by page. A bulk free rebuilds only the (listed) chunks it touched, so
releasing a few pages costs a few chunks, whatever the arena's size.

Deferred listing (the kernel's deferred struct-page init, extended to the free lists):
a chunk boot marked in part (handed-over blocks, reserved pages; not scratch) is not cut
at start-up but left *unlisted*, its free pages counted from boot's marks
(``CHUNK - covered``) without reading a byte, so a fragmented arena (a million single
free pages) starts as fast as a whole one. An unlisted chunk is listed (its memmap
settled, cut into blocks, added to the free lists) when an allocation finds no listed
block of its node big enough, or by :meth:`PageAllocator.list_some`, which the daemon
calls between requests until none is left. A block freed into an unlisted chunk is
marked free in the memmap and counted, not merged: the listing merges it with its
buddies. Free-page counts are exact throughout; ``free_blocks`` counts listed blocks.

Accounting per node is exact: ``total = free + used + preserved + reserved``. Preserved
pages (handed over, not yet restored) are counted by the memmap; freeing one releases it.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .arena import Arena
from .errors import MachineError, OutOfMemory
from .memmap import (
    CHUNK,
    ORDER_MASK,
    SCRATCH_FLAG,
    STATE_MASK,
    STATE_SHIFT,
    BootMarks,
    Memmap,
    PageState,
    block_pages,
    has_duplicates,
)
from .units import MAX_ORDER, PAGE_SHIFT, format_size

NORMAL, SCRATCH = 0, 1
#: 0x0101010101010101: a byte value times this is that byte in every byte of a u64.
_WORD = 0x0101010101010101
#: Chunks scanned at once (256 KiB of memmap).
_SCAN = 256
#: Unlisted chunks listed by one call of ``list_some`` (about 1 ms of CPU when each
#: holds 512 single free pages), and first listed by an allocation that finds no block
#: (twice as many each time it still finds none).
_SLICE = 16
_ON_DEMAND = 4
#: Blocks pushed on or taken off a free list one by one, not with numpy calls.
_FEW = 32
KINDS = (NORMAL, SCRATCH)
_FREE = PageState.FREE << STATE_SHIFT
_ALLOCATED = PageState.ALLOCATED << STATE_SHIFT
_TAIL = PageState.TAIL << STATE_SHIFT


@dataclass(frozen=True)
class NodeStats:
    """Page counts of one node; ``free_blocks[order]`` counts free blocks of both kinds."""

    node: int
    total_pages: int
    free_pages: int
    free_scratch_pages: int
    used_pages: int
    preserved_pages: int
    reserved_pages: int
    scratch_pages: int
    free_blocks: tuple[int, ...]
    free_scratch_blocks: tuple[int, ...]
    #: Free pages (counted in ``free_pages``) in chunks not listed yet: in no free block
    #: of ``free_blocks`` until their chunk is listed.
    unlisted_pages: int = 0


@dataclass(frozen=True)
class AllocatorStats:
    """A snapshot of the allocator: per node, and totals as properties."""

    nodes: tuple[NodeStats, ...]

    def _sum(self, name: str) -> int:
        return sum(getattr(n, name) for n in self.nodes)

    @property
    def total_pages(self) -> int:
        return self._sum("total_pages")

    @property
    def free_pages(self) -> int:
        return self._sum("free_pages")

    @property
    def free_scratch_pages(self) -> int:
        return self._sum("free_scratch_pages")

    @property
    def used_pages(self) -> int:
        return self._sum("used_pages")

    @property
    def preserved_pages(self) -> int:
        return self._sum("preserved_pages")

    @property
    def reserved_pages(self) -> int:
        return self._sum("reserved_pages")

    @property
    def scratch_pages(self) -> int:
        """Pages in scratch areas (free, movable-used, or boot memory placed there)."""
        return self._sum("scratch_pages")

    @property
    def unlisted_pages(self) -> int:
        """Free pages in chunks whose free blocks are not listed yet."""
        return self._sum("unlisted_pages")

    def free_blocks(self, order: int) -> int:
        """Free blocks of ``order`` (listed) over all nodes and kinds."""
        return sum(n.free_blocks[order] for n in self.nodes)


class PageAllocator:
    """Buddy allocator over ``arena``, with its page state in ``memmap``."""

    def __init__(self, arena: Arena, memmap: Memmap) -> None:
        """Start from the memmap as boot left it: FREE pages (any order) become free
        blocks; RESERVED, ALLOCATED and PRESERVED blocks stay as they are."""
        self.arena = arena
        self.memmap = memmap
        self._map = memmap.map
        self._bytes = arena.array()
        self._starts = [lo for lo, _ in arena.node_ranges()] + [arena.npages]
        nodes = arena.nodes
        self._free = [[[array("q") for _ in range(MAX_ORDER + 1)] for _ in KINDS] for _ in range(nodes)]
        #: Per page: the position of a listed free block's head in its stack (else
        #: undefined: never written before it is needed, nor read).
        self._at = np.empty(arena.npages, np.int32)
        self._where = memoryview(self._at)
        #: Free pages per node and kind, listed or not.
        self._nfree = [[0, 0] for _ in range(nodes)]
        #: Per chunk: its free pages when it is unlisted (none of its free blocks on the
        #: free lists, see the module docstring), else 0. Unlisted chunks hold no scratch.
        self._hidden = np.zeros(-(-arena.npages // CHUNK), np.int64)
        #: Whether some chunk is unlisted (a test cheaper than reading ``_hidden``).
        self._unlisted = False
        #: The first chunk of each node, and the end of the last.
        self._node_chunks = [lo >> MAX_ORDER for lo in self._starts[:-1]] + [len(self._hidden)]
        #: The memmap of the whole chunks, one row each, as bytes and as u64 words.
        self._nfull = arena.npages >> MAX_ORDER
        self._rows = self._map[: self._nfull << MAX_ORDER].reshape(self._nfull, CHUNK)
        self._words = self._rows.view(np.uint64)
        marks = memmap.boot
        if marks is None:
            raise MachineError("The page allocator starts from a memmap boot has reset and "
                               "marked, not from one attached as found.")
        self._reserved, self._scratch = marks.reserved.tolist(), marks.scratch.tolist()
        self._start(marks)

    # -- allocation -------------------------------------------------------------------------

    def alloc(self, order: int = 0, *, movable: bool = False, node: int | None = None, zero: bool = False) -> int:
        """Allocate a block of 2**order pages; return its head PFN.

        ``node`` is preferred, others are fallbacks. Unmovable blocks never come from
        scratch; movable ones come from scratch first. OutOfMemory if nothing fits.
        """
        _check_order(order)
        kinds = (SCRATCH, NORMAL) if movable else (NORMAL,)
        for nd in self._node_order(node):
            for kind in kinds:
                pfn = self._take(nd, kind, order)
                if pfn is not None:
                    if zero:
                        self._bytes[pfn << PAGE_SHIFT : (pfn + (1 << order)) << PAGE_SHIFT] = 0
                    return pfn
        raise OutOfMemory(self._oom_message(order, movable, node))

    def free(self, pfn: int, order: int) -> None:
        """Free the block of ``order`` at ``pfn`` (ALLOCATED, or PRESERVED and unclaimed),
        merging it with free buddies. MachineError if it is not such a block."""
        if self._check_block(pfn, order) is PageState.PRESERVED:
            self.memmap.claim_preserved(np.array([pfn]), order)
        flag = int(self._map[pfn]) & SCRATCH_FLAG
        node = bisect.bisect_right(self._starts, pfn) - 1
        kind = SCRATCH if flag else NORMAL
        self._nfree[node][kind] += 1 << order
        m = self._map
        if self._unlisted and self._hidden[pfn >> MAX_ORDER]:  # merged when it is listed
            self._hidden[pfn >> MAX_ORDER] += 1 << order
            m[pfn] = flag | _FREE | order
            return
        lists = self._free[node][kind]
        where = self._where
        # Node boundaries are multiples of the largest block, so a buddy is always on
        # the same node; the scratch flag in the expected byte keeps kinds apart.
        while order < MAX_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy >= self.arena.npages or m[buddy] != flag | _FREE | order:
                break
            stack = lists[order]        # the buddy leaves it: the last head takes its place
            last = stack.pop()
            if last != buddy:
                stack[where[buddy]] = last
                where[last] = where[buddy]
            m[max(pfn, buddy)] = flag | _TAIL
            pfn = min(pfn, buddy)
            order += 1
        m[pfn] = flag | _FREE | order
        where[pfn] = len(lists[order])
        lists[order].append(pfn)

    def free_pfns(self, pfns: np.ndarray, order: int) -> None:
        """Free many blocks of ``order`` at once (vectorised; e.g. unclaimed handed-over
        pages). Same checks as :meth:`free`; nothing is freed if one block is wrong."""
        self.free_blocks([(pfns, order)])

    def free_blocks(self, blocks: Iterable[tuple[np.ndarray, int]]) -> None:
        """Free many blocks, ``(pfns, order)`` per order, with one rebuild of the free
        lists; nothing is freed if one block is wrong."""
        checked = []
        for pfns, order in blocks:
            _check_order(order)
            pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
            if pfns.size:
                checked.append((pfns, order, self._check_blocks(pfns, order)))
        if not checked:
            return
        chunks = np.unique(np.concatenate([pfns >> MAX_ORDER for pfns, _, _ in checked]))
        listed = chunks[self._hidden[chunks] == 0]   # the others stay unlisted
        self._forget(listed)
        for pfns, order, preserved in checked:
            if preserved.size:
                self.memmap.claim_preserved(preserved, order)
            pages = block_pages(pfns, order)
            self._map[pages] = (self._map[pages] & SCRATCH_FLAG) | _FREE
            self._hide(pfns[self._hidden[pfns >> MAX_ORDER] > 0], order)
        self._rebuild(listed)

    def _check_blocks(self, pfns: np.ndarray, order: int) -> np.ndarray:
        """MachineError naming the first of ``pfns`` that is not an allocated or
        preserved block of ``order``, or a pfn listed twice; else the preserved ones."""
        bad = (pfns < 0) | (pfns >= self.arena.npages) | ((pfns & ((1 << order) - 1)) != 0)
        if bad.any():
            self._check_block(int(pfns[np.argmax(bad)]), order)  # raises, naming the block
        self.memmap.settle_pfns(pfns)
        heads = self._map[pfns]
        state = (heads & STATE_MASK) >> STATE_SHIFT
        ok = ((state == PageState.ALLOCATED) | (state == PageState.PRESERVED)) & ((heads & ORDER_MASK) == order)
        if not ok.all():
            self._check_block(int(pfns[np.argmin(ok)]), order)  # raises, naming the block
        if has_duplicates(pfns):
            raise MachineError(f"The blocks of order {order} to free list some PFN twice.")
        return pfns[state == PageState.PRESERVED]

    def free_pages(self, *, movable: bool = False) -> int:
        """Free pages an allocation of that kind could get (movable ones may use scratch)."""
        return sum(n[NORMAL] + (n[SCRATCH] if movable else 0) for n in self._nfree)

    @property
    def listed(self) -> bool:
        """Whether every chunk's free blocks are on the free lists (none unlisted)."""
        return not self._unlisted

    def list_some(self) -> bool:
        """List the next few unlisted chunks (a slice of the deferred listing, for a
        caller that interleaves it with other work, as the daemon does between
        requests); True once none is left."""
        chunks = np.flatnonzero(self._hidden)
        if chunks.size:
            self._list(chunks[:_SLICE])
        return chunks.size <= _SLICE

    def list_all(self) -> None:
        """List every chunk still unlisted (the rest of the deferred listing)."""
        while not self.list_some():
            pass

    def stats(self) -> AllocatorStats:
        """Per node and order: free (listed) blocks; per node: free, used, preserved,
        reserved pages, and the free pages not listed yet. Lists nothing."""
        preserved = self.memmap.preserved_per_node
        nodes = []
        for n, (lo, hi) in enumerate(zip(self._starts, self._starts[1:])):
            free = self._nfree[n][NORMAL] + self._nfree[n][SCRATCH]
            normal, scratch = self._free[n][NORMAL], self._free[n][SCRATCH]
            nodes.append(NodeStats(
                node=n, total_pages=hi - lo, free_pages=free,
                free_scratch_pages=self._nfree[n][SCRATCH],
                used_pages=hi - lo - free - int(preserved[n]) - self._reserved[n],
                preserved_pages=int(preserved[n]), reserved_pages=self._reserved[n],
                scratch_pages=self._scratch[n],
                free_blocks=tuple(len(a) + len(b) for a, b in zip(normal, scratch)),
                free_scratch_blocks=tuple(len(b) for b in scratch),
                unlisted_pages=self._unlisted_pages(n),
            ))  # fmt: skip
        return AllocatorStats(tuple(nodes))

    def check(self) -> None:
        """Verify the free lists and counters against the memmap; MachineError if they
        disagree (a debugging aid for tests; O(arena); lists nothing, settles the
        memmap)."""
        self.memmap.settle()
        m = self._map
        for n in range(self.arena.nodes):
            for kind in KINDS:
                flag = SCRATCH_FLAG if kind else 0
                pages = 0 if kind else self._unlisted_pages(n)
                for order, heads in enumerate(self._free[n][kind]):
                    arr = np.array(heads, dtype=np.int64)
                    if (m[arr] != flag | _FREE | order).any() or (arr & ((1 << order) - 1)).any() \
                            or self._hidden[arr >> MAX_ORDER].any() \
                            or (self._at[arr] != np.arange(len(arr))).any():
                        raise MachineError(f"The order-{order} free list of node {n} disagrees with the memmap.")
                    pages += len(heads) << order
                if pages != self._nfree[n][kind]:
                    raise MachineError(f"Node {n} counts {self._nfree[n][kind]} free pages but lists "
                                       f"{pages} (unlisted chunks included).")
        free = self.memmap.block_states() == PageState.FREE
        listed = sum(map(sum, self._nfree))
        marked = int(np.count_nonzero(free))
        if listed != marked:
            raise MachineError(f"The memmap marks {marked} pages free but the free lists hold {listed}.")
        per_chunk = free[: self._nfull << MAX_ORDER].reshape(self._nfull, CHUNK).sum(axis=1)
        unlisted = np.flatnonzero(self._hidden)
        wrong = unlisted[per_chunk[unlisted] != self._hidden[unlisted]]
        if wrong.size:
            raise MachineError(f"Unlisted chunk {int(wrong[0])} counts {int(self._hidden[wrong[0]])} "
                               f"free pages but the memmap marks {int(per_chunk[wrong[0]])}.")

    # -- internals --------------------------------------------------------------------------

    def _node_order(self, node: int | None) -> list[int]:
        nodes = list(range(self.arena.nodes))
        if node is None:
            return nodes
        if not 0 <= node < self.arena.nodes:
            raise MachineError(f"Node {node} does not exist; this machine has {self.arena.nodes} node(s).")
        return [node] + nodes[:node] + nodes[node + 1 :]

    def _take(self, node: int, kind: int, order: int) -> int | None:
        lists = self._free[node][kind]
        for k in range(order, MAX_ORDER + 1):
            if lists[k]:
                break
        else:
            k = self._list_until(node, kind, order)
            if k is None:
                return None
        pfn = lists[k].pop()
        flag = SCRATCH_FLAG if kind else 0
        where = self._where
        while k > order:  # split: keep the lower half, free the upper one
            k -= 1
            buddy = pfn + (1 << k)
            where[buddy] = len(lists[k])
            lists[k].append(buddy)
            self._map[buddy] = flag | _FREE | k
        self._map[pfn] = flag | _ALLOCATED | order
        self._nfree[node][kind] -= 1 << order
        return pfn

    def _check_block(self, pfn: int, order: int) -> PageState:
        """State of the allocated or preserved block at ``pfn``; MachineError otherwise."""
        _check_order(order)
        if not 0 <= pfn < self.arena.npages:
            raise MachineError(f"PFN {pfn} lies outside the arena of {self.arena.npages} pages.")
        if pfn & ((1 << order) - 1):
            raise MachineError(f"PFN {pfn} cannot head a block of order {order}: it is not aligned to it.")
        state, actual = self.memmap.head(pfn)
        if state is PageState.FREE:
            raise MachineError(f"PFN {pfn} is already free (order {actual}); this is a double free.")
        if state in (PageState.TAIL, PageState.RESERVED):
            raise MachineError(f"PFN {pfn} cannot be freed: it is {self.memmap.describe(pfn)}.")
        if actual != order:
            raise MachineError(
                f"PFN {pfn} heads a {state.name.lower()} block of order {actual}, not of order {order}."
            )
        return state

    # -- the free lists from the memmap, chunk by chunk ------------------------------------
    #
    # No block crosses a multiple of CHUNK (blocks are naturally aligned, node boundaries
    # are multiples of it), so the free blocks of a chunk follow from its bytes alone:
    # start-up rebuilds every chunk, a bulk free only the chunks it touched. A chunk with
    # no FREE head is skipped and a chunk free as a whole is one block, both found from
    # its bytes read as u64 words; only the other chunks are cut into blocks page by page.

    def _start(self, marks: BootMarks) -> None:
        """The first free lists: a whole chunk boot never touched is one free block, a
        chunk it filled has none (neither is read); a chunk it marked in part stays
        unlisted, its free pages counted from the marks (nothing read either), unless
        it has scratch pages; those, and the arena's partial last chunk, are rebuilt
        from their bytes."""
        chunks = np.arange(len(marks.touched), dtype=np.int64)
        full = chunks < self._nfull
        fresh = chunks[full & ~marks.touched]
        self._rows[fresh, 1:] = _TAIL
        self._rows[fresh, 0] = _FREE | MAX_ORDER
        self.memmap.wrote(fresh)
        self._add(fresh << MAX_ORDER, np.full(len(fresh), MAX_ORDER, np.int64))
        marked = full & marks.touched & (marks.covered < CHUNK)
        unlisted = marked & ~marks.scratched
        self._hidden[unlisted] = CHUNK - marks.covered[unlisted]
        self._unlisted = bool(unlisted.any())
        self._count_normal(chunks[unlisted], self._hidden[unlisted])
        self._rebuild(chunks[marked & marks.scratched | ~full])

    def _count_normal(self, chunks: np.ndarray, pages: np.ndarray, sign: int = 1) -> None:
        """Add ``sign`` times ``pages[i]`` free pages of normal memory in ``chunks[i]``
        (ascending) to the counters of their nodes."""
        for n, (lo, hi) in enumerate(zip(self._node_chunks, self._node_chunks[1:])):
            a, b = np.searchsorted(chunks, (lo, hi))
            self._nfree[n][NORMAL] += sign * int(pages[a:b].sum())

    def _hide(self, pfns: np.ndarray, order: int) -> None:
        """Count the blocks of ``order`` at ``pfns``, freed into unlisted chunks, as free
        pages there: the chunk's listing merges them."""
        if pfns.size:
            np.add.at(self._hidden, pfns >> MAX_ORDER, 1 << order)
            self._count_normal(np.sort(pfns >> MAX_ORDER), np.full(pfns.size, 1 << order, np.int64))

    def _unlisted_pages(self, node: int) -> int:
        return int(self._hidden[self._node_chunks[node]:self._node_chunks[node + 1]].sum())

    def _list_until(self, node: int, kind: int, order: int) -> int | None:
        """No listed block of ``node`` and ``kind`` has ``order`` or more: list the
        node's unlisted chunks (normal memory only), more each time, until one has; its
        order, or None once none is left."""
        lists = self._free[node][kind]
        batch = _ON_DEMAND
        while kind == NORMAL and self._list_node(node, batch):
            for k in range(order, MAX_ORDER + 1):
                if lists[k]:
                    return k
            batch *= 2
        return None

    def _list_node(self, node: int, count: int) -> bool:
        """List up to ``count`` unlisted chunks of ``node``, the lowest first; False if
        it has none."""
        lo = self._node_chunks[node]
        chunks = np.flatnonzero(self._hidden[lo:self._node_chunks[node + 1]])[:count] + lo
        if chunks.size:
            self._list(chunks)
        return bool(chunks.size)

    def _list(self, chunks: np.ndarray) -> None:
        """List ``chunks`` (ascending, unlisted): their free pages become free blocks on
        the free lists (no longer counted per chunk)."""
        self._count_normal(chunks, self._hidden[chunks], sign=-1)
        self._hidden[chunks] = 0
        self._unlisted = bool(self._hidden.any())
        self._rebuild(chunks)

    def _rebuild(self, chunks: np.ndarray) -> None:
        """Add the free blocks of ``chunks`` (ascending, none of them listed) to the
        free lists, merging their free pages into maximal aligned blocks in the memmap."""
        self.memmap.settle_pfns(chunks << MAX_ORDER)
        full = chunks[chunks < self._nfull]
        free_head, whole = self._classify(full)
        first = self._rows[full, 0]
        whole |= free_head & ((first & (SCRATCH_FLAG - 1)) == _FREE | MAX_ORDER)
        heads = [full[whole] << MAX_ORDER]
        orders = [np.full(len(heads[0]), MAX_ORDER, np.int64)]
        mixed = np.concatenate([full[free_head & ~whole], chunks[chunks >= self._nfull]])
        if len(mixed):
            more, more_orders = self._cut(mixed)
            heads.append(more)
            orders.append(more_orders)
        self._add(np.concatenate(heads), np.concatenate(orders))

    def _classify(self, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per whole chunk of ``full`` (ascending): has it a FREE head, and is it all
        free order-0 pages of one kind (as boot leaves an untouched chunk: made one free
        block here, in the memmap)? Read as u64 words, a slice of chunks at a time."""
        free_head = np.zeros(len(full), bool)
        fresh = np.zeros(len(full), bool)
        dense = len(full) == self._nfull      # every chunk: slices, not a gather
        for lo in range(0, len(full), _SCAN):
            words = self._words[lo:lo + _SCAN] if dense else self._words[full[lo:lo + _SCAN]]
            free_head[lo:lo + _SCAN] = _has_byte(words & np.uint64(_WORD * STATE_MASK),
                                                 _WORD * _FREE).any(axis=1)
            for flag in (0, SCRATCH_FLAG):
                fresh[lo:lo + _SCAN] |= (words == np.uint64(_WORD * (flag | _FREE))).all(axis=1)
        for flag in (0, SCRATCH_FLAG):
            rows = full[fresh & (self._rows[full, 0] == flag | _FREE)]
            self._rows[rows, 1:] = flag | _TAIL
            self._rows[rows, 0] = flag | _FREE | MAX_ORDER
        return free_head, fresh

    def _cut(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut the free pages of ``chunks`` (ascending; the partial last chunk of the
        arena may be among them) into maximal aligned blocks, written to the memmap;
        returns (head pfns, orders)."""
        full = chunks[chunks < self._nfull]
        tail_start = self._nfull << MAX_ORDER
        has_tail = len(full) < len(chunks)
        data = np.concatenate([self._rows[full].ravel()]
                              + ([self._map[tail_start:]] if has_tail else []))
        states = (data & STATE_MASK) >> STATE_SHIFT
        is_tail = states == PageState.TAIL
        if is_tail.any():   # a tail takes its head's state; every chunk starts with a head
            head = np.arange(len(data), dtype=np.int32)
            head[is_tail] = 0
            np.maximum.accumulate(head, out=head)
            states = states[head]
        free = states == PageState.FREE
        scratch = data >= SCRATCH_FLAG
        code = free.view(np.int8) + (free & scratch).view(np.int8)   # 0 used, 1 free, 2 scratch
        edges = _with_sorted(np.flatnonzero(code[1:] != code[:-1]) + 1,
                             np.arange(CHUNK, len(data), CHUNK, dtype=np.int64))
        starts = np.concatenate(([0], edges)).astype(np.int64)
        starts = starts[code[starts] != 0]
        ends = np.concatenate((edges, [len(data)]))[np.searchsorted(edges, starts, side="right")]
        base = (chunks << MAX_ORDER) - (np.arange(len(chunks), dtype=np.int64) << MAX_ORDER)
        shift = base[starts >> MAX_ORDER]          # local position -> pfn
        heads, orders = split_runs(starts + shift, ends + shift)
        data[free] = (data[free] & SCRATCH_FLAG) | _TAIL
        if len(full):
            self._rows[full] = data[: len(full) << MAX_ORDER].reshape(-1, CHUNK)
        if has_tail:
            self._map[tail_start:] = data[len(full) << MAX_ORDER:]
        self._map[heads] = (self._map[heads] & SCRATCH_FLAG) | _FREE | orders.astype(np.uint8)
        return heads, orders

    def _forget(self, chunks: np.ndarray) -> None:
        """Take the free blocks of ``chunks`` off the free lists (before a bulk free
        changes the memmap there; :meth:`_rebuild` lists them again)."""
        self.memmap.settle_pfns(chunks << MAX_ORDER)
        full = chunks[chunks < self._nfull]
        pfns = (full[:, None] << MAX_ORDER) + np.arange(CHUNK, dtype=np.int64)
        pfns = [pfns.ravel()]
        if len(full) < len(chunks):
            pfns.append(np.arange(self._nfull << MAX_ORDER, self.arena.npages, dtype=np.int64))
        pages = np.concatenate(pfns)
        heads = pages[(self._map[pages] & STATE_MASK) == _FREE]
        orders = (self._map[heads] & ORDER_MASK).astype(np.int64)
        self._group(heads, orders, forget=True)

    def _add(self, heads: np.ndarray, orders: np.ndarray) -> None:
        self._group(heads, orders, forget=False)

    def _group(self, heads: np.ndarray, orders: np.ndarray, *, forget: bool) -> None:
        """Add the free blocks (``heads``, ``orders``) to the free lists and counters,
        or take them off (``forget``)."""
        if not len(heads):
            return
        nodes = np.searchsorted(np.asarray(self._starts[1:-1]), heads, side="right")
        kinds = (self._map[heads] >= SCRATCH_FLAG).astype(np.int64)
        for (node, kind, order), group in _groups(heads, orders, nodes, kinds):
            stack = self._free[node][kind][order]
            group = group.astype(np.int64, copy=False)[::-1]    # the lowest on top
            if forget:
                self._unstack(stack, group)
                self._nfree[node][kind] -= len(group) << order
            else:
                self._stack(stack, group)
                self._nfree[node][kind] += len(group) << order

    def _stack(self, stack: array, heads: np.ndarray) -> None:
        """Push ``heads`` on ``stack`` (one by one when they are few: cheaper than the
        numpy calls)."""
        if len(heads) <= _FEW:
            where = self._where
            for pfn in heads.tolist():
                where[pfn] = len(stack)
                stack.append(pfn)
            return
        self._at[heads] = np.arange(len(stack), len(stack) + len(heads), dtype=np.int32)
        stack.frombytes(heads.tobytes())

    def _unstack(self, stack: array, heads: np.ndarray) -> None:
        """Take ``heads`` (listed in ``stack``) off it: each one's place goes to a head
        from the top (one by one when they are few: cheaper than the numpy calls)."""
        if len(heads) <= _FEW:
            where = self._where
            for pfn in heads.tolist():
                last = stack.pop()
                if last != pfn:
                    stack[where[pfn]] = last
                    where[last] = where[pfn]
            return
        top = len(stack) - len(heads)
        at = self._at[heads].astype(np.int64)
        leaving = np.zeros(len(heads), bool)        # of the places from the new top up
        leaving[at[at >= top] - top] = True
        movers = top + np.flatnonzero(~leaving)     # stay: into the places left below
        holes = at[at < top]
        view = np.frombuffer(stack, np.int64)
        moved = view[movers]
        view[holes] = moved
        self._at[moved] = holes
        del view                # no export left: the array may shrink
        del stack[top:]

    def _oom_message(self, order: int, movable: bool, node: int | None) -> str:
        kind = "movable" if movable else "unmovable"
        where = "" if node is None else f" (preferring node {node})"
        largest = max(
            (k for n in self._free for kd in ((SCRATCH, NORMAL) if movable else (NORMAL,))
             for k, heads in enumerate(n[kd]) if heads),
            default=None,
        )  # fmt: skip
        have = "no free block at all" if largest is None else f"the largest free block is of order {largest}"
        return (
            f"Out of memory: no free block of order {order} "
            f"({format_size(1 << (order + PAGE_SHIFT))}) for a {kind} allocation{where}; "
            f"{self.free_pages(movable=movable)} pages are free and {have}."
        )


def _check_order(order: int) -> None:
    if not 0 <= order <= MAX_ORDER:
        raise MachineError(f"Order {order} is outside the buddy orders 0..{MAX_ORDER}.")


def _has_byte(words: np.ndarray, value: int) -> np.ndarray:
    """Per u64 word: is one of its bytes equal to the pattern ``value`` (a byte
    repeated)? The exact SWAR zero-byte test on ``words ^ value``."""
    x = words ^ np.uint64(value)
    return ((x - np.uint64(_WORD)) & ~x & np.uint64(_WORD * 0x80)) != 0


def _with_sorted(sorted_unique: np.ndarray, few: np.ndarray) -> np.ndarray:
    """`sorted_unique` with the values of `few` it lacks, in order: np.union1d would
    sort (or hash) millions of edges again on a fragmented arena."""
    at = np.searchsorted(sorted_unique, few)
    present = (at < sorted_unique.size) & (sorted_unique[np.minimum(at, sorted_unique.size - 1)]
                                           == few) if sorted_unique.size else np.zeros(few.size, bool)
    return np.insert(sorted_unique, at[~present], few[~present])


def split_runs(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut every run ``[starts[i], ends[i])`` into maximal naturally aligned buddy blocks.

    Greedy, as the kernel's ``__free_pages_memory()`` does: climb (take a 2**k block
    while the position has bit k set and it fits), then whole MAX_ORDER blocks, then
    descend through the bits of what is left. Each step is one pass over the runs longer
    than a page (single pages, all a fragmented arena has, are order-0 blocks as they are).
    """
    single = ends - starts == 1
    heads: list[np.ndarray] = [starts[single]]
    orders: list[np.ndarray] = [np.zeros(len(heads[0]), np.int64)]
    if single.all():
        return heads[0], orders[0]
    pos, ends = starts[~single], ends[~single]

    def take(mask: np.ndarray, order: int) -> None:
        heads.append(pos[mask])
        orders.append(np.full(int(mask.sum()), order, dtype=np.int64))
        pos[mask] += 1 << order

    for order in range(MAX_ORDER):
        take(((pos & (1 << order)) != 0) & (pos + (1 << order) <= ends), order)
    count = (ends - pos) >> MAX_ORDER
    total = int(count.sum())
    if total:
        first = np.repeat(pos, count)
        index = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        heads.append(first + (index << MAX_ORDER))
        orders.append(np.full(total, MAX_ORDER, dtype=np.int64))
        pos += count << MAX_ORDER
    for order in range(MAX_ORDER - 1, -1, -1):
        take(ends - pos >= 1 << order, order)
    return np.concatenate(heads), np.concatenate(orders)


def _groups(heads: np.ndarray, orders: np.ndarray, nodes: np.ndarray,
            kinds: np.ndarray) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
    """The head pfns (int64) grouped by (node, kind, order), ascending in each group
    when they are in ``heads``."""
    key = (nodes * 2 + kinds) * (MAX_ORDER + 1) + orders
    sort = np.argsort(key, kind="stable")
    key, heads = key[sort], heads[sort]
    cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
    for group_key, group in zip(key[np.concatenate(([0], cuts))].tolist(), np.split(heads, cuts)):
        node_kind, order = divmod(group_key, MAX_ORDER + 1)
        yield (node_kind // 2, node_kind % 2, order), group
