"""Page maps: which arena page holds each page of a regular file.

A file is cut into 2 MiB *regions*. A region is one of

* ``None`` — a hole: reads as zeros, holds no page;
* an ``int`` — the head PFN of an order-9 folio (2 MiB of contiguous arena pages);
* an ``array('I')`` of uint32 PFNs, one per 4 KiB page, 0 for a hole (PFN 0 is the
  machine header, never a data page). The array covers pages ``[0, len)`` of the region;
  pages past its end are holes, so a small file's map is a short array sized to need.
  (A stdlib array costs about 30 bytes less per small file than an ndarray; bulk work
  goes through zero-copy numpy views of it. Arrays are replaced, never resized in place,
  so a live view can never block a resize.)

No Python object exists per 4 KiB page: a 1 GiB file written front to back is one page
array for its first region and 511 folio ints (about 17 KiB of Python memory). The
handover sees a map as extents ``(file_pgoff, pfn, npages, order)`` and as bulk PFN
arrays per order.

Policy. A region gets a folio when a write (or fallocate) covers all of it, or when the
region before it already holds data (the file is growing region by region, as large
files do); otherwise, and whenever no order-9 block is free, it gets order-0 pages. As
with shmem's ``huge=always``, a file that ends just past a region boundary owns the
whole folio of its last region. A folio is never split: a truncate or hole punch that
cuts one partly zeroes the cut bytes and keeps the folio, and frees it only once it is
cut entirely.

Invariant: every allocated byte past the end of the file (the owner's ``size``) is zero,
so extending a file (by truncate or by a write past EOF) reveals only zeros.

`PageMap` does not hold the allocator: every call that touches pages takes the shared
`PagePool`, which keeps the per-file cost to the map itself.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from kho_backend.errors import OutOfMemory
from kho_backend.units import PAGE_SIZE

if TYPE_CHECKING:
    from guestfs.reserve import HandoverReserve
    from kho_backend.arena import Arena
    from kho_backend.page_alloc import PageAllocator

FOLIO_ORDER = 9
REGION_PAGES = 1 << FOLIO_ORDER
REGION_SIZE = REGION_PAGES * PAGE_SIZE
SECTORS_PER_PAGE = PAGE_SIZE // 512

Extent = tuple[int, int, int, int]   # (file_pgoff, pfn, npages, order)
Region = None | int | array

_ZERO_PFN = array("I", [0])
assert _ZERO_PFN.itemsize == 4, "PFN arrays must hold uint32"

# A read-only source of zeros for holes and for clearing pages (no region span is larger).
_ZEROS = memoryview(bytes(REGION_SIZE))


class PagePool:
    """The arena pages files are made of: allocation, freeing and views.

    One pool is shared by all page maps of a filesystem; it counts the pages and the
    blocks (pages or folios) they hold. File pages are unmovable allocations (they are
    preserved across kexec in place). With a `HandoverReserve`, the pages the next
    handover needs are never given to files.
    """

    def __init__(self, arena: Arena, allocator: PageAllocator,
                 reserve: HandoverReserve | None = None) -> None:
        self.arena = arena
        self.allocator = allocator
        self.used_pages = 0
        #: Blocks (pages or folios) allocated: each extent of a page map covers one or more.
        self.allocations = 0
        self.reserve = reserve

    def reserved_pages(self, extra_blocks: int = 0, extra_bytes: int = 0) -> int:
        """Pages kept back for the handover (with that much more in the tree)."""
        if self.reserve is None:
            return 0
        return self.reserve.pages(self.allocations + extra_blocks, extra_bytes)

    def data_floor(self, extra_blocks: int = 0) -> int:
        """Free pages file data leaves alone: the reserve and the metadata's headroom."""
        if self.reserve is None:
            return 0
        return self.reserved_pages(extra_blocks) + self.reserve.headroom_pages

    def alloc(self, order: int) -> int | None:
        """Allocate a block of 2**order pages (contents undefined); None when none is free
        or when it would eat into what is kept for the handover and for metadata."""
        if self.free_pages() - (1 << order) < self.data_floor(extra_blocks=1):
            return None
        try:
            pfn = self.allocator.alloc(order)
        except OutOfMemory:
            return None
        self.used_pages += 1 << order
        self.allocations += 1
        return pfn

    def free(self, pfn: int, order: int) -> None:
        """Give a block back to the allocator."""
        self.allocator.free(pfn, order)
        self.used_pages -= 1 << order
        self.allocations -= 1

    def free_pages(self) -> int:
        """Pages a file allocation could still get, the reserve included."""
        return self.allocator.free_pages(movable=False)

    def view(self, pfn: int, offset: int, length: int) -> memoryview:
        """Writable view of `length` bytes starting `offset` bytes into the block at `pfn`."""
        first = offset // PAGE_SIZE
        npages = (offset + length - 1) // PAGE_SIZE - first + 1
        start = offset - first * PAGE_SIZE
        return self.arena.view(pfn + first, npages)[start:start + length]

    def zero(self, pfn: int, start: int, stop: int) -> None:
        """Clear bytes [start, stop) of the block at `pfn` (no-op when empty)."""
        if start < stop:
            self.view(pfn, start, stop - start)[:] = _ZEROS[:stop - start]


class PageMap:
    """File page index -> PFN for one regular file (see the module docstring)."""

    # Region 0 lives in its own slot and the rest in a dict (region index -> entry, holes
    # absent) made only when the file reaches past 2 MiB: a small file's map is this
    # object and one short PFN array, and a sparse file costs only the regions it uses.
    __slots__ = ("_head", "_npages", "_tail")

    def __init__(self) -> None:
        self._head: Region = None
        self._tail: dict[int, Region] | None = None
        self._npages = 0

    # --- queries ---------------------------------------------------------------

    @property
    def npages(self) -> int:
        """Arena pages the file holds (a folio counts its 512 pages)."""
        return self._npages

    def blocks(self) -> int:
        """Allocated 512-byte blocks, for `st_blocks`."""
        return self._npages * SECTORS_PER_PAGE

    def allocations(self) -> int:
        """Blocks (order-0 pages and folios) the map holds, as the pool counts them."""
        folios = sum(isinstance(entry, int) for _, entry in self._entries())
        return self._npages - folios * (REGION_PAGES - 1)

    def read(self, pool: PagePool, off: int, size: int) -> bytes | memoryview:
        """The bytes [off, off + size); holes read as zeros.

        The caller clamps the range to the file size. A range that lies in one run of
        contiguous pages (one folio, or consecutive PFNs) comes back as a memoryview
        straight into the arena, without a copy.
        """
        if size <= 0:
            return b""
        parts = [_ZEROS[:length] if pfn == 0 else pool.view(pfn, at, length)
                 for length, pfn, at in self._segments(off, off + size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # --- changes ---------------------------------------------------------------

    def write(self, pool: PagePool, off: int, data: bytes | memoryview) -> bool:
        """Write `data` at `off`, allocating pages for holes; all or nothing: False, with
        nothing changed, when the arena cannot hold every page the write needs.

        Every page is allocated before any byte lands, so the map only ever points at
        pages it owns, and no write is stored in part: the kernel ignores a short count
        when it writes a mapping's dirty pages back, and would drop the rest unsaid.
        """
        src = memoryview(data).cast("B")
        end = off + len(src)
        if not self._back_range(pool, off, end, fill=True):
            return False
        for r, a, b in _region_spans(off, end):
            base = r * REGION_SIZE
            self._copy_in(pool, r, a, b, src[base + a - off:base + b - off])
        return True

    def allocate(self, pool: PagePool, off: int, length: int) -> bool:
        """Back [off, off + length) with zeroed pages (fallocate); all or nothing:
        False, with nothing changed, when the arena cannot hold the whole range."""
        return self._back_range(pool, off, off + length, fill=False)

    def _back_range(self, pool: PagePool, off: int, end: int, *, fill: bool) -> bool:
        undo: list[tuple[int, int]] = []
        for r, a, b in _region_spans(off, end):
            if self._back(pool, r, a, b, fill=fill, undo=undo) < b:
                self._undo(pool, undo)
                return False
        return True

    def truncate(self, pool: PagePool, new_size: int) -> None:
        """Drop everything past `new_size`: whole pages and folios are freed, the bytes
        past `new_size` in the last kept page (or kept folio) are zeroed."""
        keep = -(-new_size // REGION_SIZE)
        for r in self._region_indexes():
            if r >= keep:
                self._free_region(pool, r)
        cut = new_size - (keep - 1) * REGION_SIZE
        if keep and cut < REGION_SIZE:
            self._clear(pool, keep - 1, cut, REGION_SIZE)

    def punch_hole(self, pool: PagePool, off: int, length: int) -> None:
        """Make [off, off + length) a hole: whole pages and folios inside it are freed,
        the bytes of partly covered ones are zeroed."""
        end = off + length
        for r in self._region_indexes():
            base = r * REGION_SIZE
            a, b = max(off, base) - base, min(end, base + REGION_SIZE) - base
            if a >= b:
                continue
            if a == 0 and b == REGION_SIZE:
                self._free_region(pool, r)
            else:
                self._clear(pool, r, a, b)

    def release(self, pool: PagePool) -> None:
        """Free every page; the map is empty afterwards."""
        for r in self._region_indexes():
            self._free_region(pool, r)

    # --- the handover's view ---------------------------------------------------

    def extents(self) -> list[Extent]:
        """The map as (file_pgoff, pfn, npages, order) runs, in file order.

        Consecutive file pages on consecutive PFNs of the same order are one run (a run
        of order 9 is a whole number of folios).
        """
        out: list[Extent] = []
        for r, entry in self._entries():
            base = r * REGION_PAGES
            if isinstance(entry, int):
                _add_extent(out, base, entry, REGION_PAGES, FOLIO_ORDER)
            else:
                for i, n, pfn in _runs(entry):
                    if pfn:
                        _add_extent(out, base + i, pfn, n, 0)
        return out

    @classmethod
    def from_extents(cls, extents: Iterable[Extent]) -> PageMap:
        """Rebuild a map from `extents` output; ValueError on overlap or a malformed run."""
        pm = cls()
        for pgoff, pfn, npages, order in extents:
            if pgoff < 0 or pfn <= 0 or npages <= 0 or pfn + npages > 1 << 32:
                raise ValueError(f"bad extent {(pgoff, pfn, npages, order)}")
            if order == FOLIO_ORDER:
                pm._place_folios(pgoff, pfn, npages)
            elif order == 0:
                pm._place_pages(pgoff, pfn, npages)
            else:
                raise ValueError(f"extent of order {order}: only 0 and {FOLIO_ORDER} are used")
            pm._npages += npages
        return pm

    def pfn_arrays(self) -> dict[int, np.ndarray]:
        """{order: uint64 array of head PFNs} for bulk preserve/restore; only orders used."""
        folios: list[int] = []
        arrays: list[np.ndarray] = []
        for _, entry in self._entries():
            if isinstance(entry, int):
                folios.append(entry)
            else:
                view = _pfns(entry)
                arrays.append(view[view != 0])
        out: dict[int, np.ndarray] = {}
        if folios:
            out[FOLIO_ORDER] = np.array(folios, dtype=np.uint64)
        if arrays:
            out[0] = np.concatenate(arrays).astype(np.uint64)
        return out

    # --- internals: the region table --------------------------------------------

    def _region_indexes(self) -> list[int]:
        """The regions that hold pages, in file order."""
        head = [0] if self._head is not None else []
        return head + sorted(self._tail) if self._tail else head

    def _region(self, r: int) -> Region:
        if r == 0:
            return self._head
        return self._tail.get(r) if self._tail else None

    def _set_region(self, r: int, entry: Region) -> None:
        if r == 0:
            self._head = entry
        elif entry is not None:
            if self._tail is None:
                self._tail = {}
            self._tail[r] = entry
        elif self._tail:
            self._tail.pop(r, None)
            if not self._tail:
                self._tail = None

    def _entries(self) -> Iterator[tuple[int, int | array]]:
        """(region, entry) of every region that is not a hole, in file order."""
        for r in self._region_indexes():
            entry = self._region(r)
            assert entry is not None
            yield r, entry

    def _tidy(self, r: int) -> None:
        """Drop what a failed allocation left in region r: trailing holes of its page
        array, or the array itself when it holds no page at all."""
        if isinstance(self._region(r), array):
            self._shrink(r)

    def _pages_of(self, r: int) -> array:
        """Region r, known to be a page array."""
        entry = self._region(r)
        assert isinstance(entry, array), f"region {r} is not a page array"
        return entry

    def _page_array(self, r: int, length: int) -> array:
        """Region r (a hole or a page array) as a page array of at least `length` entries."""
        if self._region(r) is None:
            entry = _ZERO_PFN * length
            self._set_region(r, entry)
            return entry
        entry = self._pages_of(r)
        if len(entry) < length:
            entry = entry + _ZERO_PFN * (length - len(entry))
            self._set_region(r, entry)
        return entry

    def _shrink(self, r: int) -> None:
        """Cut trailing holes off region r's page array (a hole when nothing is left)."""
        entry = self._pages_of(r)
        used = np.flatnonzero(_pfns(entry))
        if not len(used):
            self._set_region(r, None)
        elif used[-1] + 1 < len(entry):
            self._set_region(r, entry[:used[-1] + 1])

    def _free_region(self, pool: PagePool, r: int) -> None:
        entry = self._region(r)
        if isinstance(entry, int):
            pool.free(entry, FOLIO_ORDER)
            self._npages -= REGION_PAGES
        elif entry is not None:
            for pfn in entry:
                if pfn:
                    pool.free(pfn, 0)
                    self._npages -= 1
        if entry is not None:
            self._set_region(r, None)

    # --- internals: allocation ---------------------------------------------------

    def _wants_folio(self, r: int, a: int, b: int) -> bool:
        if a == 0 and b == REGION_SIZE:
            return True
        return r > 0 and self._region(r - 1) is not None

    def _back(self, pool: PagePool, r: int, a: int, b: int, *, fill: bool,
              undo: list[tuple[int, int]] | None = None) -> int:
        """Give region-relative bytes [a, b) of region r pages; returns how far from `a`
        the range is backed (b unless the arena ran out).

        New pages are zeroed, except for [a, b) when the caller is about to `fill` it.
        Each new page or folio is noted in `undo` as (region, page index or -1 for a folio).
        """
        entry = self._region(r)
        if isinstance(entry, int):
            return b
        if entry is None and self._wants_folio(r, a, b):
            pfn = pool.alloc(FOLIO_ORDER)
            if pfn is not None:
                self._set_region(r, pfn)
                self._npages += REGION_PAGES
                _zero_new(pool, pfn, 0, REGION_SIZE, a, b, fill)
                if undo is not None:
                    undo.append((r, -1))
                return b
        return self._back_pages(pool, r, a, b, fill, undo)

    def _back_pages(self, pool: PagePool, r: int, a: int, b: int, fill: bool,
                    undo: list[tuple[int, int]] | None) -> int:
        p0, p1 = a // PAGE_SIZE, (b - 1) // PAGE_SIZE + 1
        arr = self._page_array(r, p1)
        for p in range(p0, p1):
            if arr[p]:
                continue
            pfn = pool.alloc(0)
            if pfn is None:
                return max(a, p * PAGE_SIZE)
            arr[p] = pfn
            self._npages += 1
            _zero_new(pool, pfn, p * PAGE_SIZE, PAGE_SIZE, a, b, fill)
            if undo is not None:
                undo.append((r, p))
        return b

    def _undo(self, pool: PagePool, undo: list[tuple[int, int]]) -> None:
        touched: set[int] = set()
        for r, p in reversed(undo):
            if p < 0:
                folio = self._region(r)
                assert isinstance(folio, int)
                pool.free(folio, FOLIO_ORDER)
                self._set_region(r, None)
                self._npages -= REGION_PAGES
            else:
                entry = self._pages_of(r)
                pool.free(entry[p], 0)
                entry[p] = 0
                self._npages -= 1
                touched.add(r)
        for r in touched:
            self._tidy(r)

    # --- internals: data ----------------------------------------------------------

    def _copy_in(self, pool: PagePool, r: int, a: int, b: int, chunk: memoryview) -> None:
        pos = 0
        for length, pfn, at in self._region_segments(r, a, b):
            pool.view(pfn, at, length)[:] = chunk[pos:pos + length]
            pos += length

    def _clear(self, pool: PagePool, r: int, a: int, b: int) -> None:
        """Region-relative [a, b) of region r reads as zeros afterwards: pages wholly
        inside are freed, partly covered pages and folios zeroed."""
        entry = self._region(r)
        if entry is None:
            return
        if isinstance(entry, int):
            pool.zero(entry, a, b)
            return
        first, last = -(-a // PAGE_SIZE), min(b // PAGE_SIZE, len(entry))
        for p in range(a // PAGE_SIZE, min((b - 1) // PAGE_SIZE + 1, len(entry))):
            pfn = entry[p]
            if not pfn:
                continue
            if first <= p < last:
                pool.free(pfn, 0)
                entry[p] = 0
                self._npages -= 1
            else:
                start = p * PAGE_SIZE
                pool.zero(pfn, max(a, start) - start, min(b, start + PAGE_SIZE) - start)
        self._shrink(r)

    def _segments(self, off: int, end: int) -> Iterator[tuple[int, int, int]]:
        for r, a, b in _region_spans(off, end):
            yield from self._region_segments(r, a, b)

    def _region_segments(self, r: int, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        """(length, pfn, byte offset from pfn) runs covering region-relative [a, b) of
        region r, in order; pfn 0 is a hole."""
        entry = self._region(r)
        if entry is None:
            yield b - a, 0, 0
            return
        if isinstance(entry, int):
            yield b - a, entry, a
            return
        p0, p1 = a // PAGE_SIZE, (b - 1) // PAGE_SIZE + 1
        pfns = _pfns(entry)[p0:p1]
        if len(pfns) < p1 - p0:
            pfns = np.concatenate([pfns, np.zeros(p1 - p0 - len(pfns), dtype=np.uint32)])
        pos = a
        for i, n, pfn in _runs(pfns):
            stop = min(b, (p0 + i + n) * PAGE_SIZE)
            yield stop - pos, pfn, (pos - (p0 + i) * PAGE_SIZE) if pfn else 0
            pos = stop

    # --- internals: rebuilding from extents ---------------------------------------

    def _place_folios(self, pgoff: int, pfn: int, npages: int) -> None:
        if pgoff % REGION_PAGES or npages % REGION_PAGES:
            raise ValueError(f"folio extent at page {pgoff} of {npages} pages is not "
                             "region-aligned")
        for k in range(npages // REGION_PAGES):
            r = pgoff // REGION_PAGES + k
            if self._region(r) is not None:
                raise ValueError(f"extents overlap in region {r}")
            self._set_region(r, pfn + k * REGION_PAGES)

    def _place_pages(self, pgoff: int, pfn: int, npages: int) -> None:
        while npages:
            r, i = divmod(pgoff, REGION_PAGES)
            n = min(npages, REGION_PAGES - i)
            if isinstance(self._region(r), int):
                raise ValueError(f"extents overlap in region {r}")
            if i == 0 and self._region(r) is None:
                # The usual case (a small file's run): no numpy for a few pages.
                self._set_region(r, array("I", range(pfn, pfn + n)))
                pgoff, pfn, npages = pgoff + n, pfn + n, npages - n
                continue
            view = _pfns(self._page_array(r, i + n))
            if view[i:i + n].any():
                raise ValueError(f"extents overlap at page {pgoff}")
            view[i:i + n] = np.arange(pfn, pfn + n, dtype=np.uint32)
            pgoff, pfn, npages = pgoff + n, pfn + n, npages - n


def _region_spans(off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(region, start, stop) with region-relative byte offsets covering [off, end)."""
    while off < end:
        r = off // REGION_SIZE
        base = r * REGION_SIZE
        stop = min(end, base + REGION_SIZE)
        yield r, off - base, stop - base
        off = stop


def _pfns(entry: array) -> np.ndarray:
    """A writable numpy view of a page array (no copy)."""
    return np.frombuffer(entry, dtype=np.uint32)


_SMALL_RUN_SCAN = 64   # below this many pages a plain loop beats numpy's per-call cost


def _runs(pfns: np.ndarray | array) -> list[tuple[int, int, int]]:
    """Split a PFN array into (index, count, first pfn) runs of consecutive PFNs; a run
    of holes has first pfn 0."""
    if len(pfns) <= _SMALL_RUN_SCAN:
        return _runs_small(pfns.tolist())
    p = (pfns if isinstance(pfns, np.ndarray) else _pfns(pfns)).astype(np.int64)
    prev, cur = p[:-1], p[1:]
    joined = ((cur == prev + 1) & (prev != 0)) | ((prev == 0) & (cur == 0))
    starts = np.concatenate(([0], np.flatnonzero(~joined) + 1))
    counts = np.diff(np.append(starts, len(p)))
    return list(zip(starts.tolist(), counts.tolist(), p[starts].tolist(), strict=True))


def _runs_small(p: list[int]) -> list[tuple[int, int, int]]:
    """`_runs` of a short list, the same runs without numpy (the handover of many small
    files spends its time here)."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(p)):
        prev, cur = p[i - 1], p[i]
        if not (cur == prev + 1 and prev) and (prev or cur):
            out.append((start, i - start, p[start]))
            start = i
    out.append((start, len(p) - start, p[start]))
    return out


def _zero_new(pool: PagePool, pfn: int, start: int, size: int, a: int, b: int,
              fill: bool) -> None:
    """Zero a new block holding region bytes [start, start + size), all of it or, when
    the caller fills [a, b), the rest."""
    if fill:
        pool.zero(pfn, 0, a - start)
        pool.zero(pfn, b - start, size)
    else:
        pool.zero(pfn, 0, size)


def _add_extent(out: list[Extent], pgoff: int, pfn: int, npages: int, order: int) -> None:
    if out:
        last_off, last_pfn, last_n, last_order = out[-1]
        if (last_order == order and last_off + last_n == pgoff
                and last_pfn + last_n == pfn):
            out[-1] = (last_off, last_pfn, last_n + npages, order)
            return
    out.append((pgoff, pfn, npages, order))
