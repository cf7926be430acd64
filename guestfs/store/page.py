"""The header every metadata page starts with (docs/handover-abi.md, "Metadata pages").

    0   u32  magic     which structure the page holds (`Kind`)
    4   u32  crc32     of the whole 4096-byte page with this field taken as zero
    8   u64  owner     the inode the page belongs to (0: the filesystem itself)

The checksum is sealed when the transaction that changed the page commits, and checked
the first time a mount reads the page (`Pages.read`): a page that fails it is never
trusted, and the operation that met it fails with EIO naming it.
"""

from __future__ import annotations

import enum
import struct
import zlib

from kho_backend.arena import Arena
from kho_backend.checksum import crc32_at, stored_crc32
from kho_backend.units import PAGE_SHIFT

HEADER = struct.Struct("<IIQ")
HEADER_SIZE = HEADER.size
_MAGIC = struct.Struct("<I")
_ZERO_PAGE = bytes(1 << PAGE_SHIFT)
CRC_OFFSET = 4
CRC = struct.Struct("<I")


def _magic(tag: bytes) -> int:
    return int.from_bytes(tag, "little")


class Kind(enum.IntEnum):
    """The structure a metadata page holds, by its magic."""

    SUPERBLOCK = _magic(b"GSB2")
    RECORDS = _magic(b"GIR2")       # a page of inode records
    RADIX = _magic(b"GRX2")         # a radix table node
    BTREE = _magic(b"GBT2")         # a B+tree node
    PAGE_ARRAY = _magic(b"GPA2")    # a file region's PFNs
    BLOB = _magic(b"GBL2")          # a piece of a blob
    JOURNAL = _magic(b"GJN2")       # the journal's header page


class CorruptPage(Exception):
    """A metadata page failed a check: never trusted, reported with what it is."""

    def __init__(self, pfn: int, what: str) -> None:
        super().__init__(f"metadata page {pfn} is corrupt: {what}")
        self.pfn = pfn


def describe(kind: int) -> str:
    """A kind's name for messages, or the unknown magic."""
    try:
        return Kind(kind).name.lower().replace("_", " ")
    except ValueError:
        return f"unknown magic {kind:#010x}"


class Pages:
    """Checked access to metadata pages: each page's checksum and magic are verified the
    first time it is read in this mount, then it is trusted until it changes."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        # One byte per page (a bytearray: indexing one costs a fraction of a numpy
        # scalar's, and every metadata read and seal does it).
        self._verified = bytearray(arena.npages)
        self._all = arena.view(0, arena.npages)     # sliced per read: no call per page
        self._npages = arena.npages

    def read(self, pfn: int, kind: Kind) -> memoryview:
        """The page, after checking (once) that it is a sound page of `kind`."""
        if not 0 <= pfn < self._npages:
            self.arena.view(pfn)                    # raises ArenaError, naming the page
        view = self._all[pfn << PAGE_SHIFT:(pfn + 1) << PAGE_SHIFT]
        if not self._verified[pfn]:
            self._check(pfn, view, kind)
            self._verified[pfn] = 1
        elif _MAGIC.unpack_from(view)[0] != kind:
            raise CorruptPage(pfn, f"it holds a {describe(_MAGIC.unpack_from(view)[0])}, "
                                   f"not a {describe(kind)}")
        return view

    def owner(self, pfn: int) -> int:
        """The owner field of a page already read."""
        return HEADER.unpack_from(self.arena.view(pfn))[2]

    def init(self, pfn: int, kind: Kind, owner: int) -> memoryview:
        """A new page of `kind`: zeroed, with its header (the checksum comes at seal)."""
        view = self.arena.view(pfn)
        view[:] = _ZERO_PAGE
        HEADER.pack_into(view, 0, kind, 0, owner)
        self._verified[pfn] = 1
        return view

    def seal(self, pfn: int) -> None:
        """Write the page's checksum (its transaction is committing): the CRC32 of the
        page with the field zero, as `seal_crc32` computes it, in one pass over the page
        (the field is zeroed first; until the commit point the journal undoes the page
        whatever it holds)."""
        view = self._all[pfn << PAGE_SHIFT:(pfn + 1) << PAGE_SHIFT]   # a page read before
        CRC.pack_into(view, CRC_OFFSET, 0)
        CRC.pack_into(view, CRC_OFFSET, zlib.crc32(view))
        self._verified[pfn] = 1

    def forget(self, pfn: int) -> None:
        """The page may change outside a transaction (freed, restored by recovery)."""
        self._verified[pfn] = 0

    def forget_all(self) -> None:
        """Check every page again at its next read (a full check trusts nothing)."""
        self._verified[:] = bytes(self._npages)

    @staticmethod
    def _check(pfn: int, view: memoryview, kind: Kind) -> None:
        magic = HEADER.unpack_from(view)[0]
        if magic != kind:
            raise CorruptPage(pfn, f"it holds a {describe(magic)}, not a {describe(kind)}")
        stored, actual = stored_crc32(view, CRC_OFFSET), crc32_at(view, CRC_OFFSET)
        if stored != actual:
            raise CorruptPage(pfn, f"its {describe(kind)} checksum is {stored:#010x} but "
                                   f"its contents give {actual:#010x}")
