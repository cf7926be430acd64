"""File page maps: which arena pages hold each page of a regular file
(docs/handover-abi.md, "Page map").

A file is cut into 2 MiB *regions*. A region is a hole, one order-9 folio (2 MiB of
contiguous pages), or a page array: a metadata page of 512 u32 PFNs, one per 4 KiB page
(0 for a hole). The regions of a file are a radix table (`guestfs.store.radix`) whose
root is in the inode's record; a value there is a region entry:

    0            a hole
    pfn << 1 | 1 a folio whose head is pfn
    pfn << 1     a page array in page pfn

A small file (pages only in its first 6, all in region 0) keeps their PFNs in its record
instead (`Inode.inline`), so it costs no page of metadata at all.

Policy. A region gets a folio when a write (or fallocate) covers all of it, or when the
region before it already holds data (the file is growing region by region, as large
files do); otherwise, and whenever no order-9 block is free, it gets order-0 pages. As
with shmem's ``huge=always``, a file that ends just past a region boundary owns the
whole folio of its last region. A folio is never split.

Bytes past the end of the file in its last page or folio are not cleared when the file
shrinks (that would be a change a crash could leave half-done inside the file); they
are cleared when the file grows over them again (`zero_past_end`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from guestfs.inode import Inode
from guestfs.store.journal import Txn
from guestfs.store.page import HEADER_SIZE, CorruptPage, Kind, Pages
from guestfs.store.radix import Radix, RadixRoot
from guestfs.store.records import INLINE_PFNS
from kho_backend.errors import OutOfMemory
from kho_backend.units import PAGE_SHIFT, PAGE_SIZE

FOLIO_ORDER = 9
REGION_PAGES = 1 << FOLIO_ORDER
REGION_SIZE = REGION_PAGES * PAGE_SIZE
Extent = tuple[int, int, int, int]   # (file_pgoff, pfn, npages, order)
PAGE_MASK = PAGE_SIZE - 1
_U32 = struct.Struct("<I")

# A read-only source of zeros for holes and for clearing pages (no region span is larger).
_ZEROS = memoryview(bytes(REGION_SIZE))
_SMALL_RUN_SCAN = 64   # below this many pages a plain loop beats numpy's per-call cost


class NoRoom(Exception):
    """The arena cannot hold what a write or fallocate needs (the caller rolls back)."""


@dataclass(frozen=True)
class Keep:
    """What the caller of a bulk free keeps of its transaction for its own changes
    afterwards (pages to change, journal entries)."""

    pages: int
    entries: int


def folio_entry(pfn: int) -> int:
    """The region entry of a folio."""
    return pfn << 1 | 1


def array_entry(pfn: int) -> int:
    """The region entry of a page array."""
    return pfn << 1


class PageMaps:
    """Reads and changes the page maps of regular files. `room(npages)` says whether
    file data may take that many more pages (the filesystem keeps some for metadata)."""

    def __init__(self, pages: Pages, room: Callable[[int], bool]) -> None:
        self.pages = pages
        self.arena = pages.arena
        self.room = room

    # --- reading -----------------------------------------------------------------------

    def read(self, inode: Inode, off: int, size: int) -> bytes | memoryview:
        """Bytes [off, off + size) (the caller clamps them to the file); holes read as
        zeros. A range in one run of contiguous pages comes back as a view into the
        arena, without a copy."""
        if size <= 0:
            return b""
        in_page = off & PAGE_MASK
        if in_page + size <= PAGE_SIZE:     # within one page: the usual small read
            pfn = self._pfn(inode, off >> PAGE_SHIFT)
            return self._view(pfn, in_page, size) if pfn else _ZEROS[:size]
        parts = [_ZEROS[:length] if pfn == 0 else self._view(pfn, at, length)
                 for length, pfn, at in self._segments(inode, off, off + size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def extents(self, inode: Inode) -> list[Extent]:
        """The map as (file_pgoff, pfn, npages, order) runs, in file order; consecutive
        file pages on consecutive PFNs of the same order are one run."""
        out: list[Extent] = []
        for r, entry in self._regions(inode):
            base = r * REGION_PAGES
            if isinstance(entry, int):
                _add_extent(out, base, entry, REGION_PAGES, FOLIO_ORDER)
            else:
                for i, n, pfn in _runs(entry):
                    if pfn:
                        _add_extent(out, base + i, pfn, n, 0)
        return out

    def blocks(self, inode: Inode) -> Iterator[tuple[int, int]]:
        """(pfn, order) of every data block of the file (for the full check)."""
        for _r, entry in self._regions(inode):
            if isinstance(entry, int):
                yield entry, FOLIO_ORDER
            else:
                for pfn in np.asarray(entry)[np.asarray(entry) != 0].tolist():
                    yield pfn, 0

    def meta_pages(self, inode: Inode) -> Iterator[int]:
        """Every metadata page of the map: radix nodes and page arrays."""
        if inode.inline:
            return
        table = _table(inode)
        yield from self._radix(inode).nodes(table)
        for _r, entry in self._radix(inode).items(table):
            if not entry & 1:
                yield entry >> 1

    # --- changing ----------------------------------------------------------------------

    def write(self, txn: Txn, inode: Inode, off: int, data: bytes | memoryview) -> None:
        """Store `data` at `off`, backing holes with new pages first (NoRoom if the arena
        cannot hold them all: the caller's transaction then rolls back, and no byte of
        `data` was stored). The caller sets the size and writes the record."""
        src = memoryview(data).cast("B")
        end = off + len(src)
        if self._overwrite(inode, off, src):
            return
        self._back(txn, inode, off, end, fill=True)
        pos = 0
        for length, pfn, at in self._segments(inode, off, end):
            self._view(pfn, at, length)[:] = src[pos:pos + length]
            pos += length

    def _overwrite(self, inode: Inode, off: int, src: memoryview) -> bool:
        """Store `src` at `off` if it lies in one folio or one page that the file holds
        already (the common small overwrite: nothing to allocate, the map read once);
        False, with nothing stored, otherwise."""
        in_page = off & PAGE_MASK
        if in_page + len(src) <= PAGE_SIZE:     # within one page: the usual small write
            pfn = self._pfn(inode, off >> PAGE_SHIFT)
            if not pfn:
                return False
            self._view(pfn, in_page, len(src))[:] = src
            return True
        r, at = divmod(off, REGION_SIZE)
        if at + len(src) > REGION_SIZE:
            return False
        entry = self._entry(inode, r)
        if isinstance(entry, int):
            if not entry:
                return False
            self._view(entry, at, len(src))[:] = src
            return True
        p, in_page = divmod(at, PAGE_SIZE)
        if in_page + len(src) > PAGE_SIZE or p >= len(entry) or not entry[p]:
            return False
        self._view(int(entry[p]), in_page, len(src))[:] = src
        return True

    def allocate(self, txn: Txn, inode: Inode, off: int, length: int) -> None:
        """Back [off, off + length) with zeroed pages (fallocate); NoRoom as `write`."""
        self._back(txn, inode, off, off + length, fill=False)

    def adopt(self, txn: Txn, inode: Inode, extents: list[Extent]) -> None:
        """Map blocks that hold the file's data already (a converted handover): each
        (file_pgoff, pfn, npages, order) run at its file pages; folios must start on a
        region. The caller owns the blocks and writes the record."""
        for pgoff, pfn, npages, order in extents:
            if order == FOLIO_ORDER:
                for k in range(0, npages, REGION_PAGES):
                    self._set_entry(txn, inode, (pgoff + k) // REGION_PAGES,
                                    folio_entry(pfn + k))
            else:
                for k in range(npages):
                    self._adopt_page(txn, inode, pgoff + k, pfn + k)
            inode.npages += npages

    def zero_past_end(self, inode: Inode, old_size: int, new_end: int) -> None:
        """The file grows from `old_size` to `new_end`: clear what its last page or folio
        still holds past the old end (pages past it are holes or zeroed already)."""
        if new_end <= old_size or not (inode.inline or inode.map_root):
            return
        r = old_size // REGION_SIZE
        entry = self._entry(inode, r)
        block = REGION_SIZE if isinstance(entry, int) and entry else PAGE_SIZE
        stop = min(new_end, -(-old_size // block) * block)
        for length, pfn, at in self._segments(inode, old_size, stop):
            if pfn:
                self._view(pfn, at, length)[:] = _ZEROS[:length]

    def truncate(self, txn: Txn, inode: Inode, new_size: int, keep: Keep) -> bool:
        """Free the pages and folios wholly past `new_size`, as many as the transaction
        can take while it keeps `keep` for the caller; True when none is left."""
        keep_regions = -(-new_size // REGION_SIZE)
        first_page = -(-new_size // PAGE_SIZE)
        # A region changes its page array and the map's path to it, and may free both.
        over = 2 + inode.map_height
        for r, entry in reversed(list(self._regions(inode))):
            if r < keep_regions - 1:
                break               # regions are in file order: the rest lie inside
            if not txn.affords(keep.pages + over, keep.entries + 2 * over + 1):
                return False
            if isinstance(entry, int):
                if r >= keep_regions:
                    self._free_folio(txn, inode, r, entry)
                continue
            start = 0 if r >= keep_regions else first_page - r * REGION_PAGES
            budget = txn.room() - keep.entries - 2 * over
            if not self._free_pages_from(txn, inode, r, start, budget):
                return False
        return True

    def punch_hole(self, txn: Txn, inode: Inode, off: int, length: int) -> None:
        """Make [off, off + length) read as zeros: whole pages and folios inside it are
        freed, partly covered ones cleared."""
        end = off + length
        for r, entry in list(self._regions(inode)):
            base = r * REGION_SIZE
            a, b = max(off, base) - base, min(end, base + REGION_SIZE) - base
            if a >= b:
                continue
            if isinstance(entry, int):
                if a == 0 and b == REGION_SIZE:
                    self._free_folio(txn, inode, r, entry)
                else:
                    self._view(entry, a, b - a)[:] = _ZEROS[:b - a]
                continue
            self._clear_pages(txn, inode, r, a, b)

    def release(self, txn: Txn, inode: Inode, keep: Keep) -> bool:
        """Free every page of the file (as `truncate`; True when done), then the map's
        own pages."""
        inline = inode.inline
        if inline and txn.affords(keep.pages, keep.entries + len(inline)):
            for pfn in inline:          # a small file: its pages are in its record
                if pfn:
                    txn.free(pfn)
            inode.npages -= sum(1 for pfn in inline if pfn)
            inode.inline = ()
            return True
        if not self.truncate(txn, inode, 0, keep):
            return False
        if not inode.inline:
            table = _table(inode)
            self._radix(inode).free_all(txn, table)
            _set_table(inode, table)
        inode.inline = ()
        return True

    # --- internals: the region table ------------------------------------------------------

    def _radix(self, inode: Inode) -> Radix:
        return Radix(self.pages, inode.ino)

    def _entry(self, inode: Inode, r: int) -> int | np.ndarray | tuple:
        """Region r: 0 (hole), a folio's head PFN (int), or its PFNs (array or tuple)."""
        if inode.inline:
            return inode.inline if r == 0 else 0
        return self._decode(self._radix(inode).get(_table(inode), r))

    def _pfn(self, inode: Inode, p: int) -> int:
        """The page that holds file page `p`, 0 for a hole (without the numpy view of a
        page array that `_entry` makes: a small read or write needs one slot)."""
        inline = inode.inline
        if inline:
            return inline[p] if p < len(inline) else 0
        if not inode.map_root:
            return 0
        r, i = divmod(p, REGION_PAGES)
        raw = self._radix(inode).get(_table(inode), r)
        if not raw:
            return 0
        if raw & 1:
            return (raw >> 1) + i
        view = self.pages.read(raw >> 1, Kind.PAGE_ARRAY)
        return _U32.unpack_from(view, HEADER_SIZE + 4 * i)[0]

    def _decode(self, raw: int) -> int | np.ndarray:
        if not raw:
            return 0
        if raw & 1:
            return raw >> 1
        return self._array(raw >> 1)

    def _regions(self, inode: Inode) -> Iterator[tuple[int, int | np.ndarray | tuple]]:
        """(region, entry) of every region that is not a hole, in file order."""
        if inode.inline:
            yield 0, inode.inline
            return
        for r, raw in list(self._radix(inode).items(_table(inode))):
            yield r, self._decode(raw)

    def _array(self, pfn: int) -> np.ndarray:
        view = self.pages.read(pfn, Kind.PAGE_ARRAY)
        return np.frombuffer(view, dtype="<u4", count=REGION_PAGES, offset=HEADER_SIZE)

    def _array_w(self, txn: Txn, pfn: int) -> np.ndarray:
        view = txn.write(pfn, Kind.PAGE_ARRAY)
        return np.frombuffer(view, dtype="<u4", count=REGION_PAGES, offset=HEADER_SIZE)

    def _set_entry(self, txn: Txn, inode: Inode, r: int, raw: int) -> None:
        self._leave_inline(txn, inode)
        table = _table(inode)
        self._radix(inode).set(txn, table, r, raw)
        _set_table(inode, table)

    def _leave_inline(self, txn: Txn, inode: Inode) -> None:
        """Move inline PFNs into a page array of region 0 (the map needs a table)."""
        if not inode.inline:
            return
        pfns, inode.inline = inode.inline, ()
        page = txn.new_page(Kind.PAGE_ARRAY, inode.ino)
        self._array_w(txn, page)[:len(pfns)] = pfns
        table = _table(inode)
        self._radix(inode).set(txn, table, 0, array_entry(page))
        _set_table(inode, table)

    def _adopt_page(self, txn: Txn, inode: Inode, p: int, pfn: int) -> None:
        if p < INLINE_PFNS and (inode.inline or not inode.map_root):
            inode.inline = tuple(list(inode.inline) + [0] * (p + 1 - len(inode.inline)))
            inode.inline = inode.inline[:p] + (pfn,) + inode.inline[p + 1:]
            return
        self._leave_inline(txn, inode)
        r = p // REGION_PAGES
        raw = self._radix(inode).get(_table(inode), r)
        if not raw:
            raw = array_entry(txn.new_page(Kind.PAGE_ARRAY, inode.ino))
            self._set_entry(txn, inode, r, raw)
        self._array_w(txn, raw >> 1)[p % REGION_PAGES] = pfn

    # --- internals: allocation -------------------------------------------------------------

    def _alloc(self, txn: Txn, order: int) -> int:
        if not self.room(1 << order):
            raise NoRoom(f"no room for {1 << order} more pages of file data")
        try:
            return txn.alloc(order)
        except OutOfMemory:
            raise NoRoom(f"no free block of order {order}") from None

    def _back(self, txn: Txn, inode: Inode, off: int, end: int, *, fill: bool) -> None:
        for r, a, b in _region_spans(off, end):
            entry = self._entry(inode, r)
            if isinstance(entry, int):
                if entry:
                    continue
            elif _backed(entry, a, b):
                continue        # an overwrite: the page array stays as it is, unjournaled
            if isinstance(entry, int) and self._wants_folio(inode, r, a, b):
                pfn = self._try_folio(txn)
                if pfn:
                    self._set_entry(txn, inode, r, folio_entry(pfn))
                    inode.npages += REGION_PAGES
                    self._zero_new(pfn, 0, REGION_SIZE, a, b, fill)
                    continue
            self._back_pages(txn, inode, r, a, b, fill)

    def _try_folio(self, txn: Txn) -> int:
        try:
            return self._alloc(txn, FOLIO_ORDER)
        except NoRoom:
            return 0            # order-0 pages may still fit

    def _wants_folio(self, inode: Inode, r: int, a: int, b: int) -> bool:
        if a == 0 and b == REGION_SIZE:
            return True
        return r > 0 and _holds_data(self._entry(inode, r - 1))

    def _back_pages(self, txn: Txn, inode: Inode, r: int, a: int, b: int,
                    fill: bool) -> None:
        p0, p1 = a // PAGE_SIZE, (b - 1) // PAGE_SIZE + 1
        if r == 0 and p1 <= INLINE_PFNS and (inode.inline or not inode.map_root):
            pfns = list(inode.inline) + [0] * (p1 - len(inode.inline))
            self._fill_pages(txn, inode, pfns, p0, p1, a, b, fill)
            inode.inline = tuple(pfns)
            return
        self._leave_inline(txn, inode)
        raw = self._radix(inode).get(_table(inode), r)
        if raw:
            slots = self._array_w(txn, raw >> 1)
        else:
            page = txn.new_page(Kind.PAGE_ARRAY, inode.ino)
            self._set_entry(txn, inode, r, array_entry(page))
            slots = self._array_w(txn, page)
        self._fill_pages(txn, inode, slots, p0, p1, a, b, fill)

    def _fill_pages(self, txn: Txn, inode: Inode, slots: list[int] | np.ndarray, p0: int,
                    p1: int, a: int, b: int, fill: bool) -> None:
        for p in range(p0, p1):
            if slots[p]:
                continue
            pfn = self._alloc(txn, 0)
            slots[p] = pfn
            inode.npages += 1
            self._zero_new(pfn, p * PAGE_SIZE, PAGE_SIZE, a, b, fill)

    def _zero_new(self, pfn: int, start: int, size: int, a: int, b: int, fill: bool) -> None:
        """Zero a new block holding region bytes [start, start + size): all of it, or,
        when the caller fills [a, b), the rest."""
        if fill:
            self._zero(pfn, 0, a - start)
            self._zero(pfn, b - start, size)
        else:
            self._zero(pfn, 0, size)

    # --- internals: freeing ----------------------------------------------------------------

    def _free_folio(self, txn: Txn, inode: Inode, r: int, pfn: int) -> None:
        txn.free(pfn, FOLIO_ORDER)
        inode.npages -= REGION_PAGES
        self._set_entry(txn, inode, r, 0)

    def _free_pages_from(self, txn: Txn, inode: Inode, r: int, first: int,
                         budget: int) -> bool:
        """Free region r's pages from index `first` on, the last ones first and at most
        `budget` of them (a page array left empty goes too); whether none is left from
        `first` on."""
        first = max(first, 0)
        if inode.inline:
            pfns = list(inode.inline)
            used = [p for p in range(first, len(pfns)) if pfns[p]][::-1][:budget]
            for p in used:
                txn.free(pfns[p])
                pfns[p] = 0
            inode.npages -= len(used)
            inode.inline = _trimmed(pfns)
            return not any(pfns[first:])
        raw = self._radix(inode).get(_table(inode), r)
        slots = self._array_w(txn, raw >> 1)
        used = np.flatnonzero(slots[first:])[::-1][:budget] + first
        for pfn in slots[used].tolist():
            txn.free(pfn)
        slots[used] = 0
        inode.npages -= len(used)
        done = not slots[first:].any()
        if not slots.any():
            txn.free(raw >> 1)
            self._set_entry(txn, inode, r, 0)
        return done

    def _clear_pages(self, txn: Txn, inode: Inode, r: int, a: int, b: int) -> None:
        """Region-relative [a, b) of a page-array region reads as zeros afterwards: pages
        wholly inside are freed, partly covered ones cleared."""
        entry = self._entry(inode, r)
        whole_first, whole_last = -(-a // PAGE_SIZE), b // PAGE_SIZE
        for p in range(a // PAGE_SIZE, min((b - 1) // PAGE_SIZE + 1, len(entry))):
            pfn = int(entry[p])
            if not pfn:
                continue
            if whole_first <= p < whole_last:
                self._drop_page(txn, inode, r, p)
            else:
                start = p * PAGE_SIZE
                self._zero(pfn, max(a, start) - start, min(b, start + PAGE_SIZE) - start)

    def _drop_page(self, txn: Txn, inode: Inode, r: int, p: int) -> None:
        if inode.inline:
            pfns = list(inode.inline)
            txn.free(pfns[p])
            pfns[p] = 0
            inode.inline = _trimmed(pfns)
        else:
            raw = self._radix(inode).get(_table(inode), r)
            slots = self._array_w(txn, raw >> 1)
            txn.free(int(slots[p]))
            slots[p] = 0
            if not slots.any():
                txn.free(raw >> 1)
                self._set_entry(txn, inode, r, 0)
        inode.npages -= 1

    # --- internals: data -------------------------------------------------------------------

    def _view(self, pfn: int, offset: int, length: int) -> memoryview:
        """Writable view of `length` bytes `offset` bytes into the block at `pfn`."""
        first = offset // PAGE_SIZE
        npages = (offset + length - 1) // PAGE_SIZE - first + 1
        start = offset - first * PAGE_SIZE
        if pfn + first + npages > self.arena.npages:
            raise CorruptPage(pfn, "a page map points past the end of the arena")
        return self.arena.view(pfn + first, npages)[start:start + length]

    def _zero(self, pfn: int, start: int, stop: int) -> None:
        if start < stop:
            self._view(pfn, start, stop - start)[:] = _ZEROS[:stop - start]

    def _segments(self, inode: Inode, off: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(length, pfn, byte offset from pfn) runs covering [off, end), in order; pfn 0
        is a hole."""
        for r, a, b in _region_spans(off, end):
            entry = self._entry(inode, r)
            if isinstance(entry, int):
                yield (b - a, 0, 0) if not entry else (b - a, entry, a)
                continue
            p0, p1 = a // PAGE_SIZE, (b - 1) // PAGE_SIZE + 1
            if p1 - p0 == 1:    # within one page (a small request): no numpy
                pfn = int(entry[p0]) if p0 < len(entry) else 0
                yield b - a, pfn, (a - p0 * PAGE_SIZE) if pfn else 0
                continue
            pfns = np.asarray(entry, dtype=np.uint32)[p0:p1]
            if len(pfns) < p1 - p0:
                pfns = np.concatenate([pfns, np.zeros(p1 - p0 - len(pfns), dtype=np.uint32)])
            pos = a
            for i, n, pfn in _runs(pfns):
                stop = min(b, (p0 + i + n) * PAGE_SIZE)
                yield stop - pos, pfn, (pos - (p0 + i) * PAGE_SIZE) if pfn else 0
                pos = stop


def _backed(pfns: np.ndarray | tuple, a: int, b: int) -> bool:
    """Whether every page of region bytes [a, b) has a page in `pfns` already."""
    p0, p1 = a // PAGE_SIZE, (b - 1) // PAGE_SIZE + 1
    if p1 > len(pfns):
        return False
    if p1 - p0 == 1:
        return bool(pfns[p0])
    return bool(np.all(np.asarray(pfns)[p0:p1]))


def _holds_data(entry: int | np.ndarray | tuple) -> bool:
    return not isinstance(entry, int) or entry != 0


def _table(inode: Inode) -> RadixRoot:
    return RadixRoot(inode.map_root, inode.map_height)


def _set_table(inode: Inode, table: RadixRoot) -> None:
    inode.map_root, inode.map_height = table.root, table.height


def _trimmed(pfns: list[int]) -> tuple[int, ...]:
    while pfns and not pfns[-1]:
        pfns.pop()
    return tuple(pfns)


def _region_spans(off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(region, start, stop) with region-relative byte offsets covering [off, end)."""
    while off < end:
        r = off // REGION_SIZE
        base = r * REGION_SIZE
        stop = min(end, base + REGION_SIZE)
        yield r, off - base, stop - base
        off = stop


def _runs(pfns: np.ndarray | tuple) -> list[tuple[int, int, int]]:
    """Split a PFN array into (index, count, first pfn) runs of consecutive PFNs; a run
    of holes has first pfn 0."""
    if len(pfns) <= _SMALL_RUN_SCAN:
        return _runs_small(list(pfns) if isinstance(pfns, tuple) else pfns.tolist())
    p = np.asarray(pfns).astype(np.int64)
    prev, cur = p[:-1], p[1:]
    joined = ((cur == prev + 1) & (prev != 0)) | ((prev == 0) & (cur == 0))
    starts = np.concatenate(([0], np.flatnonzero(~joined) + 1))
    counts = np.diff(np.append(starts, len(p)))
    return list(zip(starts.tolist(), counts.tolist(), p[starts].tolist(), strict=True))


def _runs_small(p: list[int]) -> list[tuple[int, int, int]]:
    """`_runs` of a short list, without numpy."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(p)):
        prev, cur = p[i - 1], p[i]
        if not (cur == prev + 1 and prev) and (prev or cur):
            out.append((start, i - start, p[start]))
            start = i
    if p:
        out.append((start, len(p) - start, p[start]))
    return out


def _add_extent(out: list[Extent], pgoff: int, pfn: int, npages: int, order: int) -> None:
    if out:
        last_off, last_pfn, last_n, last_order = out[-1]
        if (last_order == order and last_off + last_n == pgoff
                and last_pfn + last_n == pfn):
            out[-1] = (last_off, last_pfn, last_n + npages, order)
            return
    out.append((pgoff, pfn, npages, order))
