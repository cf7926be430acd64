"""Hand a guestfs filesystem over through KHO, and take it back after kexec.

The outgoing kernel (`GuestfsHandover`, a KHO participant) writes the superblock as the
properties of a ``guestfs`` sub-FDT (``compatible = "guestfs-v1"``) and every inode into
the *inode table*: one msgpack document in a chain of preserved pages. Data pages are
never copied: each file's page map is recorded as extents and its pages and folios are
preserved where they are. The incoming kernel (`restore`) validates all of it before it
claims a single page, rebuilds the inodes with page maps pointing at the same PFNs, and
frees the inode table's pages. The byte layout is specified in docs/handover-abi.md.
"""

from __future__ import annotations

import itertools
import operator
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from guestfs import acl
from guestfs.directory import FIRST_COOKIE, Directory
from guestfs.errors import FsError
from guestfs.filesystem import (LINK_MAX, NAME_MAX, SYMLINK_MAX, TIME_MAX_NS, TIME_MIN_NS,
                                XATTR_SIZE_MAX, Filesystem, xattr_namespace)
from guestfs.inode import ROOT_INO, FileType, Inode, intern_int
from guestfs.pagemap import FOLIO_ORDER, PageMap
from guestfs.superblock import MAX_FILE_SIZE, MAX_INODES, Superblock
from kho_backend.chain import free_chain, walk_chain, write_chain
from kho_backend.errors import HandoverError
from kho_backend.fdt import FdtNode, FdtReader, build, u32
from kho_backend.units import PAGE_SIZE

if TYPE_CHECKING:
    from kho_backend.boot import Kernel
    from kho_backend.kho import KHO

COMPATIBLE = "guestfs-v1"
SUBTREE = "guestfs"
INODE_TABLE_MAGIC = b"GFIT"

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
class _Outgoing:
    """What one finalize did, so that an abort can undo exactly that."""

    table_phys: int = 0
    preserved: dict[int, np.ndarray] = field(default_factory=dict)
    subtree_added: bool = False


class GuestfsHandover:
    """The KHO participant that serializes one mounted filesystem at finalize."""

    name = SUBTREE

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self._out: _Outgoing | None = None

    def kho_finalize(self, kho: KHO) -> None:
        """Write the inode table, preserve every data page, add the ``guestfs`` subtree."""
        out = self._out = _Outgoing()
        table = encode_table(self.fs)
        out.table_phys = write_chain(kho, table.payload, INODE_TABLE_MAGIC)
        for order, pfns in table.data_pfns.items():
            kho.preserve_pfns(pfns, order)
            out.preserved[order] = pfns
        kho.add_subtree(SUBTREE, superblock_fdt(self.fs.sb, table, out.table_phys))
        out.subtree_added = True

    def kho_abort(self, kho: KHO) -> None:
        """Undo `kho_finalize`: the filesystem goes on as if nothing happened."""
        out, self._out = self._out, None
        if out is None:
            return
        if out.subtree_added:
            kho.remove_subtree(SUBTREE)
        for order, pfns in out.preserved.items():
            kho.unpreserve_pfns(pfns, order)
        if out.table_phys:
            free_chain(kho, out.table_phys, INODE_TABLE_MAGIC)


# --- the inode table ------------------------------------------------------------


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
    doc = {"attrs": list(map(_attrs_of, inodes)), "dirs": dirs, "symlinks": links,
           "files": files, "xattrs": xattrs}
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


# --- the superblock as a sub-FDT ---------------------------------------------------


def superblock_fdt(sb: Superblock, table: EncodedTable, table_phys: int) -> bytes:
    """The ``guestfs`` sub-FDT: superblock fields and where the inode table lies.

    The generation written is the one the next kernel will run: this handover's number.
    """
    options = ",".join(f"{k}={v}" for k, v in sorted(sb.options.items()))
    node = FdtNode("", {
        "compatible": COMPATIBLE,
        "uuid": sb.uuid,
        "generation": sb.generation + 1,
        "page-size": u32(PAGE_SIZE),
        "root-ino": ROOT_INO,
        "next-ino": sb.next_ino,
        "ino-generation": sb.ino_generation,
        "max-inodes": sb.max_inodes,
        "max-file-size": sb.max_file_size,
        "created-ns": sb.created_ns,
        "options": options,
        "inode-count": table.inodes,
        "dirent-count": table.dirents,
        "extent-count": table.extents,
        "data-pages": table.data_pages,
        "inode-table": table_phys,
        "inode-table-size": len(table.payload),
    })
    return build(node, sealed=True)


@dataclass
class HandedOver:
    """What the ``guestfs`` sub-FDT says, read and checked."""

    sb: Superblock
    inode_count: int
    dirent_count: int
    extent_count: int
    data_pages: int
    table_phys: int
    table_size: int


def read_superblock(blob: bytes) -> HandedOver:
    """Parse and check the ``guestfs`` sub-FDT; HandoverError naming what is wrong."""
    r = FdtReader(blob, "the guestfs sub-FDT")
    r.check_seal()
    root = r.node("/")
    r.expect_compatible(root, COMPATIBLE)
    page_size = r.u32(root, "page-size")
    if page_size != PAGE_SIZE:
        raise HandoverError(f"the guestfs handover uses {page_size}-byte pages; this kernel "
                            f"uses {PAGE_SIZE}")
    if r.u64(root, "root-ino") != ROOT_INO:
        raise HandoverError(f"the guestfs handover's root inode is "
                            f"{r.u64(root, 'root-ino')}, expected {ROOT_INO}")
    options = r.string(root, "options")
    if any("=" not in kv for kv in options.split(",") if kv):
        raise HandoverError(f"the guestfs sub-FDT's options {options!r} are not key=value")
    sb = Superblock(
        uuid=r.string(root, "uuid"), max_inodes=r.u64(root, "max-inodes"),
        max_file_size=r.u64(root, "max-file-size"), generation=r.u64(root, "generation"),
        next_ino=r.u64(root, "next-ino"), ino_generation=r.u64(root, "ino-generation"),
        created_ns=r.u64(root, "created-ns"),
        options=dict(kv.split("=", 1) for kv in options.split(",") if kv))
    for name, value, low, end in (("max-inodes", sb.max_inodes, 1, MAX_INODES + 1),
                                  ("max-file-size", sb.max_file_size, 1, MAX_FILE_SIZE + 1),
                                  ("next-ino", sb.next_ino, ROOT_INO + 1, U63_END),
                                  ("ino-generation", sb.ino_generation, 0, U32_END),
                                  ("generation", sb.generation, 1, U63_END)):
        if not low <= value < end:
            raise HandoverError(f"the guestfs sub-FDT's {name} is {value}, outside "
                                f"[{low}, {end})")
    # Releases before 0.2 bounded files by the arena size; sparse files need no room.
    sb.max_file_size = MAX_FILE_SIZE
    return HandedOver(sb=sb, inode_count=r.u64(root, "inode-count"),
                      dirent_count=r.u64(root, "dirent-count"),
                      extent_count=r.u64(root, "extent-count"),
                      data_pages=r.u64(root, "data-pages"),
                      table_phys=r.u64(root, "inode-table"),
                      table_size=r.u64(root, "inode-table-size"))


# --- restore ----------------------------------------------------------------------


def restore(kernel: Kernel) -> Filesystem | None:
    """The filesystem handed over to `kernel`, or None when there is none to restore.

    Everything is checked (the sub-FDT's seal and version, the inode table's chain and
    checksums, the counts, the directory tree, that every mapped page was preserved
    exactly so) before the filesystem exists; a handover that fails any check raises
    HandoverError and leaves the arena's data as it was, so that it can be inspected.
    """
    kho_in = kernel.kho_in
    if kho_in is None or SUBTREE not in kho_in.subtrees:
        return None
    _, blob = kho_in.retrieve_subtree(SUBTREE)
    meta = read_superblock(blob)
    try:
        chain = walk_chain(kernel.arena, meta.table_phys, INODE_TABLE_MAGIC)
    except HandoverError as e:
        raise HandoverError(f"the guestfs inode table cannot be trusted: {e}") from None
    if len(chain.payload) != meta.table_size:
        raise HandoverError(f"the guestfs inode table holds {len(chain.payload)} bytes; "
                            f"the sub-FDT says {meta.table_size}")
    inodes, extents = decode_table(chain.payload, meta)
    heads = extent_heads(extents)
    fs = _build(kernel, meta.sb, inodes)
    for order, pfns in heads.items():
        kho_in.restore_pfns(pfns, order)
    kho_in.consume_chain(meta.table_phys, INODE_TABLE_MAGIC)
    return fs


def _build(kernel: Kernel, sb: Superblock, inodes: list[Inode]) -> Filesystem:
    try:
        fs = Filesystem(kernel, sb, inodes=inodes)
    except ValueError as e:
        raise HandoverError(f"the guestfs inode table is inconsistent: {e}") from None
    problems = fs.check(pages=False)     # restore_pfns refuses a page claimed twice
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise HandoverError(f"the guestfs inode table is inconsistent: {problems[0]}{more}")
    return fs


def decode_table(payload: bytes, meta: HandedOver) -> tuple[list[Inode], list]:
    """Inodes (page maps included) and all extents from an inode table, every value's
    type and range checked: a handover with valid checksums may still come from a buggy
    or hostile writer."""
    try:
        doc = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
        rows = _checked_attrs(doc["attrs"], meta.sb.next_ino)
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
    data_pages = sum(e[2] for e in extents)
    _check_counts(meta, len(inodes), dirents, len(extents), data_pages)
    return list(inodes.values()), extents


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


def _check_counts(meta: HandedOver, inodes: int, dirents: int, extents: int,
                  data_pages: int) -> None:
    for what, said, found in (("inodes", meta.inode_count, inodes),
                              ("directory entries", meta.dirent_count, dirents),
                              ("extents", meta.extent_count, extents),
                              ("data pages", meta.data_pages, data_pages)):
        if said != found:
            raise HandoverError(f"the guestfs sub-FDT counts {said} {what}; the inode table "
                                f"holds {found}")
