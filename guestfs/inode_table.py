"""The guestfs inode table: every handed-over inode as one msgpack document.

Written into a chain of preserved pages (magic ``GFIT``) at a handover and read back,
value by value checked, by the next kernel; the layout is specified in
docs/handover-abi.md, "guestfs inode table".
"""

from __future__ import annotations

import itertools
import operator
import stat
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from guestfs import acl
from guestfs.directory import FIRST_COOKIE, Directory
from guestfs.errors import FsError
from guestfs.filesystem import (LINK_MAX, NAME_MAX, SYMLINK_MAX, TIME_MAX_NS, TIME_MIN_NS,
                                XATTR_SIZE_MAX, Filesystem, xattr_namespace)
from guestfs.inode import ROOT_INO, FileType, Inode, intern_int
from guestfs.pagemap import FOLIO_ORDER, PageMap
from guestfs.superblock import MAX_FILE_SIZE
from kho_backend.errors import HandoverError
from kho_backend.units import PAGE_SIZE

MAGIC = b"GFIT"
#: The document's keys, in the order they are written.
KEYS = ("attrs", "dirs", "symlinks", "files", "xattrs")

# Attribute columns of the inode table, in `Inode`'s positional order so that a record
# unpacks straight into the constructor.
ATTRS = ("ino", "mode", "uid", "gid", "nlink", "atime_ns", "mtime_ns", "ctime_ns",
         "generation", "size", "rdev")
_attrs_of = operator.attrgetter(*ATTRS)
_TIME_COLUMNS = (5, 6, 7)
_EXTENT_FIELDS = 4   # file_pgoff, pfn, npages, order
U32_END = 1 << 32
U63_END = 1 << 63
U64_END = 1 << 64
# The range of each attribute column, [low, end), in the order of ATTRS.
_ATTR_RANGES = {
    "ino": (ROOT_INO, U63_END), "mode": (0, 1 << 16), "uid": (0, U32_END),
    "gid": (0, U32_END), "nlink": (1, LINK_MAX + 1), "atime_ns": (TIME_MIN_NS, TIME_MAX_NS + 1),
    "mtime_ns": (TIME_MIN_NS, TIME_MAX_NS + 1), "ctime_ns": (TIME_MIN_NS, TIME_MAX_NS + 1),
    "generation": (0, U32_END), "size": (0, MAX_FILE_SIZE + 1), "rdev": (0, U32_END),
}
assert tuple(_ATTR_RANGES) == ATTRS, "one range per attribute column, in order"



@dataclass
class EncodedTable:
    """An encoded inode table and the figures the sub-FDT records about it."""

    payload: bytes
    inodes: int
    dirents: int
    extents: int
    data_pfns: dict[int, np.ndarray]   # order -> head PFNs to preserve

    @property
    def data_pages(self) -> int:
        return sum(len(p) << order for order, p in self.data_pfns.items())


def _handed_over(fs: Filesystem) -> list[Inode]:
    # An unlinked file still open dies with the processes that hold it: they do not
    # survive a kexec, so neither does it (its pages are simply not preserved).
    return [i for i in fs.inodes.values() if i.nlink > 0]


def encode_table(fs: Filesystem) -> EncodedTable:
    """The inode table of `fs` as one msgpack document (see handover-abi.md)."""
    inodes = _handed_over(fs)
    dirs, links, files, xattrs = [], [], [], []
    dirents = 0
    for inode in inodes:
        if inode.dir is not None:
            entries = inode.dir.export()
            dirents += len(entries)
            dirs.append((inode.ino, inode.parent, inode.dir.next_cookie, entries))
        elif inode.target is not None:
            links.append((inode.ino, inode.target))
        elif inode.pages is not None:
            files.append((inode.ino, inode.pages.extents()))
        if inode.xattrs:
            xattrs.append((inode.ino, inode.xattrs))
    extents = [e for _, ext in files for e in ext]
    doc = dict(zip(KEYS, (list(map(_attrs_of, inodes)), dirs, links, files, xattrs),
                   strict=True))
    try:
        payload = msgpack.packb(doc, use_bin_type=True)
    except OverflowError:
        # A time beyond what a msgpack integer holds (before 1677 or after 2554): those
        # go as msgpack timestamps. Rare, so only then row by row.
        doc["attrs"] = [_portable_times(row) for row in doc["attrs"]]
        payload = msgpack.packb(doc, use_bin_type=True)
    return EncodedTable(payload=payload, inodes=len(inodes), dirents=dirents,
                        extents=len(extents), data_pfns=extent_heads(extents))


def _portable_times(row: tuple) -> tuple:
    out = list(row)
    for i in _TIME_COLUMNS:
        if not -U63_END <= out[i] < U64_END:
            out[i] = msgpack.Timestamp.from_unix_nano(out[i])
    return tuple(out)


def extent_heads(extents: list[tuple[int, int, int, int]]) -> dict[int, np.ndarray]:
    """{order: head PFNs} of every page and folio the extents cover, without a Python
    loop per page: a run of n pages of order k holds n >> k heads, 1 << k apart."""
    if not extents:
        return {}
    table = np.array(extents, dtype=np.int64).reshape(-1, _EXTENT_FIELDS)
    out: dict[int, np.ndarray] = {}
    for order in np.unique(table[:, 3]):
        rows = table[table[:, 3] == order]
        step = 1 << int(order)
        counts = rows[:, 2] // step
        first = np.cumsum(counts) - counts          # index of each run's first head
        index = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
        out[int(order)] = np.repeat(rows[:, 1], counts) + index * step
    return out



def decode_table(payload: bytes, next_ino: int) -> Decoded:
    """Inodes (page maps included) and all extents from an inode table, every value's
    type and range checked (inode numbers below `next_ino`): a handover with valid
    checksums may still come from a buggy or hostile writer. HandoverError says what
    is wrong."""
    try:
        doc = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
        rows = _checked_attrs(doc["attrs"], next_ino)
        inodes = {row[0]: _inode(row) for row in rows}
        if len(inodes) != len(rows):
            raise ValueError("an inode number appears twice")
        dirents = _attach_dirs(inodes, doc["dirs"])
        _attach(inodes, doc["symlinks"], "target", stat.S_ISLNK, _valid_target)
        _attach(inodes, doc["xattrs"], "xattrs", None, _valid_xattrs)
        extents = _attach_files(inodes, doc["files"])
    except HandoverError:
        raise
    except Exception as e:      # any malformed record, whatever it trips over
        raise HandoverError(f"the guestfs inode table cannot be decoded: "
                            f"{type(e).__name__}: {e}") from None
    return Decoded(list(inodes.values()), extents, dirents)


def _checked_attrs(rows: tuple, next_ino: int) -> list[tuple]:
    """The attribute rows, times as int nanoseconds, each column within its range."""
    # One pass per column at C speed: this runs for every inode of the machine.
    if set(map(len, rows)) - {len(ATTRS)}:
        raise ValueError(f"an inode record does not have {len(ATTRS)} fields")
    if set(map(type, itertools.chain.from_iterable(rows))) - {int}:
        rows = [_ns_times(row) for row in rows]
    for (name, (low, end)), column in zip(_ATTR_RANGES.items(), zip(*rows)):
        if name == "ino":
            end = next_ino
        if min(column) < low or max(column) >= end:
            bad = next(v for v in column if not low <= v < end)
            raise ValueError(f"an inode's {name} is {bad}, outside [{low}, {end})")
    return list(rows)


def _ns_times(row: tuple) -> tuple:
    """A row whose times may be msgpack timestamps, with int nanoseconds throughout;
    ValueError for anything else that is not an int (a bool included)."""
    out = list(row)
    for i, value in enumerate(out):
        if i in _TIME_COLUMNS and type(value) is msgpack.Timestamp:
            out[i] = value.to_unix_nano()
        elif type(value) is not int:
            raise ValueError(f"an inode record holds a {type(value).__name__} as its "
                             f"{ATTRS[i]}")
    return tuple(out)


def _inode(row: tuple) -> Inode:
    ino, mode, uid, gid, *rest = row
    FileType.of(mode)                     # ValueError for a mode that names no type
    return Inode(ino, intern_int(mode), intern_int(uid), intern_int(gid), *rest)


def _owner(inodes: dict[int, Inode], ino: Any, what: str, test) -> Inode:
    inode = inodes.get(ino) if type(ino) is int else None
    if inode is None:
        raise ValueError(f"{what} record for inode {ino!r}, which has no attributes")
    if test is not None and not test(inode.mode):
        raise ValueError(f"{what} record for inode {ino} of mode {inode.mode:o}")
    return inode


def _attach_dirs(inodes: dict[int, Inode], dirs: tuple) -> int:
    count = 0
    for ino, parent, next_cookie, entries in dirs:
        inode = _owner(inodes, ino, "directory", stat.S_ISDIR)
        _owner(inodes, parent, "parent directory", stat.S_ISDIR)
        _check_ints("directory", ino, next_cookie, low=FIRST_COOKIE, end=U63_END)
        for name, child, cookie in entries:
            _check_name(name)
            _check_ints("directory entry", ino, child, low=ROOT_INO, end=U63_END)
            _check_ints("directory entry", ino, cookie, low=FIRST_COOKIE, end=U63_END)
        inode.dir = Directory.from_entries(entries, next_cookie)
        inode.parent = parent
        count += len(entries)
    missing = [i.ino for i in inodes.values() if stat.S_ISDIR(i.mode) and i.dir is None]
    if missing:
        raise ValueError(f"directory {missing[0]} has no entries record")
    return count


def _check_ints(what: str, ino: int, *values: Any, low: int, end: int) -> None:
    for value in values:
        if type(value) is not int or not low <= value < end:
            raise ValueError(f"a {what} of inode {ino} holds {value!r}, not an integer in "
                             f"[{low}, {end})")


def _check_name(name: Any) -> None:
    if (not isinstance(name, bytes) or not 0 < len(name) <= NAME_MAX or b"/" in name
            or b"\0" in name or name in (b".", b"..")):
        raise ValueError(f"{name!r:.80} cannot be a file name")


def _attach(inodes: dict[int, Inode], records: tuple, attr: str, test, valid) -> None:
    for ino, value in records:
        if not valid(value):
            raise ValueError(f"inode {ino} has a malformed {attr} record")
        setattr(_owner(inodes, ino, attr, test), attr, value)


def _valid_target(value: Any) -> bool:
    return isinstance(value, bytes) and 0 < len(value) <= SYMLINK_MAX and b"\0" not in value


def _valid_xattrs(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, bytes) and isinstance(v, bytes) and _valid_xattr(k, v)
        for k, v in value.items())


def _valid_xattr(name: bytes, value: bytes) -> bool:
    try:
        xattr_namespace(name)
        if name in acl.NAMES:
            acl.parse(value)
    except (FsError, ValueError):
        return False
    return len(value) <= XATTR_SIZE_MAX


def _attach_files(inodes: dict[int, Inode], files: tuple) -> list:
    extents: list = []
    last_page = MAX_FILE_SIZE // PAGE_SIZE + (1 << FOLIO_ORDER)   # a folio may pass the end
    for ino, ext in files:
        for extent in ext:
            if len(extent) != _EXTENT_FIELDS or any(type(v) is not int for v in extent):
                raise ValueError(f"inode {ino} has an extent {extent!r} that is not "
                                 f"{_EXTENT_FIELDS} integers")
            pgoff, _, npages, order = extent
            if pgoff < 0 or npages <= 0 or pgoff + npages > last_page \
                    or order not in (0, FOLIO_ORDER):
                raise ValueError(f"inode {ino} has an impossible extent {extent!r}")
        inode = _owner(inodes, ino, "page map", stat.S_ISREG)
        inode.pages = PageMap.from_extents(ext)
        extents.extend(ext)
    return extents



@dataclass(frozen=True)
class Decoded:
    """What a table holds: inodes with their page maps, and the figures to check."""

    inodes: list[Inode]
    extents: list
    dirents: int

    @property
    def data_pages(self) -> int:
        return sum(e[2] for e in self.extents)
