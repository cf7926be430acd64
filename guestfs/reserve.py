"""The room the next handover needs, kept free so that it can always be written.

A handover writes the inode table (docs/handover-abi.md, "inode table") into new pages
of a preserved chain, and KHO writes its memory map and FDTs into more. None of that may
fail on a full arena, so the filesystem keeps that many pages back from file data and
refuses (``ENOSPC``) any change that would make the table outgrow what is free.

The table's size is bounded from above as the tree changes: every record has a
worst-case size in msgpack (an int takes at most 9 bytes, a time at most 15 as a
timestamp extension, a name its length plus a 2-byte header), so the bound is a sum of
counts and lengths that each operation adjusts by a known amount. A test checks the
bound against real tables of random trees.
"""

from __future__ import annotations

from kho_backend.chain import chain_pages
from kho_backend.kho_mem import max_chunks

# Worst-case msgpack bytes of the inode table's records (see handover-abi.md).
INT_MAX_BYTES = 9
TIME_MAX_BYTES = 15                     # timestamp 96: ext8 header (3) + 12
ATTR_RECORD = 1 + 8 * INT_MAX_BYTES + 3 * TIME_MAX_BYTES
DIR_RECORD = 1 + 3 * INT_MAX_BYTES + 5          # (ino, parent, next cookie, [entries])
FILE_RECORD = 1 + INT_MAX_BYTES + 5             # (ino, [extents])
SYMLINK_RECORD = 1 + INT_MAX_BYTES + 3          # (ino, target) without the target
XATTR_RECORD = 1 + INT_MAX_BYTES + 5            # (ino, {name: value}) without the pairs
#: Any inode's fixed share: its attributes, the largest type record, an xattr record.
INODE_BYTES = ATTR_RECORD + max(DIR_RECORD, FILE_RECORD, SYMLINK_RECORD) + XATTR_RECORD
DIRENT_BYTES = 1 + 2 + 2 * INT_MAX_BYTES        # (name, ino, cookie) without the name
XATTR_PAIR_BYTES = 2 + 5                        # bin8 name header, bin32 value header
EXTENT_BYTES = 1 + 3 * INT_MAX_BYTES + 1        # (file pgoff, pfn, npages, order)
TABLE_BYTES = 128                               # the document's map and list headers
#: FDTs (root, guestfs, kexec-metadata) and their rounding to folios.
SLACK_PAGES = 16
#: Room file data leaves to metadata on top of the reserve, so that a directory can
#: still be made or a file renamed when writes already get ENOSPC (1/256 of the arena,
#: at least 16 pages).
HEADROOM_SHARE = 256
MIN_HEADROOM_PAGES = 16


def dirent_bytes(name: bytes) -> int:
    """Table bytes of one directory entry called `name`."""
    return DIRENT_BYTES + len(name)


def xattr_bytes(name: bytes, value: bytes) -> int:
    """Table bytes of one extended attribute."""
    return XATTR_PAIR_BYTES + len(name) + len(value)


class HandoverReserve:
    """An upper bound of the next handover's size, and the pages it takes.

    `meta_bytes` is kept by the filesystem (inodes, names, targets, xattrs); extents are
    bounded by the page pool's counts, since each extent covers at least one page or
    one folio.
    """

    def __init__(self, arena_npages: int) -> None:
        self.meta_bytes = TABLE_BYTES
        self._fixed_pages = max_chunks(arena_npages) + SLACK_PAGES
        #: Kept from file data beyond `pages`, for metadata (see HEADROOM_SHARE).
        self.headroom_pages = max(arena_npages // HEADROOM_SHARE, MIN_HEADROOM_PAGES)

    def pages(self, extents: int, extra_bytes: int = 0) -> int:
        """Pages the handover needs with at most `extents` extents and `extra_bytes`
        more metadata than now."""
        table = self.meta_bytes + extra_bytes + extents * EXTENT_BYTES
        return chain_pages(table) + self._fixed_pages

