"""The FUSE connection's own state, handed over across an in-process kexec.

When the next kernel boots in the same process and keeps the mount (the daemon's
`_switch`), the kernel's FUSE connection outlives the old kernel: its lookup references
and open files stay valid. What the old kernel knew of them (the core's lookup and open
counts per inode, the adapter's file-handle table, which inodes may have pages in the
kernel's page cache) is not kernel memory to rebuild from the tree, so it is handed over
explicitly, as LUO preserves a file descriptor: the ``guestfs-fuse`` KHO subtree
(``compatible = "guestfs-fuse-v1"``, docs/handover-abi.md), whose tables lie in a
preserved page chain, so their size has no limit but the arena. It names the connection it
belongs to (the daemon's pid and the mount's device number); only a kernel booted in
that process on that connection claims it. Any other boot (an exec, a later mount, a
crash boot) leaves it unclaimed and it is freed at the end of boot with the rest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from guestfs.refs import BLOCK_INOS, KernelRefs
from kho_backend.chain import free_chain, walk_chain, write_chain
from kho_backend.errors import HandoverError
from kho_backend.fdt import FdtNode, FdtReader, build, u32
from kho_backend.memmap import has_duplicates

if TYPE_CHECKING:
    from kho_backend.kho import KHO
    from kho_backend.kho_in import IncomingHandover

COMPATIBLE = "guestfs-fuse-v1"
NAME = "guestfs-fuse"
VERSION = 1
#: Magic of the preserved page chain that holds the tables (kho_backend.chain).
CHAIN_MAGIC = b"GFCN"

#: A block of lookup counts: `BLOCK_INOS` counts, then how many of them are not zero.
BLOCK = np.dtype([("slots", "<u8", (BLOCK_INOS + 1,))])
#: One inode with files open: the inode and how many opens are not released.
OPEN = np.dtype([("ino", "<u8"), ("count", "<u8")])
#: One open of the adapter: its file handle, inode and `HANDLE_*` flags.
HANDLE = np.dtype([("fh", "<u8"), ("ino", "<u8"), ("flags", "<u4")])
HANDLE_DIR = 1          # an open directory (else a file)
HANDLE_DIRECT = 2       # a file opened with O_DIRECT
#: Inodes whose pages the kernel may hold in its page cache.
CACHED = np.dtype("<u8")
#: The tables of the chain's payload, in order, after its u32 block size.
TABLES = (("keys", np.dtype("<u8")), ("blocks", BLOCK), ("opens", OPEN),
          ("handles", HANDLE), ("cached", CACHED))
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
    cached: np.ndarray      # of CACHED
    next_fh: int            # the next file handle the adapter hands out

    def handle_rows(self) -> list[tuple[int, int, bool, bool]]:
        """(fh, ino, is a directory, O_DIRECT) rows for `Operations.adopt`."""
        flags = self.handles["flags"]
        return list(zip(self.handles["fh"].tolist(), self.handles["ino"].tolist(),
                        (flags & HANDLE_DIR).astype(bool).tolist(),
                        (flags & HANDLE_DIRECT).astype(bool).tolist()))


def capture(owner: ConnectionId, refs: KernelRefs,
            handles: list[tuple[int, int, bool, bool]], next_fh: int,
            cached: list[int]) -> ConnectionState:
    """The state to hand over, from the core's references (`Filesystem.kernel_refs`)
    and the adapter's opens (`Operations.open_handles`)."""
    opens = np.zeros(len(handles), HANDLE)
    if handles:
        fh, ino, is_dir, direct = zip(*handles)
        opens["fh"], opens["ino"] = fh, ino
        opens["flags"] = (np.array(is_dir, np.uint32) * HANDLE_DIR
                          | np.array(direct, np.uint32) * HANDLE_DIRECT)
    return ConnectionState(owner, refs, opens, np.array(cached, CACHED), next_fh)


def encode(state: ConnectionState) -> bytes:
    """The chain's payload: the u32 block size, then each of `TABLES` as a u32 count and
    its packed entries. Costs a copy of the tables (13 bytes per inode the kernel holds
    when it holds a whole tree), nothing per inode in Python."""
    keys, raw = state.refs.raw_blocks()
    opens = state.refs.open_counts()
    tables = (np.array(keys, "<u8"), np.frombuffer(raw, BLOCK),
              np.array(list(opens.items()), "<u8").view(OPEN).reshape(-1),
              state.handles, state.cached)
    parts = [_COUNT.pack(BLOCK_INOS)]
    for (_, dtype), table in zip(TABLES, tables, strict=True):
        parts += [_COUNT.pack(len(table)), np.ascontiguousarray(table, dtype).tobytes()]
    return b"".join(parts)


def decode(payload: bytes) -> tuple[KernelRefs, np.ndarray, np.ndarray]:
    """(refs, handles, cached) from a chain's payload; HandoverError naming what is
    wrong with it."""
    view = memoryview(payload)
    block_inos = _read_count(view, 0, "block size")
    if block_inos != BLOCK_INOS:
        raise HandoverError(f"the guestfs-fuse lookup blocks hold {block_inos} inodes, "
                            f"this kernel's {BLOCK_INOS}")
    found, offset = {}, _COUNT.size
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
    _check(found)
    opens = dict(zip(found["opens"]["ino"].tolist(), found["opens"]["count"].tolist()))
    refs = KernelRefs.restored(found["keys"].tolist(), found["blocks"].tobytes(), opens)
    return refs, found["handles"].copy(), found["cached"].copy()


def _read_count(view: memoryview, offset: int, what: str) -> int:
    if offset + _COUNT.size > len(view):
        raise HandoverError(f"the guestfs-fuse chain ends before the count of {what!r}")
    return _COUNT.unpack_from(view, offset)[0]


def _check(found: dict[str, np.ndarray]) -> None:
    keys, blocks, opens, handles = (found[n] for n in ("keys", "blocks", "opens", "handles"))
    if len(keys) != len(blocks):
        raise HandoverError(f"the guestfs-fuse chain has {len(keys)} block keys for "
                            f"{len(blocks)} blocks")
    if has_duplicates(keys):
        raise HandoverError("the guestfs-fuse lookup blocks list a block twice")
    slots = blocks["slots"]
    counts = slots[:, :BLOCK_INOS]
    live = np.count_nonzero(counts, axis=1)
    if np.any(live != slots[:, BLOCK_INOS]) or np.any(live == 0):
        raise HandoverError("a guestfs-fuse lookup block's count of held inodes is wrong")
    if np.any(counts[keys == 0, 0]):
        raise HandoverError("the guestfs-fuse lookup blocks hold inode 0")
    if np.any(opens["ino"] == 0) or np.any(opens["count"] == 0) or \
            has_duplicates(opens["ino"]):
        raise HandoverError("the guestfs-fuse opens name inode 0, an inode twice or no open")
    if np.any(handles["ino"] == 0):
        raise HandoverError("the guestfs-fuse handles name inode 0")
    if np.any(handles["flags"] & ~np.uint32(HANDLE_DIR | HANDLE_DIRECT)):
        raise HandoverError("a guestfs-fuse handle has unknown flags")


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
    """Parse and check a ``guestfs-fuse-v1`` sub-FDT; HandoverError naming what is wrong."""
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
