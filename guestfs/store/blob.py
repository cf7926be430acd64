"""A byte string in a chain of pages (docs/handover-abi.md, "Blob"): an inode's
extended attributes, a symlink target too long for its record.

A blob is written whole into new pages and replaced whole (the owner then points at
the new chain in the same transaction and frees the old one), so a reader never sees
half of one.

    each page: page header (magic GBL2, crc32, owner), then
      16  u32 next PFN (0: the last page), u32 bytes used in this page
      24  the bytes
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

from guestfs.store.journal import Txn
from guestfs.store.page import HEADER_SIZE, CorruptPage, Kind, Pages
from kho_backend.units import PAGE_SIZE

LINK = struct.Struct("<II")
DATA_OFFSET = HEADER_SIZE + LINK.size
PER_PAGE = PAGE_SIZE - DATA_OFFSET
#: The longest blob a reader follows (a cycle or a corrupt link must end somewhere).
MAX_BLOB = 64 << 20


def write(txn: Txn, data: bytes, owner: int) -> int:
    """Store `data` in new pages; returns the first PFN (0 for no bytes)."""
    first = prev = 0
    for start in range(0, len(data), PER_PAGE):
        chunk = data[start:start + PER_PAGE]
        pfn = txn.new_page(Kind.BLOB, owner)
        view = txn.write(pfn, Kind.BLOB)
        LINK.pack_into(view, HEADER_SIZE, 0, len(chunk))
        view[DATA_OFFSET:DATA_OFFSET + len(chunk)] = chunk
        if prev:
            struct.pack_into("<I", txn.write(prev, Kind.BLOB), HEADER_SIZE, pfn)
        else:
            first = pfn
        prev = pfn
    return first


def read(pages: Pages, first: int) -> bytes:
    """The whole blob that starts at `first` (b"" for 0)."""
    return b"".join(bytes(pages.read(pfn, Kind.BLOB)[DATA_OFFSET:DATA_OFFSET + n])
                    for pfn, n in _chain(pages, first))


def free(txn: Txn, pages: Pages, first: int) -> None:
    """Free every page of the blob."""
    for pfn, _ in list(_chain(pages, first)):
        txn.free(pfn)


def spans_pages(pages: Pages, first: int, n: int) -> bool:
    """Whether the blob at `first` has more than `n` pages (reads at most n + 1)."""
    return any(True for _ in itertools.islice(_chain(pages, first), n, n + 1))


def chain_pages(pages: Pages, first: int) -> Iterator[int]:
    """Every page of the blob (for the full check)."""
    for pfn, _ in _chain(pages, first):
        yield pfn


def _chain(pages: Pages, first: int) -> Iterator[tuple[int, int]]:
    pfn, total = first, 0
    while pfn:
        view = pages.read(pfn, Kind.BLOB)
        nxt, used = LINK.unpack_from(view, HEADER_SIZE)
        if used > PER_PAGE or (nxt and used != PER_PAGE):
            raise CorruptPage(pfn, f"a blob page claims {used} bytes")
        total += used
        if total > MAX_BLOB:
            raise CorruptPage(pfn, "a blob runs on past any this filesystem writes")
        yield pfn, used
        pfn = nxt
