"""Directory entries: a B+tree per directory, keyed by cookie (docs/handover-abi.md,
"Directory").

A cookie is derived from the entry's name: a keyed 64-bit BLAKE2b hash (the key is the
filesystem's, so names cannot be chosen to collide), of which 58 bits make the high
part and a 4-bit index the low part, to tell up to 16 names with the same hash apart:

    cookie = 3 + (hash >> 6 << 4 | index)        (1 and 2 are "." and "..")

So a name keeps its cookie while it exists and gets the same one back when it returns,
readdir walks the tree in cookie order and resumes from a cookie without a scan, and a
walk always ends: no entry is returned twice, however entries move meanwhile (an entry
added or removed during the walk is returned or not, as POSIX allows).

    value of an entry: u64 inode number, u8 file type (S_IFMT >> 12), u8 name length,
    then the name
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator

from guestfs.errors import FsError
from guestfs.inode import Inode
from guestfs.store.btree import BTree
from guestfs.store.journal import Txn
from guestfs.store.page import CorruptPage, Pages

DOT_COOKIE = 1
DOTDOT_COOKIE = 2
FIRST_COOKIE = 3
INDEX_BITS = 4
DIRENT = struct.Struct("<QBB")


def encode_entry(ino: int, mode: int, name: bytes) -> bytes:
    """The B+tree value of an entry."""
    return DIRENT.pack(ino, mode >> 12 & 0xF, len(name)) + name


def decode_entry(value: bytes) -> tuple[int, int, bytes]:
    """(ino, file type, name) of an entry's value."""
    ino, ftype, length = DIRENT.unpack_from(value)
    name = value[DIRENT.size:]
    if len(name) != length or not length:
        raise CorruptPage(-1, f"a directory entry's name has {len(name)} of {length} bytes")
    return ino, ftype, name


#: Names whose lookup `Directories` remembers (found or not).
NAME_CACHE = 1 << 14


class Directories:
    """Reads and changes directories; changes keep the directory inode's `tree` and
    `entries` in step (the caller writes its record).

    Every change of a directory goes through here, so the answers of recent lookups are
    kept (a bounded cache of (directory, name) -> entry or None): the lookups a create,
    rename or unlink makes of a name, and a stat's, do not walk the B+tree again. The
    owner drops the cache when a transaction rolls back (`forget_names`).
    """

    def __init__(self, pages: Pages, hash_key: bytes) -> None:
        self.pages = pages
        self.hash_key = hash_key
        self._names: OrderedDict[tuple[int, bytes], tuple[int, int, int] | None] = \
            OrderedDict()

    def base_cookie(self, name: bytes) -> int:
        """The first cookie `name` may have."""
        digest = hashlib.blake2b(name, digest_size=8, key=self.hash_key).digest()
        return FIRST_COOKIE + (int.from_bytes(digest, "little") >> 6 << INDEX_BITS)

    def lookup(self, d: Inode, name: bytes) -> tuple[int, int] | None:
        """(cookie, ino) of `name` in directory `d`, or None."""
        found = self._find(d, name)
        return None if found is None else found[:2]

    def add(self, txn: Txn, d: Inode, name: bytes, ino: int, mode: int) -> int:
        """Enter `name` (not there yet) for `ino` of `mode`; returns its cookie."""
        base = self.base_cookie(name)
        tree = self._tree(d)
        value = encode_entry(ino, mode, name)
        # The first free cookie of the name's sixteen: an insert refuses a taken one
        # before it changes anything, so the usual case walks the tree once.
        for cookie in range(base, base + (1 << INDEX_BITS)):
            try:
                d.tree = tree.insert(txn, d.tree, cookie, value)
                break
            except KeyError:
                continue
        else:
            raise FsError(errno.ENOSPC, f"{1 << INDEX_BITS} names in directory {d.ino} "
                                        f"share the hash of {name!r}")
        d.entries += 1
        self._remember(d.ino, name, (cookie, ino, mode >> 12 & 0xF))
        return cookie

    def remove(self, txn: Txn, d: Inode, name: bytes) -> int:
        """Remove `name` (it must be there); returns the inode it named."""
        cookie, ino, _ = self._found(d, name)
        d.tree = self._tree(d).delete(txn, d.tree, cookie)
        d.entries -= 1
        self._remember(d.ino, name, None)
        return ino

    def replace(self, txn: Txn, d: Inode, name: bytes, ino: int, mode: int) -> int:
        """Point `name` (it must be there) at `ino`, keeping its cookie; returns the
        inode it named before."""
        cookie, old, _ = self._found(d, name)
        d.tree = self._tree(d).replace(txn, d.tree, cookie, encode_entry(ino, mode, name))
        self._remember(d.ino, name, (cookie, ino, mode >> 12 & 0xF))
        return old

    def forget_names(self) -> None:
        """Drop every remembered lookup (a transaction rolled back)."""
        self._names.clear()

    def entries_after(self, root_of: Callable[[], int], owner: int, cookie: int
                      ) -> Iterator[tuple[int, bytes, int]]:
        """(cookie, name, ino) of the entries past `cookie`, in cookie order; the
        directory may change between two of them (see the module docstring)."""
        tree = BTree(self.pages, owner)
        for key, value in tree.after(root_of, max(cookie, DOTDOT_COOKIE)):
            ino, _ftype, name = decode_entry(value)
            yield key, name, ino

    def entries(self, d: Inode) -> Iterator[tuple[int, bytes, int, int]]:
        """(cookie, name, ino, file type) of every entry (for the full check)."""
        for key, value in self._tree(d).after(lambda: d.tree, DOTDOT_COOKIE):
            ino, ftype, name = decode_entry(value)
            yield key, name, ino, ftype

    def free(self, txn: Txn, d: Inode) -> None:
        """Free an empty directory's tree."""
        self._tree(d).free_all(txn, d.tree)
        d.tree = 0

    def nodes(self, d: Inode) -> Iterator[int]:
        """The directory's B+tree pages."""
        return self._tree(d).nodes(d.tree)

    def _tree(self, d: Inode) -> BTree:
        return BTree(self.pages, d.ino)

    def _find(self, d: Inode, name: bytes) -> tuple[int, int, int] | None:
        """(cookie, ino, file type) of `name` in `d`, or None."""
        key = (d.ino, bytes(name))
        names = self._names
        if key in names:
            names.move_to_end(key)
            return names[key]
        found = None
        if d.tree:
            base = self.base_cookie(name)
            for cookie, value in self._tree(d).range(d.tree, base,
                                                     base + (1 << INDEX_BITS)):
                ino, ftype, entry_name = decode_entry(value)
                if entry_name == name:
                    found = cookie, ino, ftype
                    break
        self._remember(d.ino, name, found)
        return found

    def _remember(self, dir_ino: int, name: bytes,
                  found: tuple[int, int, int] | None) -> None:
        names = self._names
        key = (dir_ino, bytes(name))
        names[key] = found
        names.move_to_end(key)
        if len(names) > NAME_CACHE:
            names.popitem(last=False)

    def _found(self, d: Inode, name: bytes) -> tuple[int, int, int]:
        found = self._find(d, name)
        if found is None:
            raise KeyError(name)
        return found
