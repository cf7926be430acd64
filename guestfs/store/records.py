"""The inode record and the inode table (docs/handover-abi.md, "Inode table").

Records are 128 bytes, 31 to a page; the record of inode n is slot n % 31 of the page
the inode table (a radix table, its root in the superblock) maps n // 31 to. A slot
whose inode number is 0 is free. Inode numbers are never reused, so a page whose slots
are all free again is freed, and the table stays as sparse as the live inodes.

    record page: page header (magic GIR2, crc32, owner = its first inode number), then
      16 + 128 * slot: the record of inode 31 * key + slot
    record (little-endian):
      0   u64 ino          8   u32 mode        12  u32 nlink
      16  u32 uid          20  u32 gid         24  u64 size
      32  i64 atime s      40  i64 mtime s     48  i64 ctime s
      56  u32 atime ns     60  u32 mtime ns    64  u32 ctime ns
      68  u8 map height, u8 inline PFNs, u16 zero (regular files; else 0)
      72  u64 rdev (device nodes) or parent (directories)
      80  u64 first page of the xattr blob (0: none)
      88  40 bytes by type:
          regular:   u64 map root, u64 pages held, u32 inline PFNs[6]
          directory: u64 B+tree root, u64 entry count, 24 zero bytes
          symlink:   the target if it has at most 40 bytes, else u64 first blob page
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable, Iterator

from guestfs.inode import FileType, Inode, intern_int
from guestfs.store.journal import Txn
from guestfs.store.page import HEADER_SIZE, CorruptPage, Kind, Pages
from guestfs.store.radix import Radix, RadixRoot

RECORD = struct.Struct("<QIIIIQqqqIIIBBHQQ40s")
RECORD_SIZE = RECORD.size
#: The record without its 40-byte tail, and where the tail starts.
RECORD_HEAD = struct.Struct("<QIIIIQqqqIIIBBHQQ")
TAIL_OFFSET = RECORD_HEAD.size
PER_PAGE = 31
REGULAR = struct.Struct("<QQ6I")
DIRECTORY = struct.Struct("<QQ24x")
BLOB_REF = struct.Struct("<Q32x")
INLINE_PFNS = 6
INLINE_TARGET = 40
NS = 10**9
assert RECORD_SIZE == 128 and HEADER_SIZE + PER_PAGE * RECORD_SIZE <= 4096
assert TAIL_OFFSET + REGULAR.size == RECORD_SIZE
_NO_PFNS = (0,) * INLINE_PFNS
#: The inode numbers of a record page's records (for counting them).
_INOS = struct.Struct("<" + f"Q{RECORD_SIZE - 8}x" * PER_PAGE)
_S_IFMT, _S_IFREG, _S_IFDIR, _S_IFLNK = 0o170000, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
_FREE = bytes(RECORD_SIZE)


def encode(inode: Inode) -> bytes:
    """The 128-byte record of `inode`."""
    raw = bytearray(RECORD_SIZE)
    encode_into(raw, 0, inode)
    return bytes(raw)


def encode_into(view: memoryview | bytearray, at: int, inode: Inode) -> None:
    """Write `inode`'s 128-byte record at offset `at` of `view` (every write of a record
    comes here: packed in place, with no intermediate bytes)."""
    a_s, a_ns = divmod(inode.atime_ns, NS)
    m_s, m_ns = divmod(inode.mtime_ns, NS)
    c_s, c_ns = divmod(inode.ctime_ns, NS)
    mode = inode.mode
    kind = mode & _S_IFMT
    if kind == _S_IFREG:
        inline = inode.inline
        ninline = len(inline)
        RECORD_HEAD.pack_into(view, at, inode.ino, mode, inode.nlink, inode.uid, inode.gid,
                              inode.size, a_s, m_s, c_s, a_ns, m_ns, c_ns,
                              inode.map_height, ninline, 0, 0, inode.xattr)
        REGULAR.pack_into(view, at + TAIL_OFFSET, inode.map_root, inode.npages,
                          *inline, *_NO_PFNS[ninline:])
        return
    if kind == _S_IFDIR:
        tail, extra = DIRECTORY.pack(inode.tree, inode.entries), inode.parent
    elif kind == _S_IFLNK:
        tail = inode.target if inode.target is not None else BLOB_REF.pack(inode.target_blob)
        extra = 0
    else:
        tail, extra = b"", inode.rdev
    RECORD.pack_into(view, at, inode.ino, mode, inode.nlink, inode.uid, inode.gid,
                     inode.size, a_s, m_s, c_s, a_ns, m_ns, c_ns, 0, 0, 0,
                     extra, inode.xattr, tail)


def decode(raw: bytes | memoryview, ino: int, generation: int) -> Inode | None:
    """The inode in a record (None for a free slot); CorruptPage(-1, why) for a record
    that no writer of this format makes."""
    (rec_ino, mode, nlink, uid, gid, size, a_s, m_s, c_s, a_ns, m_ns, c_ns, height,
     ninline, _zero, extra, xattr, tail) = RECORD.unpack(raw)
    if rec_ino == 0:
        return None
    if rec_ino != ino:
        raise CorruptPage(-1, f"the record of inode {ino} says it is inode {rec_ino}")
    try:
        FileType.of(mode)
    except ValueError:
        raise CorruptPage(-1, f"inode {ino} has mode {mode:o}, of no file type") from None
    if max(a_ns, m_ns, c_ns) >= NS:
        raise CorruptPage(-1, f"inode {ino} has a time with {max(a_ns, m_ns, c_ns)} ns")
    inode = Inode(ino, intern_int(mode), intern_int(uid), intern_int(gid), nlink,
                  a_s * NS + a_ns, m_s * NS + m_ns, c_s * NS + c_ns, generation, size,
                  xattr=xattr)
    if stat.S_ISREG(mode):
        root, npages, *pfns = REGULAR.unpack(tail)
        if ninline > INLINE_PFNS or (ninline and (root or height)):
            raise CorruptPage(-1, f"inode {ino} has a malformed page map")
        inode.map_root, inode.map_height, inode.npages = root, height, npages
        inode.inline = tuple(pfns[:ninline])
    elif stat.S_ISDIR(mode):
        inode.tree, inode.entries = DIRECTORY.unpack(tail)
        inode.parent = extra
    elif stat.S_ISLNK(mode):
        if not 0 < size <= 4095:
            raise CorruptPage(-1, f"symlink {ino} has a target of {size} bytes")
        if size <= INLINE_TARGET:
            inode.target = bytes(tail[:size])
        else:
            inode.target_blob = BLOB_REF.unpack(tail)[0]
    else:
        inode.rdev = extra
    return inode


#: Record pages whose place the table remembers (a radix walk saved on every write of a
#: record); past this many the memory starts again.
PAGE_CACHE = 4096


class InodeTable:
    """The records of every inode, over a radix table whose root the caller keeps."""

    def __init__(self, pages: Pages, table: RadixRoot, generation: int) -> None:
        self.pages = pages
        self.table = table
        self.generation = generation
        self._radix = Radix(pages, 0)
        self._pages: dict[int, int] = {}

    def forget_pages(self) -> None:
        """Drop the remembered record pages (a transaction rolled back)."""
        self._pages.clear()

    def _page(self, key: int) -> int:
        """The record page of `key`, 0 if there is none."""
        page = self._pages.get(key)
        if page is None:
            page = self._radix.get(self.table, key)
            if page:
                if len(self._pages) >= PAGE_CACHE:
                    self._pages.clear()
                self._pages[key] = page
        return page

    def get(self, ino: int) -> Inode | None:
        """The inode numbered `ino`, or None if there is none (CorruptPage if its page
        or record is not sound)."""
        key, slot = divmod(ino, PER_PAGE)
        page = self._page(key)
        if not page:
            return None
        view = self.pages.read(page, Kind.RECORDS)
        at = HEADER_SIZE + slot * RECORD_SIZE
        try:
            return decode(view[at:at + RECORD_SIZE], ino, self.generation)
        except CorruptPage as e:
            raise CorruptPage(page, str(e).split(": ", 1)[1]) from None

    def page_of(self, ino: int) -> int:
        """The page that holds (or would hold) inode `ino`'s record, 0 if there is none."""
        return self._page(ino // PER_PAGE)

    def put(self, txn: Txn, inode: Inode) -> None:
        """Write `inode`'s record (its page is made if it is the first of that page)."""
        key, slot = divmod(inode.ino, PER_PAGE)
        page = self._page(key)
        if not page:
            page = txn.new_page(Kind.RECORDS, key * PER_PAGE)
            self._radix.set(txn, self.table, key, page)
        encode_into(txn.write(page, Kind.RECORDS), HEADER_SIZE + slot * RECORD_SIZE, inode)

    def remove(self, txn: Txn, ino: int) -> None:
        """Free inode `ino`'s slot; the page goes too when it was its last record."""
        key, slot = divmod(ino, PER_PAGE)
        page = self._page(key)
        if not page:
            return
        view = txn.write(page, Kind.RECORDS)
        at = HEADER_SIZE + slot * RECORD_SIZE
        view[at:at + RECORD_SIZE] = _FREE
        if _INOS.unpack_from(view, HEADER_SIZE).count(0) == PER_PAGE:     # all free
            txn.free(page)
            self._radix.set(txn, self.table, key, 0)
            self._pages.pop(key, None)

    def count(self) -> tuple[int, bool]:
        """How many inodes are in use, and whether that is exact: a record page that
        fails its checks counts as full (an upper bound). CorruptPage if the table's
        own nodes cannot be walked."""
        used, exact = 0, True
        for _key, page in self._radix.items(self.table):
            try:
                view = self.pages.read(page, Kind.RECORDS)
            except CorruptPage:
                used, exact = used + PER_PAGE, False
                continue
            used += PER_PAGE - _INOS.unpack_from(view, HEADER_SIZE).count(0)
        return used, exact

    def inos(self, on_corrupt: Callable[[CorruptPage], None] | None = None
             ) -> Iterator[int]:
        """Every inode number in use, ascending (reads every record page). A record
        page that fails its checks raises CorruptPage, or with `on_corrupt` is passed
        to it and skipped (the full check goes on past it)."""
        for key, page in self._radix.items(self.table):
            try:
                view = self.pages.read(page, Kind.RECORDS)
            except CorruptPage as e:
                if on_corrupt is None:
                    raise
                on_corrupt(e)
                continue
            for slot in range(PER_PAGE):
                at = HEADER_SIZE + slot * RECORD_SIZE
                if struct.unpack_from("<Q", view, at)[0]:
                    yield key * PER_PAGE + slot

    def pages_used(self) -> Iterator[int]:
        """Every page of the table: radix nodes and record pages (for the full check)."""
        yield from self._radix.nodes(self.table)
        for _key, page in self._radix.items(self.table):
            yield page
