"""Convert a ``guestfs-v1`` handover (release 0.2.0) into a ``guestfs-v2`` store, once.

Release 0.2.0 serialized the whole tree at each handover: the superblock as the
``guestfs`` sub-FDT and every inode in one msgpack document in a chain of pages (magic
``GFIT``), data pages preserved where they were (docs/handover-abi.md, "guestfs-v1").
The conversion reads and checks all of it first, as that release's restore did, then
builds the new store in a new ``guestfs`` pool: the data pages are claimed from the
handover and adopted by the pool where they are (never copied), the metadata is
written anew. Inode numbers, generations and times are kept; readdir cookies are not
(no directory stream survives a remount).

It is restartable: until the kernel finishes booting, the boot parameters still name the
v1 handover, whose pages nothing here writes, so a conversion cut short is simply done
again by the next mount. The inode table's pages are not claimed: the end of boot frees
them, after the boot parameters stop naming the v1 handover.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from guestfs import acl
from guestfs.errors import FsError
from guestfs.filesystem import (LINK_MAX, NAME_MAX, SYMLINK_MAX, TIME_MAX_NS, TIME_MIN_NS,
                                XATTR_SIZE_MAX, AtimePolicy, Filesystem, xattr_namespace)
from guestfs.inode import ROOT_INO, FileType, Inode
from guestfs.store.journal import Pool, TxnTooLarge
from guestfs.store.page import CorruptPage
from guestfs.store.pagemap import FOLIO_ORDER, REGION_PAGES, Extent
from guestfs.store.store import MetaStore
from guestfs.store.superblock import MAX_FILE_SIZE, MAX_INODES, Superblock
from kho_backend.chain import walk_chain
from kho_backend.errors import HandoverError, KhoError, OutOfMemory
from kho_backend.fdt import FdtReader
from kho_backend.units import PAGE_SIZE

if TYPE_CHECKING:
    from kho_backend.boot import Kernel

COMPATIBLE = "guestfs-v1"
MAGIC = b"GFIT"
ATTRS = ("ino", "mode", "uid", "gid", "nlink", "atime_ns", "mtime_ns", "ctime_ns",
         "generation", "size", "rdev")
U32_END = 1 << 32
U63_END = 1 << 63
FIRST_COOKIE = 3
#: [low, end) of each attribute, in the order of ATTRS (ino's end is next-ino).
_ATTR_RANGES = ((ROOT_INO, U63_END), (0, 1 << 16), (0, U32_END), (0, U32_END),
                (1, LINK_MAX + 1), (TIME_MIN_NS, TIME_MAX_NS + 1),
                (TIME_MIN_NS, TIME_MAX_NS + 1), (TIME_MIN_NS, TIME_MAX_NS + 1),
                (0, U32_END), (0, MAX_FILE_SIZE + 1), (0, U32_END))
_LAST_PAGE = MAX_FILE_SIZE // PAGE_SIZE + (1 << FOLIO_ORDER)   # a folio may pass the end
#: Directory entries, or 2 MiB regions of a file, written per transaction (each takes
#: a few metadata pages: the journal bounds what one transaction may change).
_PER_TXN = 8


@dataclass
class V1Superblock:
    """What a ``guestfs-v1`` sub-FDT says."""

    uuid: str
    generation: int
    next_ino: int
    ino_generation: int
    max_inodes: int
    created_ns: int
    options: dict[str, str]
    counts: dict[str, int]
    table_phys: int
    table_size: int


@dataclass
class _V1Inode:
    attrs: tuple
    parent: int = 0
    entries: list[tuple[bytes, int]] | None = None
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    extents: list[Extent] = field(default_factory=list)

    @property
    def ino(self) -> int:
        return self.attrs[0]

    @property
    def mode(self) -> int:
        return self.attrs[1]


def upgrade(kernel: Kernel, blob: bytes, pool_name: str, *,
            atime: AtimePolicy = AtimePolicy()) -> Filesystem:
    """The v1 filesystem handed over to `kernel` (its sub-FDT is `blob`), converted
    into a new store in the pool `pool_name`. HandoverError, before anything is written,
    if any of it cannot be trusted."""
    kho_in = kernel.kho_in
    sb1 = read_superblock(blob)
    try:
        chain = walk_chain(kernel.arena, sb1.table_phys, MAGIC)
    except HandoverError as e:
        raise HandoverError(f"the guestfs inode table cannot be trusted: {e}") from None
    if len(chain.payload) != sb1.table_size:
        raise HandoverError(f"the guestfs inode table holds {len(chain.payload)} bytes; "
                            f"the sub-FDT says {sb1.table_size}")
    inodes = _decode(chain.payload, sb1)
    pool = kernel.kho.create_pool(pool_name)
    try:
        for order, heads in _heads(inodes).items():
            kho_in.restore_pfns(heads, order)
            pool.adopt(heads, order)
        fs = _build(kernel, pool, sb1, inodes, atime)
    except (KhoError, OutOfMemory, TxnTooLarge, CorruptPage, FsError) as e:
        raise HandoverError(f"the guestfs-v1 filesystem cannot be converted: {e}") from None
    problems = fs.check()
    if problems:
        raise HandoverError(f"the guestfs-v1 tree is inconsistent: {problems[0]}")
    return fs


# --- reading and checking -------------------------------------------------------------


def read_superblock(blob: bytes) -> V1Superblock:
    """The ``guestfs-v1`` sub-FDT, checked; HandoverError naming what is wrong."""
    r = FdtReader(blob, "the guestfs sub-FDT")
    r.check_seal()
    root = r.node("/")
    r.expect_compatible(root, COMPATIBLE)
    if r.u32(root, "page-size") != PAGE_SIZE or r.u64(root, "root-ino") != ROOT_INO:
        raise HandoverError("the guestfs-v1 handover has another page size or root inode")
    options = r.string(root, "options")
    sb = V1Superblock(
        uuid=r.string(root, "uuid"), generation=r.u64(root, "generation"),
        next_ino=r.u64(root, "next-ino"), ino_generation=r.u64(root, "ino-generation"),
        max_inodes=r.u64(root, "max-inodes"), created_ns=r.u64(root, "created-ns"),
        options=dict(kv.split("=", 1) for kv in options.split(",") if "=" in kv),
        counts={k: r.u64(root, k) for k in ("inode-count", "dirent-count", "extent-count",
                                            "data-pages")},
        table_phys=r.u64(root, "inode-table"), table_size=r.u64(root, "inode-table-size"))
    for name, value, low, end in (("max-inodes", sb.max_inodes, 1, MAX_INODES + 1),
                                  ("next-ino", sb.next_ino, ROOT_INO + 1, U63_END),
                                  ("ino-generation", sb.ino_generation, 0, U32_END),
                                  ("generation", sb.generation, 1, U63_END)):
        if not low <= value < end:
            raise HandoverError(f"the guestfs sub-FDT's {name} is {value}, outside "
                                f"[{low}, {end})")
    return sb


def _decode(payload: bytes, sb: V1Superblock) -> dict[int, _V1Inode]:
    """Every inode of the table, each value's type and range checked (a table with sound
    checksums may still come from a buggy writer); HandoverError says what is wrong."""
    try:
        doc = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
        inodes: dict[int, _V1Inode] = {}
        for row in doc["attrs"]:
            inode = _V1Inode(_checked_attrs(row, sb.next_ino))
            if inodes.setdefault(inode.ino, inode) is not inode:
                raise ValueError(f"inode {inode.ino} appears twice")
        dirents = _attach_dirs(inodes, doc["dirs"])
        for ino, target in doc["symlinks"]:
            if not (isinstance(target, bytes) and 0 < len(target) <= SYMLINK_MAX
                    and b"\0" not in target):
                raise ValueError(f"inode {ino} has a malformed symlink target")
            _owner(inodes, ino, "symlink", stat.S_ISLNK).target = target
        for ino, xattrs in doc["xattrs"]:
            _check_xattrs(ino, xattrs)
            _owner(inodes, ino, "xattrs", None).xattrs = dict(xattrs)
        extents = 0
        for ino, runs in doc["files"]:
            inode = _owner(inodes, ino, "page map", stat.S_ISREG)
            inode.extents = [_checked_extent(ino, e) for e in runs]
            extents += len(runs)
    except HandoverError:
        raise
    except Exception as e:      # any malformed record, whatever it trips over
        raise HandoverError(f"the guestfs inode table cannot be decoded: "
                            f"{type(e).__name__}: {e}") from None
    data_pages = sum(e[2] for i in inodes.values() for e in i.extents)
    for what, found in (("inode-count", len(inodes)), ("dirent-count", dirents),
                        ("extent-count", extents), ("data-pages", data_pages)):
        if sb.counts[what] != found:
            raise HandoverError(f"the guestfs sub-FDT's {what} is {sb.counts[what]}; the "
                                f"inode table holds {found}")
    return inodes


def _checked_attrs(row: Any, next_ino: int) -> tuple:
    if len(row) != len(ATTRS):
        raise ValueError(f"an inode record does not have {len(ATTRS)} fields")
    values = [v.to_unix_nano() if type(v) is msgpack.Timestamp else v for v in row]
    for name, value, (low, end) in zip(ATTRS, values, _ATTR_RANGES, strict=True):
        end = next_ino if name == "ino" else end
        if type(value) is not int or not low <= value < end:
            raise ValueError(f"an inode's {name} is {value!r}, not an integer in "
                             f"[{low}, {end})")
    FileType.of(values[1])
    return tuple(values)


def _owner(inodes: dict[int, _V1Inode], ino: Any, what: str,
           test: Callable[[int], bool] | None) -> _V1Inode:
    inode = inodes.get(ino) if type(ino) is int else None
    if inode is None:
        raise ValueError(f"{what} record for inode {ino!r}, which has no attributes")
    if test is not None and not test(inode.mode):
        raise ValueError(f"{what} record for inode {ino} of mode {inode.mode:o}")
    return inode


def _attach_dirs(inodes: dict[int, _V1Inode], dirs: Iterable) -> int:
    count = 0
    for ino, parent, _next_cookie, entries in dirs:
        d = _owner(inodes, ino, "directory", stat.S_ISDIR)
        _owner(inodes, parent, "parent directory", stat.S_ISDIR)
        d.parent, d.entries = parent, []
        for name, child, _cookie in entries:
            if (not isinstance(name, bytes) or not 0 < len(name) <= NAME_MAX
                    or b"/" in name or b"\0" in name or name in (b".", b"..")):
                raise ValueError(f"{name!r:.80} cannot be a file name")
            _owner(inodes, child, "directory entry", None)
            d.entries.append((name, child))
        count += len(entries)
    missing = [i.ino for i in inodes.values() if stat.S_ISDIR(i.mode) and i.entries is None]
    if missing:
        raise ValueError(f"directory {missing[0]} has no entries record")
    return count


def _check_xattrs(ino: int, xattrs: Any) -> None:
    if not isinstance(xattrs, dict) or not xattrs:
        raise ValueError(f"inode {ino} has a malformed xattrs record")
    for name, value in xattrs.items():
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise ValueError(f"inode {ino} has an xattr that is not bytes")
        try:
            xattr_namespace(name)
            if name in acl.NAMES:
                acl.parse(value)
        except FsError:
            raise ValueError(f"inode {ino} has the xattr {name!r:.80}") from None
        if len(value) > XATTR_SIZE_MAX:
            raise ValueError(f"inode {ino}'s xattr {name!r:.80} holds {len(value)} bytes")


def _checked_extent(ino: int, extent: Any) -> Extent:
    if len(extent) != 4 or any(type(v) is not int for v in extent):
        raise ValueError(f"inode {ino} has an extent {extent!r} that is not 4 integers")
    pgoff, pfn, npages, order = extent
    if (pgoff < 0 or npages <= 0 or pgoff + npages > _LAST_PAGE or order not in (0, FOLIO_ORDER)
            or (order and (pgoff % (1 << order) or npages % (1 << order)))):
        raise ValueError(f"inode {ino} has an impossible extent {extent!r}")
    return pgoff, pfn, npages, order


def _heads(inodes: dict[int, _V1Inode]) -> dict[int, np.ndarray]:
    """{order: head PFNs} of every page and folio the extents name."""
    heads: dict[int, list[int]] = {}
    for inode in inodes.values():
        for _, pfn, npages, order in inode.extents:
            heads.setdefault(order, []).extend(range(pfn, pfn + npages, 1 << order))
    return {order: np.array(pfns, np.int64) for order, pfns in heads.items()}


# --- building the v2 store -------------------------------------------------------------


def _build(kernel: Kernel, pool: Pool, sb1: V1Superblock, inodes: dict[int, _V1Inode],
           atime: AtimePolicy) -> Filesystem:
    if ROOT_INO not in inodes:
        raise HandoverError("the guestfs inode table has no root directory")
    sb = Superblock.new(kernel.arena.size, options=sb1.options, max_inodes=sb1.max_inodes)
    sb.uuid, sb.created_ns, sb.ino_generation = sb1.uuid, sb1.created_ns, sb1.ino_generation
    sb.generation = sb1.generation
    new = {ino: _inode(i) for ino, i in inodes.items()}
    store = MetaStore.format(kernel.arena, pool, sb, new[ROOT_INO])
    with store.transaction() as txn:
        store.sb.next_ino = sb1.next_ino
        store.save_superblock(txn)
    for ino, old in inodes.items():
        inode = new[ino]
        with store.transaction() as txn:
            if old.target is not None:
                store.set_target(txn, inode, old.target)
            if old.xattrs:
                store.set_xattrs(txn, inode, old.xattrs)
            if ino != ROOT_INO:
                store.sb.inode_count += 1
                store.save_superblock(txn)
            store.put(txn, inode)
        for batch in _batches(_by_region(old.extents), _PER_TXN):
            with store.transaction() as txn:
                store.maps.adopt(txn, inode, batch)
                store.put(txn, inode)
        for batch in _batches(old.entries or [], _PER_TXN):
            with store.transaction() as txn:
                for name, child in batch:
                    store.dirs.add(txn, inode, name, child, new[child].mode)
                store.put(txn, inode)
    return Filesystem(store, atime=atime)


def _inode(old: _V1Inode) -> Inode:
    ino, mode, uid, gid, nlink, a, m, c, generation, size, rdev = old.attrs
    return Inode(ino, mode, uid, gid, nlink, a, m, c, generation=generation,
                 size=size, rdev=rdev, parent=old.parent)


def _by_region(extents: list[Extent]) -> list[Extent]:
    """The extents cut at every 2 MiB region boundary."""
    out: list[Extent] = []
    for pgoff, pfn, npages, order in extents:
        while npages:
            n = min(npages, REGION_PAGES - pgoff % REGION_PAGES)
            out.append((pgoff, pfn, n, order))
            pgoff, pfn, npages = pgoff + n, pfn + n, npages - n
    return out


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
