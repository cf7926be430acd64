"""The FUSE connection's own state, handed over across an in-process kexec.

When the next kernel boots in the same process and keeps the mount (the daemon's
`_switch`), the kernel's FUSE connection outlives the old kernel: its lookup references
and open files stay valid. What the old kernel knew of them (the core's lookup and open
counts per inode, the adapter's file-handle table, which inodes may have pages in the
kernel's page cache) is not kernel memory to rebuild from the tree, so it is handed over
explicitly, as LUO preserves a file descriptor: the ``guestfs-fuse`` KHO subtree
(``compatible = "guestfs-fuse-v2"``, docs/handover-abi.md), whose tables lie in a
preserved page chain, so their size has no limit but the arena. The tables are packed (a
lookup block is its key and a byte per count, or two when one does not fit; the cached
inodes are masks), about 1.5 bytes per inode of a tree the kernel holds whole, and made
and read back by array operations, with Python work per block of inodes, not per inode.
It names the connection it belongs to (the daemon's pid and the mount's device number);
only a kernel booted in that process on that connection claims it. Any other boot (an
exec, a later mount, a crash boot) leaves it unclaimed and it is freed at the end of
boot with the rest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from guestfs.refs import APART, BLOCK_INOS, SET_INOS, InodeSet, KernelRefs, PackedLookups
from kho_backend.chain import free_chain, walk_chain, write_chain
from kho_backend.errors import HandoverError
from kho_backend.fdt import FdtNode, FdtReader, build, u32
from kho_backend.memmap import has_duplicates

if TYPE_CHECKING:
    from kho_backend.kho import KHO
    from kho_backend.kho_in import IncomingHandover

COMPATIBLE = "guestfs-fuse-v2"
NAME = "guestfs-fuse"
VERSION = 2
#: Magic of the preserved page chain that holds the tables (kho_backend.chain).
CHAIN_MAGIC = b"GFCN"

#: A block of lookup counts that holds any inode, all below `NARROW`: its key (inode
#: number // the block size) and its counts, a byte each.
#: The largest inode number (the kernel's are 64-bit).
_LAST_INO = (1 << 64) - 1
BLOCK = np.dtype([("key", "<u8"), ("counts", "u1", (BLOCK_INOS,))])
NARROW = 0xFF
#: A block of lookup counts, one of them `NARROW` or more: its key, its counts as u16
#: (`APART`: the count is listed in BIG).
WIDE = np.dtype([("key", "<u8"), ("counts", "<u2", (BLOCK_INOS,))])
#: A held inode whose lookup count does not fit 16 bits, and that count.
BIG = np.dtype([("ino", "<u8"), ("count", "<u8")])
#: One inode with files open: the inode and how many opens are not released.
OPEN = np.dtype([("ino", "<u8"), ("count", "<u8")])
#: One open of the adapter: its file handle, inode and `HANDLE_*` flags.
HANDLE = np.dtype([("fh", "<u8"), ("ino", "<u8"), ("flags", "<u4")])
HANDLE_DIR = 1          # an open directory (else a file)
HANDLE_DIRECT = 2       # a file opened with O_DIRECT
#: Inodes whose pages the kernel may hold in its page cache: a block key (inode number
#: // the set's block size) and its mask (bit b: inode key × set block size + b).
CACHED = np.dtype([("key", "<u8"), ("bits", "<u8")])
#: The tables of the chain's payload, in order, after its header.
TABLES = (("blocks", BLOCK), ("wide", WIDE), ("big", BIG), ("opens", OPEN),
          ("handles", HANDLE), ("cached", CACHED))
#: The payload's header: the inodes per lookup block and per cached-set mask.
_HEADER = struct.Struct("<II")
_COUNT = struct.Struct("<I")


@dataclass(frozen=True)
class ConnectionId:
    """Which FUSE connection: the serving process and the mount's device number."""

    pid: int
    device: int


@dataclass
class ConnectionState:
    """What a kept FUSE connection carries from one kernel to the next."""

    owner: ConnectionId
    refs: KernelRefs        # the kernel's lookup and open references
    handles: np.ndarray     # of HANDLE
    cached: InodeSet        # inodes whose pages the kernel may cache
    next_fh: int            # the next file handle the adapter hands out

    def handle_rows(self) -> list[tuple[int, int, bool, bool]]:
        """(fh, ino, is a directory, O_DIRECT) rows for `Operations.adopt`."""
        flags = self.handles["flags"]
        return list(zip(self.handles["fh"].tolist(), self.handles["ino"].tolist(),
                        (flags & HANDLE_DIR).astype(bool).tolist(),
                        (flags & HANDLE_DIRECT).astype(bool).tolist()))


def capture(owner: ConnectionId, refs: KernelRefs,
            handles: list[tuple[int, int, bool, bool]], next_fh: int,
            cached: InodeSet) -> ConnectionState:
    """The state to hand over, from the core's references (`Filesystem.kernel_refs`)
    and the adapter's opens and cached inodes (`Operations.open_handles`). It holds
    `refs` and `cached` themselves, not copies: encode it before the next request."""
    opens = np.zeros(len(handles), HANDLE)
    if handles:
        fh, ino, is_dir, direct = zip(*handles)
        opens["fh"], opens["ino"] = fh, ino
        opens["flags"] = (np.array(is_dir, np.uint32) * HANDLE_DIR
                          | np.array(direct, np.uint32) * HANDLE_DIRECT)
    return ConnectionState(owner, refs, opens, cached, next_fh)


def encode(state: ConnectionState) -> bytearray:
    """The chain's payload: its header (the u32 inodes per lookup block and per cached
    mask), then each of `TABLES` as a u32 count and its packed entries. A few array
    operations over the tables, each written once, in place; nothing per inode in
    Python."""
    lookups = state.refs.packed()
    opens = state.refs.open_counts()
    narrow = lookups.slots.max(axis=1, initial=0) < NARROW
    keys, slots = lookups.keys, lookups.slots
    if narrow.all():                    # the usual case: no count of 255 or more
        wide_keys, wide_slots = keys[:0], slots[:0]
    else:
        wide_keys, wide_slots = keys[~narrow], slots[~narrow]
        keys, slots = keys[narrow], slots[narrow]
    handles = state.handles
    columns = ((keys, slots), (wide_keys, wide_slots), (lookups.inos, lookups.counts),
               (np.fromiter(opens.keys(), np.uint64, len(opens)),
                np.fromiter(opens.values(), np.uint64, len(opens))),
               (handles["fh"], handles["ino"], handles["flags"]), state.cached.masks())
    counts = [len(cols[0]) for cols in columns]
    out = bytearray(_HEADER.size + sum(_COUNT.size + n * dtype.itemsize
                                       for n, (_, dtype) in zip(counts, TABLES)))
    _HEADER.pack_into(out, 0, BLOCK_INOS, SET_INOS)
    offset = _HEADER.size
    for (_, dtype), cols, n in zip(TABLES, columns, counts, strict=True):
        _COUNT.pack_into(out, offset, n)
        table = np.frombuffer(out, dtype, n, offset + _COUNT.size)
        for name, col in zip(dtype.names or (), cols, strict=True):
            table[name] = col
        offset += _COUNT.size + n * dtype.itemsize
    return out


def decode(payload: bytes) -> tuple[KernelRefs, np.ndarray, InodeSet]:
    """(refs, handles, cached) from a chain's payload; HandoverError naming what is
    wrong with it."""
    view = memoryview(payload)
    if len(view) < _HEADER.size:
        raise HandoverError("the guestfs-fuse chain ends before its header")
    block_inos, set_inos = _HEADER.unpack_from(view, 0)
    if (block_inos, set_inos) != (BLOCK_INOS, SET_INOS):
        raise HandoverError(f"the guestfs-fuse tables have blocks of {block_inos} inodes "
                            f"and masks of {set_inos}, this kernel's {BLOCK_INOS} and "
                            f"{SET_INOS}")
    found, offset = {}, _HEADER.size
    for name, dtype in TABLES:
        count = _read_count(view, offset, name)
        offset += _COUNT.size
        end = offset + count * dtype.itemsize
        if end > len(view):
            raise HandoverError(f"the guestfs-fuse table {name!r} runs past the end of "
                                "its chain")
        found[name] = np.frombuffer(view, dtype, count, offset)
        offset = end
    if offset != len(view):
        raise HandoverError(f"the guestfs-fuse chain has {len(view) - offset} bytes after "
                            "its tables")
    blocks, wide, big = found["blocks"], found["wide"], found["big"]
    if len(wide):
        keys = np.concatenate([blocks["key"], wide["key"]])
        slots = np.concatenate([blocks["counts"].astype(np.uint16), wide["counts"]])
    else:                               # the usual case: the bytes as they lie
        keys, slots = blocks["key"], blocks["counts"]
    lookups = PackedLookups(keys, slots, big["ino"], big["count"])
    _check_lookups(lookups)
    _check(found)
    opens = dict(zip(found["opens"]["ino"].tolist(), found["opens"]["count"].tolist()))
    cached = found["cached"]
    return (KernelRefs.restored(lookups, opens), found["handles"].copy(),
            InodeSet.from_masks(cached["key"], cached["bits"]))


def _read_count(view: memoryview, offset: int, what: str) -> int:
    if offset + _COUNT.size > len(view):
        raise HandoverError(f"the guestfs-fuse chain ends before the count of {what!r}")
    return _COUNT.unpack_from(view, offset)[0]


def _check_lookups(lookups: PackedLookups) -> None:
    keys, slots, inos = lookups.keys, lookups.slots, lookups.inos
    if has_duplicates(keys):
        raise HandoverError("the guestfs-fuse lookup blocks list a block twice")
    if not np.all(lookups.live):
        raise HandoverError("a guestfs-fuse lookup block holds no inode")
    if np.any(slots[keys == 0, 0]):
        raise HandoverError("the guestfs-fuse lookup blocks hold inode 0")
    if len(keys) and int(keys.max()) > _LAST_INO // BLOCK_INOS:
        raise HandoverError("a guestfs-fuse lookup block lies past the last inode number")
    if has_duplicates(inos):
        raise HandoverError("the guestfs-fuse big lookup counts list an inode twice")
    if np.any(lookups.counts < APART):
        raise HandoverError(f"a guestfs-fuse big lookup count is below {APART}")
    rows = lookups.rows_of(inos)
    listed = rows < len(keys)
    at = (inos % np.uint64(BLOCK_INOS)).astype(np.intp)
    if not np.all(listed) or np.any(slots[rows[listed], at[listed]] != APART) or \
            np.count_nonzero(slots == APART) != len(inos):
        raise HandoverError("the guestfs-fuse big lookup counts are not those of the "
                            f"wide counts of {APART}")


def _check(found: dict[str, np.ndarray]) -> None:
    opens, handles, cached = (found[n] for n in ("opens", "handles", "cached"))
    if np.any(opens["ino"] == 0) or np.any(opens["count"] == 0) or \
            has_duplicates(opens["ino"]):
        raise HandoverError("the guestfs-fuse opens name inode 0, an inode twice or no open")
    if np.any(handles["ino"] == 0):
        raise HandoverError("the guestfs-fuse handles name inode 0")
    if np.any(handles["flags"] & ~np.uint32(HANDLE_DIR | HANDLE_DIRECT)):
        raise HandoverError("a guestfs-fuse handle has unknown flags")
    if has_duplicates(cached["key"]) or np.any(cached["bits"] == 0):
        raise HandoverError("the guestfs-fuse cached inodes list a block twice or an empty "
                            "one")
    if np.any(cached["bits"][cached["key"] == 0] & 1):
        raise HandoverError("the guestfs-fuse cached inodes name inode 0")
    if len(cached) and int(cached["key"].max()) > _LAST_INO // SET_INOS:
        raise HandoverError("a guestfs-fuse cached-inode block lies past the last inode "
                            "number")


def to_fdt(state: ConnectionState, chain_phys: int) -> bytes:
    """The ``guestfs-fuse`` sub-FDT (sealed), naming the chain of its tables."""
    return build(FdtNode("", {
        "compatible": COMPATIBLE, "version": u32(VERSION), "pid": state.owner.pid,
        "device": state.owner.device, "next-fh": state.next_fh, "tables": chain_phys}),
        sealed=True)


@dataclass(frozen=True)
class _Header:
    owner: ConnectionId
    next_fh: int
    tables: int             # physical address of the chain


def from_fdt(blob: bytes) -> _Header:
    """Parse and check a ``guestfs-fuse-v2`` sub-FDT; HandoverError naming what is wrong."""
    r = FdtReader(blob, "the guestfs-fuse sub-FDT")
    r.check_seal()
    root = r.node("/")
    r.expect_compatible(root, COMPATIBLE)
    if r.u32(root, "version") != VERSION:
        raise HandoverError(f"the guestfs-fuse sub-FDT has version {r.u32(root, 'version')}, "
                            f"not {VERSION}")
    return _Header(ConnectionId(r.u64(root, "pid"), r.u64(root, "device")),
                   r.u64(root, "next-fh"), r.u64(root, "tables"))


def _check_handles(handles: np.ndarray, next_fh: int) -> None:
    fhs = handles["fh"]
    if has_duplicates(fhs) or (len(fhs) and (int(fhs.min()) == 0
                                                         or int(fhs.max()) >= next_fh)):
        raise HandoverError("the guestfs-fuse handles are not unique numbers below next-fh")


def claim(kho_in: IncomingHandover | None, owner: ConnectionId) -> ConnectionState:
    """The state handed over for connection `owner`; HandoverError if there is none or
    it belongs to another connection (then nothing of it may be trusted here). Its
    chain is read and checked whole, then its pages are freed."""
    if kho_in is None or NAME not in kho_in.subtrees:
        raise HandoverError("the handover keeps no FUSE connection")
    header = from_fdt(kho_in.retrieve_subtree(NAME)[1])
    if header.owner != owner:
        raise HandoverError(f"the handed-over FUSE connection is {header.owner}, not this "
                            f"one ({owner})")
    chain = walk_chain(kho_in.mem, header.tables, CHAIN_MAGIC)
    refs, handles, cached = decode(chain.payload)
    _check_handles(handles, header.next_fh)
    kho_in.free_chain(chain)
    return ConnectionState(owner, refs, handles, cached, header.next_fh)


class ConnectionHandover:
    """The KHO participant that writes the ``guestfs-fuse`` subtree and its chain at
    finalize, from `snapshot` (called then, while every request waits at the gate)."""

    name = NAME

    def __init__(self, snapshot: Callable[[], ConnectionState]) -> None:
        self.snapshot = snapshot
        self._chain: int | None = None

    def kho_finalize(self, kho: KHO) -> None:
        """Write the tables into preserved pages and add the subtree naming them."""
        state = self.snapshot()
        self._chain = write_chain(kho, encode(state), CHAIN_MAGIC)
        kho.add_subtree(NAME, to_fdt(state, self._chain))

    def kho_abort(self, kho: KHO) -> None:
        """Free the chain (the subtree added at finalize is dropped by KHO's own abort)."""
        if self._chain is not None:
            free_chain(kho, self._chain, CHAIN_MAGIC)
            self._chain = None
