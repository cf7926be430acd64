"""KHO, the incoming side: the handover this kernel was booted with (``kernel.kho_in``).

``IncomingHandover.parse`` validates the whole handover before boot changes anything in
the arena, and refuses it with a HandoverError naming what is wrong: the root FDT, the
preserved-memory maps (the global radix tree and each pool's, or a ``kho-v1`` chunk list
from release 0.2.0), every sub-FDT, kexec-metadata, and where all of that lies: inside
the arena, no two blocks over one page, nothing on page 0 or in scratch. The maps stay
radix leaves (``leaves.Leaves``) from the arena to the memmap: that last check sets one
bit per arena page from them, boot reserves them and ``restore_pool`` claims them a run
of leaves at a time, so a million preserved pages cost a few vector passes over one byte
each, not a step per block.

Boot then reserves ``reserved_blocks()``, ``attach``es the kernel, and subsystems take
their state back with ``retrieve_subtree``, the ``restore_*`` calls (the kernel's
kho_retrieve_subtree / kho_restore_folio) and ``restore_pool``, which gives a pool back
whole, tree and all, and hands it on with this kernel's KHO. At the end of boot
``release_unclaimed`` frees everything nobody took: the old root FDT, the old global
map's nodes, and every folio, subtree and pool not restored.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .arena import PhysMemory
from .chain import Chain, walk_chain
from .errors import HandoverError
from .fdt import FdtReader
from .kexec_metadata import METADATA_NODE, KexecMetadata
from .kho import (KHO, KHO_COMPATIBLE, POOL_COMPATIBLE, POOLS_NODE, PROP_BLOB_CRC,
                  PROP_BLOB_SIZE, PROP_DATA, PROP_MEM_MAP, split_natural)
from .kho_mem import (KHO_V1_COMPATIBLE, PROP_FDT, PROP_FDT_CRC, PROP_FDT_SIZE,
                      kho_mem_deserialize)
from .kho_pool import PreservedPool
from .kho_radix import RadixMap, read_radix
from .leaves import LEAF_BITS, LEAF_SHIFT, Leaves, Run
from .memmap import block_pages, blocks_mask, has_duplicates
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


@dataclass
class PreservedMap:
    """The global preserved-memory map of a handover: what subsystems restore."""

    #: Per order with folios: their leaves (a kho-v1 map is converted to leaves).
    leaves: dict[int, Leaves] = field(default_factory=dict)
    #: kho-v3: the radix tree's node pages (reserved beside the folios, never restored).
    nodes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    nr_leaves: int = 0
    #: kho-v1: the chunk pages (preserved order-0 folios themselves).
    chunk_pfns: list[int] = field(default_factory=list)

    def ranges(self) -> Iterator[tuple[np.ndarray, int]]:
        """(head pfns, order) for every order with preserved folios, ascending order
        (unpacked from the leaves)."""
        for order in sorted(self.leaves):
            yield self.leaves[order].heads(), order

    def nr_pages(self) -> int:
        return sum(leaves.pages() for leaves in self.leaves.values())

    def order_of(self, pfn: int) -> int | None:
        """The order of the preserved folio whose head is ``pfn``, or None."""
        for order, leaves in sorted(self.leaves.items()):
            if pfn >= 0 and not pfn & ((1 << order) - 1) and leaves.contains(np.array([pfn]))[0]:
                return order
        return None

    def covers(self, pfn: int, npages: int) -> bool:
        """Is every page of [pfn, pfn + npages) inside some preserved folio?"""
        want = np.arange(pfn, pfn + npages, dtype=np.int64)
        covered = np.zeros(npages, bool)
        for order, leaves in self.leaves.items():
            covered |= leaves.contains(want >> order << order)
        return bool(covered.all())


@dataclass(frozen=True)
class InPool:
    """A pool of the incoming handover: its validated tree."""

    name: str
    map: RadixMap


def read_phys(mem: PhysMemory, phys: int, size: int) -> bytes:
    """Copy ``size`` bytes at ``phys`` (the caller has bounds-checked them)."""
    first = phys >> PAGE_SHIFT
    last = (phys + size - 1) >> PAGE_SHIFT
    start = phys - (first << PAGE_SHIFT)
    return bytes(mem.view(first, last - first + 1)[start:start + size])


def _check_range(mem: PhysMemory, phys: int, size: int, what: str) -> None:
    end = mem.npages << PAGE_SHIFT
    if size <= 0 or phys < PAGE_SIZE or phys + size > end:
        raise HandoverError(f"{what.capitalize()} is at [{phys:#x}, {phys + size:#x}), "
                            f"outside the arena's memory [{PAGE_SIZE:#x}, {end:#x}).")


def _pages_of(phys: int, size: int) -> np.ndarray:
    return np.arange(phys >> PAGE_SHIFT, (phys + size - 1 >> PAGE_SHIFT) + 1, dtype=np.int64)


class IncomingHandover:
    """A validated handover, and the restore calls over it."""

    def __init__(self, mem: PhysMemory, version: str, fdt_phys: int, fdt_size: int,
                 pmap: PreservedMap, subtrees: dict[str, InSubtree], pools: dict[str, InPool],
                 metadata: KexecMetadata | None, crashed: bool,
                 occupied: Sequence[Leaves]) -> None:
        self.mem = mem
        #: The root's ``compatible``: "kho-v3", or "kho-v1" (release 0.2.0).
        self.version = version
        self.fdt_phys = fdt_phys
        self.fdt_size = fdt_size
        self.pmap = pmap
        self.subtrees = subtrees
        self.pools = pools
        #: The kexec-metadata subtree; None if the previous kernel did not write one
        #: (or crashed: its handover is its live state, not a kexec's).
        self.metadata = metadata
        #: The previous kernel died without handing over; this is its live state.
        self.crashed = crashed
        #: Everything the handover occupies, as validated (see reserved_blocks).
        self._occupied = list(occupied)
        self.buddy: PageAllocator | None = None
        self.kho: KHO | None = None
        # Per order, parallel to pmap.leaves[order].bitmaps: restored (or released)?
        self._claimed = {o: np.zeros_like(leaves.bitmaps) for o, leaves in pmap.leaves.items()}
        self._restored_pools: set[str] = set()
        self._released = False

    # -- validation ---------------------------------------------------------------------

    @classmethod
    def parse(cls, mem: PhysMemory, fdt_phys: int, fdt_size: int, *,
              scratch: Sequence[tuple[int, int]] = (), crashed: bool = False) -> IncomingHandover:
        """Read and validate the whole handover; reads only, changes nothing.

        ``scratch`` lists the scratch areas ``(start_pfn, npages)``: preserved memory
        there is refused. ``crashed``: the root is the live one of a kernel that died
        without handing over. Raises HandoverError naming the first problem found.
        """
        _check_range(mem, fdt_phys, fdt_size, "the KHO root FDT")
        if fdt_size > MAX_ROOT_FDT:
            raise HandoverError(f"The KHO root FDT claims {fdt_size} bytes; a root FDT is "
                                f"at most {MAX_ROOT_FDT} bytes.")
        root = FdtReader(read_phys(mem, fdt_phys, fdt_size), "the KHO root FDT")
        top = root.node("/")
        version = root.expect_compatible(top, (KHO_COMPATIBLE, KHO_V1_COMPATIBLE))
        root.check_seal()
        if version == KHO_V1_COMPATIBLE:
            pmap, pools, specs = _parse_v1(mem, root, top)
        else:
            pmap, pools, specs = _parse_v3(mem, root, top)
        placed = _placed(version, fdt_phys, fdt_size, pmap, pools)
        check_placement(mem.npages, placed, scratch)
        if version == KHO_V1_COMPATIBLE:
            _check_preserved(pmap, fdt_phys, fdt_size, "the KHO root FDT")
        subtrees: dict[str, InSubtree] = {}
        for name, phys, size, crc in specs:
            if name in subtrees:
                raise HandoverError(f"The KHO root FDT lists the subtree {name!r} twice.")
            subtrees[name] = _read_subtree(mem, pmap, name, phys, size, crc)
        meta = subtrees.get(METADATA_NODE)
        metadata = KexecMetadata.from_fdt(meta.blob) if meta and not crashed else None
        log.info("KHO handover (%s) at %#x%s: %d pages preserved, %d subtrees, %d pools%s",
                 version, fdt_phys, ", the live state of a crashed kernel" if crashed else "",
                 pmap.nr_pages(), len(subtrees), len(pools),
                 f"; exec from: {metadata.previous_release} (count {metadata.kexec_count})"
                 if metadata else "")
        return cls(mem, version, fdt_phys, fdt_size, pmap, subtrees, pools, metadata, crashed,
                   [leaves for _, leaves in placed])

    @property
    def holds_state(self) -> bool:
        """Does the handover hold anything a subsystem can take back: a pool, or a
        subtree other than kexec-metadata (which only describes a kexec)?"""
        return bool(self.pools) or any(name != METADATA_NODE for name in self.subtrees)

    # -- boot hooks -----------------------------------------------------------------------

    def preserved_ranges(self) -> Iterator[tuple[np.ndarray, int]]:
        """(head pfns, order) of every folio of the global map, per order: what the
        ``restore_*`` calls give back."""
        return self.pmap.ranges()

    def reserved_blocks(self) -> Iterator[Leaves]:
        """The leaves of everything the handover occupies, which boot reserves: the
        global map's folios and nodes, every pool's blocks and nodes, the root FDT."""
        yield from self._occupied

    def page_mask(self) -> np.ndarray:
        """Bool per arena page: occupied by the handover (see :meth:`reserved_blocks`)."""
        return blocks_mask(self.mem.npages, ((leaves.heads(), leaves.order)
                                             for leaves in self.reserved_blocks()))

    def attach(self, buddy: PageAllocator, kho: KHO) -> None:
        """Bind to the booted kernel: its buddy allocator takes back what the restores
        free, its KHO takes the restored pools on."""
        self.buddy = buddy
        self.kho = kho

    def release_unclaimed(self) -> int:
        """Free everything the handover occupies that nobody restored (end of boot);
        returns the pages freed."""
        buddy = self._attached()
        if self._released:
            return 0
        blocks = []
        for order, leaves in self.pmap.leaves.items():
            blocks.append((leaves.without(self._claimed[order]).heads(), order))
            self._claimed[order][:] = leaves.bitmaps
        blocks.append((self.pmap.nodes, 0))
        for name, pool in self.pools.items():
            if name not in self._restored_pools:
                blocks += [*pool.map.ranges(), (pool.map.nodes, 0)]
        if self.version == KHO_COMPATIBLE:
            blocks.append((_pages_of(self.fdt_phys, self.fdt_size), 0))
        buddy.free_blocks(blocks)
        self._released = True
        freed = sum(len(pfns) << order for pfns, order in blocks)
        log.info("KHO: released %d preserved pages that nobody restored", freed)
        return freed

    # -- subsystem calls ---------------------------------------------------------------------

    def retrieve_subtree(self, name: str) -> tuple[int, bytes]:
        """(phys, blob) of the sub-FDT ``name`` (validated at parse); HandoverError if
        the previous kernel did not hand one over."""
        sub = self.subtrees.get(name)
        if sub is None:
            raise HandoverError(f"The handover has no subtree {name!r} (it has: "
                                f"{', '.join(sorted(self.subtrees)) or 'none'}).")
        return sub.phys, sub.blob

    def restore_folio(self, pfn: int) -> int:
        """Take back the preserved folio whose head is ``pfn``; returns its order."""
        order = self.pmap.order_of(pfn)
        if order is None:
            raise HandoverError(f"Pfn {pfn} is not the head of a preserved folio.")
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
        rows, bits = self._claimable(pfns, order)
        self._attached().memmap.claim_preserved(pfns, order)
        np.bitwise_or.at(self._claimed[order], (rows, bits >> 3), (1 << (bits & 7)).astype(np.uint8))

    def restore_pool(self, name: str) -> PreservedPool:
        """Take back the pool ``name`` whole: every block and every page of its tree is
        claimed in bulk (the tree is adopted, not copied), and the pool is registered
        with this kernel's KHO under the same name, so the next kexec hands it over
        again with no work. HandoverError if there is no such pool or it was restored;
        KhoError if this kernel has a pool of that name already."""
        pool = self.pools.get(name)
        if pool is None:
            raise HandoverError(f"The handover has no pool {name!r} (it has: "
                                f"{', '.join(sorted(self.pools)) or 'none'}).")
        if name in self._restored_pools or self._released:
            raise HandoverError(f"The pool {name!r} of the handover was already restored "
                                "or released.")
        kho = self.kho
        if kho is None:
            raise RuntimeError("IncomingHandover.attach(buddy, kho) has not been called")
        kho.check_pool_name(name)
        memmap = self._attached().memmap
        for leaves in pool.map.leaves.values():
            memmap.claim_leaves(leaves)
        memmap.claim_preserved(pool.map.nodes, 0)
        self._restored_pools.add(name)
        return kho.adopt_pool(name, pool.map)

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
            raise RuntimeError("IncomingHandover.attach(buddy, kho) has not been called")
        return self.buddy

    def _claimable(self, pfns: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
        """(leaf rows, bits) in pmap.leaves[order] of ``pfns``; HandoverError naming a
        bad one."""
        leaves = self.pmap.leaves.get(order)
        if not len(pfns):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        aligned = (pfns >= 0) & (pfns & ((1 << order) - 1) == 0)
        found = aligned.copy()
        if leaves is not None:
            found[aligned] = leaves.contains(pfns[aligned])
        else:
            found[:] = False
        if not found.all():
            pfn = int(pfns[np.flatnonzero(~found)[0]])
            actual = self.pmap.order_of(pfn)
            why = (f"it was preserved as an order-{actual} folio" if actual is not None
                   else "it was not preserved")
            raise HandoverError(f"Pfn {pfn} cannot be restored as an order-{order} folio: {why}.")
        rows = np.searchsorted(leaves.index, pfns >> (order + LEAF_SHIFT))
        bits = (pfns >> order) & (LEAF_BITS - 1)
        claimed = (self._claimed[order][rows, bits >> 3] >> (bits & 7)) & 1 != 0
        if claimed.any():
            pfn = int(pfns[np.flatnonzero(claimed)[0]])
            raise HandoverError(f"The order-{order} folio at pfn {pfn} was already restored.")
        if has_duplicates(pfns):
            raise HandoverError(f"restore_pfns was given an order-{order} folio twice.")
        return rows, bits


# -- the two formats ----------------------------------------------------------------------

Specs = list[tuple[str, int, int, int]]   # subtree name, phys, size, crc32


def _parse_v3(mem: PhysMemory, root: FdtReader,
              top: int) -> tuple[PreservedMap, dict[str, InPool], Specs]:
    found = read_radix(mem, root.u64(top, PROP_MEM_MAP), "the preserved-memory map")
    pmap = PreservedMap(leaves=found.leaves, nodes=found.nodes, nr_leaves=found.nr_leaves)
    pools: dict[str, InPool] = {}
    specs: Specs = []
    for name, off in root.subnodes(top):
        if name != POOLS_NODE:
            specs.append((name, root.u64(off, PROP_DATA), root.u64(off, PROP_BLOB_SIZE),
                          root.u32(off, PROP_BLOB_CRC)))
            continue
        for pool, pool_off in root.subnodes(off):
            if pool in pools:
                raise HandoverError(f"The KHO root FDT lists the pool {pool!r} twice.")
            root.expect_compatible(pool_off, POOL_COMPATIBLE)
            pools[pool] = InPool(pool, read_radix(mem, root.u64(pool_off, PROP_MEM_MAP),
                                                  f"the preserved-memory map of pool {pool!r}"))
    return pmap, pools, specs


def _parse_v1(mem: PhysMemory, root: FdtReader,
              top: int) -> tuple[PreservedMap, dict[str, InPool], Specs]:
    chunks = kho_mem_deserialize(mem, root.u64(top, PROP_MEM_MAP))
    pmap = PreservedMap(leaves={order: Leaves.from_heads(heads, order)
                                for order, heads in chunks.heads.items()},
                        chunk_pfns=chunks.chunk_pfns)
    specs = [(name, root.u64(off, PROP_FDT), root.u64(off, PROP_FDT_SIZE),
              root.u32(off, PROP_FDT_CRC)) for name, off in root.subnodes(top)]
    return pmap, {}, specs


# -- where the handover lies ----------------------------------------------------------------

Placed = list[tuple[str, Leaves]]   # what (for errors), its blocks


def _placed(version: str, fdt_phys: int, fdt_size: int, pmap: PreservedMap,
            pools: dict[str, InPool]) -> Placed:
    placed: Placed = [(f"the preserved order-{order} folio", leaves)
                      for order, leaves in sorted(pmap.leaves.items())]
    placed.append(("the preserved-memory map's node", Leaves.from_heads(pmap.nodes, 0)))
    for name, pool in pools.items():
        placed += [(f"the order-{order} block of pool {name!r}", leaves)
                   for order, leaves in sorted(pool.map.leaves.items())]
        placed.append((f"the map node of pool {name!r}", Leaves.from_heads(pool.map.nodes, 0)))
    if version == KHO_COMPATIBLE:
        if fdt_phys % PAGE_SIZE:
            raise HandoverError(f"The KHO root FDT at {fdt_phys:#x} does not start on a page.")
        placed.append(("the KHO root FDT's page",
                       Leaves.from_heads(_pages_of(fdt_phys, fdt_size), 0)))
    return placed


def check_placement(npages: int, placed: Placed, scratch: Sequence[tuple[int, int]]) -> None:
    """HandoverError unless the blocks ``placed`` (inside the arena) leave page 0 and
    the ``scratch`` areas alone and no two share a page. The largest order-0 map of
    whole leaves is its own page bits (its bitmaps, not copied); the few pages of the
    sparse maps are looked up in it; other maps become rows of page bits (an order-0
    leaf's pages each) only where they have blocks: cost in proportion to the
    handover's leaves, whatever the arena's size or the number of blocks."""
    base = _base(placed)
    rest = [leaves for i, (_, leaves) in enumerate(placed) if i != base]
    pages = np.sort(np.concatenate([np.zeros(0, np.int64)] + [
        block_pages(leaves.heads(), leaves.order) for leaves in rest if _few_pages(leaves)]))
    twice = np.flatnonzero(pages[1:] == pages[:-1])
    if len(twice):
        _refuse_shared(placed, int(pages[twice[0]]))
    tables = [] if base is None else [(placed[base][1].index, placed[base][1].bitmaps)]
    rows, bits = _rows_of([leaves for leaves in rest if not _few_pages(leaves)], npages)
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    # Each row once (the usual case): as it is; np.bitwise_or.reduceat is slow on rows.
    merged = bits if len(starts) == len(rows) else np.bitwise_or.reduceat(bits, starts, axis=0)
    unique = rows[starts]
    if len(unique) < len(rows):         # rows of several maps: do their bits add up?
        clash = np.flatnonzero(_popcount(merged) != np.add.reduceat(_popcount(bits), starts))
        if len(clash):
            _refuse_shared(placed, _first_shared(placed, npages, int(unique[clash[0]])))
    for index, table in tables:
        at = np.minimum(np.searchsorted(index, unique), max(len(index) - 1, 0))
        both = np.flatnonzero(index[at] == unique) if len(index) else at[:0]
        clash = (table[at[both]] & merged[both]).any(axis=1)
        if clash.any():
            _refuse_shared(placed, _first_shared(placed, npages, int(unique[both[np.argmax(clash)]])))
    tables.append((unique, merged))
    taken = np.zeros(len(pages), bool)
    for index, table in tables:
        taken |= _bits_at(index, table, pages)
    if taken.any():
        _refuse_shared(placed, int(pages[np.argmax(taken)]))
    for lo, n in [(0, 1), *scratch]:
        inside = pages[np.searchsorted(pages, lo):np.searchsorted(pages, lo + n)]
        found = [int(inside[0])] if len(inside) else []
        in_rows = _first_set(tables, lo, lo + n)
        if in_rows is not None:
            found.append(in_rows)
        if not found:
            continue
        pfn = min(found)
        holder = _holders(placed, pfn)[0].capitalize()
        if lo == 0 and n == 1:
            raise HandoverError(f"{holder} covers page 0, the machine header.")
        raise HandoverError(f"{holder} lies in the scratch area at pfns [{lo}, {lo + n}).")


def _few_pages(leaves: Leaves) -> bool:
    """Whether ``leaves`` hold so few pages that checking them page by page is cheaper
    than rows of page bits: `Leaves.sparse` counted in pages, not blocks (a few hundred
    2 MiB folios are sparse blocks but a hundred thousand pages to sort)."""
    return leaves.pages() * 64 < len(leaves.index) << LEAF_SHIFT


def _base(placed: Placed) -> int | None:
    """Which of ``placed`` is the order-0 map with the most blocks in whole leaves
    (check_placement uses its bitmaps as page bits as they are), if any."""
    best = [(leaves.count(), i) for i, (_, leaves) in enumerate(placed)
            if leaves.order == 0 and len(leaves.index) and not leaves.sparse]
    return max(best)[1] if best else None


def _rows_of(maps: list[Leaves], npages: int) -> tuple[np.ndarray, np.ndarray]:
    """The page bits of the blocks of ``maps`` (whole leaves): row numbers (ascending;
    a row once per map) and a row of LEAF_BITS bits each."""
    rows: list[np.ndarray] = [np.zeros(0, np.int64)]
    bits: list[np.ndarray] = [np.zeros((0, _ROW_BYTES), np.uint8)]
    for leaves in maps:
        for run in leaves.runs(npages):    # a run starts on a row (a multiple of 32768)
            page_bits = _page_bits(run)
            if len(page_bits) % _ROW_BYTES:
                row = np.zeros((-(-len(page_bits) // _ROW_BYTES), _ROW_BYTES), np.uint8)
                row.reshape(-1)[:len(page_bits)] = page_bits
            else:
                row = page_bits.reshape(-1, _ROW_BYTES)
            rows.append((run.first >> LEAF_SHIFT) + np.arange(len(row), dtype=np.int64))
            bits.append(row)
    if len(rows) == 2:                  # one run: no copy
        return rows[1], bits[1]
    rows_all, bits_all = np.concatenate(rows), np.concatenate(bits)
    order = np.argsort(rows_all, kind="stable")
    return rows_all[order], bits_all[order]


def _popcount(rows: np.ndarray) -> np.ndarray:
    """Set bits per row."""
    return np.bitwise_count(rows.view(np.uint64)).sum(axis=1, dtype=np.int64)


def _bits_at(index: np.ndarray, table: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Per page: is its bit set in the rows ``table`` (row numbers ``index``)?"""
    if not len(index) or not len(pages):
        return np.zeros(len(pages), bool)
    row = pages >> LEAF_SHIFT
    at = np.minimum(np.searchsorted(index, row), len(index) - 1)
    bit = pages & (LEAF_BITS - 1)
    return (index[at] == row) & ((table[at, bit >> 3] >> (bit & 7)) & 1 != 0)


def _first_set(tables: list[tuple[np.ndarray, np.ndarray]], lo: int, hi: int) -> int | None:
    """The first page of ``[lo, hi)`` set in the rows of ``tables``, or None (only the
    rows of that range are read)."""
    for row in range(lo >> LEAF_SHIFT, ((hi - 1) >> LEAF_SHIFT) + 1):
        found = np.zeros(_ROW_BYTES, np.uint8)
        for index, table in tables:
            at = int(np.searchsorted(index, row))
            if at < len(index) and index[at] == row:
                found |= table[at]
        first, last = max(lo, row << LEAF_SHIFT), min(hi, (row + 1) << LEAF_SHIFT)
        hit = np.flatnonzero(np.unpackbits(found, bitorder="little")[
            first - (row << LEAF_SHIFT):last - (row << LEAF_SHIFT)])
        if len(hit):
            return first + int(hit[0])
    return None


def _first_shared(placed: Placed, npages: int, row: int) -> int:
    """The first page of ``row`` that blocks of two maps cover (there is one)."""
    used = np.zeros(LEAF_BITS, np.int64)
    for _, leaves in placed:
        if leaves.sparse:
            pages = block_pages(leaves.heads(), leaves.order)
            np.add.at(used, pages[pages >> LEAF_SHIFT == row] & (LEAF_BITS - 1), 1)
            continue
        rows, bits = _rows_of([leaves], npages)
        for at in np.flatnonzero(rows == row):
            used += np.unpackbits(bits[at], bitorder="little")
    return (row << LEAF_SHIFT) + int(np.argmax(used > 1))


def _refuse_shared(placed: Placed, pfn: int) -> None:
    first, second = (_holders(placed, pfn) + ["another block"])[:2]
    raise HandoverError(f"The handover's memory overlaps itself at pfn {pfn}: "
                        f"{first} and {second} share it.")


def _page_bits(run: Run) -> np.ndarray:
    """The run's blocks as one bit per page (packed, from page ``run.first``)."""
    if run.order == 0:
        return run.packed
    if run.order < 3:       # each bit becomes 2 or 4 bits: a byte of them, 2 or 4 bytes
        return _WIDEN[run.order][run.packed].view(np.uint8)[:-(-(run.slots << run.order) // 8)]
    return np.repeat(run.bits() * np.uint8(0xFF), 1 << (run.order - 3))


def _widen(order: int) -> np.ndarray:
    """Per byte value: the byte with each bit repeated ``2**order`` times."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    wide = np.packbits(np.repeat(bits, 1 << order, axis=1), axis=1, bitorder="little")
    return wide.view(np.dtype(f"<u{1 << order}")).ravel()


_WIDEN = {order: _widen(order) for order in (1, 2)}
#: Bytes of a row of page bits: the pages of an order-0 leaf.
_ROW_BYTES = LEAF_BITS >> 3


def _holders(placed: Placed, pfn: int) -> list[str]:
    """What holds page ``pfn``, in words, one entry per block."""
    out = []
    for what, leaves in placed:
        head = pfn >> leaves.order << leaves.order
        if leaves.contains(np.array([head]))[0]:
            out.append(f"{what} at pfn {head}")
    return out


def _check_preserved(pmap: PreservedMap, phys: int, size: int, what: str) -> None:
    first = phys >> PAGE_SHIFT
    if phys % PAGE_SIZE or not pmap.covers(first, -(-size // PAGE_SIZE)):
        raise HandoverError(f"{what.capitalize()} at {phys:#x} ({size} bytes) is not in "
                            "preserved, page-aligned memory.")


def _read_subtree(mem: PhysMemory, pmap: PreservedMap, name: str, phys: int, size: int,
                  crc: int) -> InSubtree:
    what = f"the KHO subtree {name!r}"
    _check_range(mem, phys, size, what)
    _check_preserved(pmap, phys, size, what)
    blob = read_phys(mem, phys, size)
    if zlib.crc32(blob) != crc:
        raise HandoverError(f"The KHO subtree {name!r} fails its CRC32 check (the root FDT "
                            f"says {crc:#010x}, its contents give {zlib.crc32(blob):#010x}).")
    FdtReader(blob, what)
    return InSubtree(name, phys, blob)
