"""The FUSE connection's own state, handed over across an in-process kexec.

When the next kernel boots in the same process and keeps the mount (the daemon's
`_switch`), the kernel's FUSE connection outlives the old kernel: its lookup references
and open files stay valid. What the old kernel knew of them (the core's lookup and open
counts per inode, the adapter's file-handle table, which inodes may have pages in the
kernel's page cache) is not kernel memory to rebuild from the tree, so it is handed over
explicitly, as LUO preserves a file descriptor: the ``guestfs-fuse`` KHO subtree
(``compatible = "guestfs-fuse-v1"``, docs/handover-abi.md). It names the connection it
belongs to (the daemon's pid and the mount's device number); only a kernel booted in
that process on that connection claims it. Any other boot (an exec, a later mount, a
crash boot) leaves it unclaimed and it is freed at the end of boot with the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kho_backend.errors import HandoverError, KhoError
from kho_backend.fdt import FdtNode, FdtReader, build, u32
from kho_backend.units import MAX_ORDER, PAGE_SIZE

if TYPE_CHECKING:
    from kho_backend.kho import KHO
    from kho_backend.kho_in import IncomingHandover

COMPATIBLE = "guestfs-fuse-v1"
NAME = "guestfs-fuse"
VERSION = 1

#: One kernel reference per inode: lookups the kernel holds, files it has open.
REF = np.dtype([("ino", "<u8"), ("lookups", "<u8"), ("opens", "<u4")])
#: One open of the adapter: its file handle, inode and `HANDLE_*` flags.
HANDLE = np.dtype([("fh", "<u8"), ("ino", "<u8"), ("flags", "<u4")])
HANDLE_DIR = 1          # an open directory (else a file)
HANDLE_DIRECT = 2       # a file opened with O_DIRECT
#: Inodes whose pages the kernel may hold in its page cache.
CACHED = np.dtype("<u8")
#: The largest sub-FDT KHO keeps in one folio.
MAX_BLOB = PAGE_SIZE << MAX_ORDER


@dataclass(frozen=True)
class ConnectionId:
    """Which FUSE connection: the serving process and the mount's device number."""

    pid: int
    device: int


@dataclass
class ConnectionState:
    """What a kept FUSE connection carries from one kernel to the next."""

    owner: ConnectionId
    refs: np.ndarray        # of REF
    handles: np.ndarray     # of HANDLE
    cached: np.ndarray      # of CACHED
    next_fh: int            # the next file handle the adapter hands out

    def ref_lists(self) -> tuple[list[int], list[int], list[int]]:
        """(inos, lookups, opens) for `Filesystem.adopt_refs`."""
        return (self.refs["ino"].tolist(), self.refs["lookups"].tolist(),
                self.refs["opens"].tolist())

    def handle_rows(self) -> list[tuple[int, int, bool, bool]]:
        """(fh, ino, is a directory, O_DIRECT) rows for `Operations.adopt`."""
        flags = self.handles["flags"]
        return list(zip(self.handles["fh"].tolist(), self.handles["ino"].tolist(),
                        (flags & HANDLE_DIR).astype(bool).tolist(),
                        (flags & HANDLE_DIRECT).astype(bool).tolist()))


def capture(owner: ConnectionId, refs: tuple[list[int], list[int], list[int]],
            handles: list[tuple[int, int, bool, bool]], next_fh: int,
            cached: list[int]) -> ConnectionState:
    """The state to hand over, from the core's references (`Filesystem.kernel_refs`)
    and the adapter's opens (`Operations.open_handles`)."""
    table = np.zeros(len(refs[0]), REF)
    table["ino"], table["lookups"], table["opens"] = refs
    opens = np.zeros(len(handles), HANDLE)
    if handles:
        fh, ino, is_dir, direct = zip(*handles)
        opens["fh"], opens["ino"] = fh, ino
        opens["flags"] = (np.array(is_dir, np.uint32) * HANDLE_DIR
                          | np.array(direct, np.uint32) * HANDLE_DIRECT)
    return ConnectionState(owner, table, opens, np.array(cached, CACHED), next_fh)


def to_fdt(state: ConnectionState) -> bytes:
    """The ``guestfs-fuse`` sub-FDT (sealed)."""
    return build(FdtNode("", {
        "compatible": COMPATIBLE, "version": u32(VERSION), "pid": state.owner.pid,
        "device": state.owner.device, "next-fh": state.next_fh,
        "refs": _raw(state.refs, REF), "handles": _raw(state.handles, HANDLE),
        "cached": _raw(state.cached, CACHED)}), sealed=True)


def _raw(table: np.ndarray, dtype: np.dtype) -> bytes:
    # A leading count makes an empty table a valid (non-empty) property.
    return u32(len(table)) + np.ascontiguousarray(table, dtype).tobytes()


def from_fdt(blob: bytes) -> ConnectionState:
    """Parse and check a ``guestfs-fuse-v1`` sub-FDT; HandoverError naming what is wrong."""
    r = FdtReader(blob, "the guestfs-fuse sub-FDT")
    r.check_seal()
    root = r.node("/")
    r.expect_compatible(root, COMPATIBLE)
    if r.u32(root, "version") != VERSION:
        raise HandoverError(f"the guestfs-fuse sub-FDT has version {r.u32(root, 'version')}, "
                            f"not {VERSION}")
    refs = _table(r, root, "refs", REF)
    handles = _table(r, root, "handles", HANDLE)
    cached = _table(r, root, "cached", CACHED)
    next_fh = r.u64(root, "next-fh")
    _check(refs, handles, next_fh)
    return ConnectionState(ConnectionId(r.u64(root, "pid"), r.u64(root, "device")),
                           refs, handles, cached, next_fh)


def _table(r: FdtReader, node: int, name: str, dtype: np.dtype) -> np.ndarray:
    raw = r.raw(node, name)
    count = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else -1
    if count < 0 or len(raw) != 4 + count * dtype.itemsize:
        raise HandoverError(f"the guestfs-fuse property {name!r} is {len(raw)} bytes, not a "
                            f"count and whole {dtype.itemsize}-byte entries")
    return np.frombuffer(raw, dtype, count, 4).copy()


def _check(refs: np.ndarray, handles: np.ndarray, next_fh: int) -> None:
    for what, inos in (("refs", refs["ino"]), ("handles", handles["ino"])):
        if len(inos) and int(inos.min()) == 0:
            raise HandoverError(f"the guestfs-fuse {what} name inode 0")
    if len(np.unique(refs["ino"])) != len(refs):
        raise HandoverError("the guestfs-fuse refs list an inode twice")
    fhs = handles["fh"]
    if len(np.unique(fhs)) != len(fhs) or (len(fhs) and (int(fhs.min()) == 0
                                                         or int(fhs.max()) >= next_fh)):
        raise HandoverError("the guestfs-fuse handles are not unique numbers below next-fh")
    if np.any(handles["flags"] & ~np.uint32(HANDLE_DIR | HANDLE_DIRECT)):
        raise HandoverError("a guestfs-fuse handle has unknown flags")


def claim(kho_in: IncomingHandover | None, owner: ConnectionId) -> ConnectionState:
    """The state handed over for connection `owner`; HandoverError if there is none or
    it belongs to another connection (then nothing of it may be trusted here)."""
    if kho_in is None or NAME not in kho_in.subtrees:
        raise HandoverError("the handover keeps no FUSE connection")
    state = from_fdt(kho_in.retrieve_subtree(NAME)[1])
    if state.owner != owner:
        raise HandoverError(f"the handed-over FUSE connection is {state.owner}, not this "
                            f"one ({owner})")
    return state


class ConnectionHandover:
    """The KHO participant that writes the ``guestfs-fuse`` subtree at finalize, from
    `snapshot` (called then, while every request waits at the gate)."""

    name = NAME

    def __init__(self, snapshot: Callable[[], ConnectionState]) -> None:
        self.snapshot = snapshot

    def kho_finalize(self, kho: KHO) -> None:
        """Add the subtree; KhoError if it would not fit one KHO folio."""
        blob = to_fdt(self.snapshot())
        if len(blob) > MAX_BLOB:
            raise KhoError(f"the kernel holds too many inodes and open files to keep the "
                           f"mount ({len(blob)} bytes of state, at most {MAX_BLOB}); "
                           "kexec with --exec")
        kho.add_subtree(NAME, blob)

    def kho_abort(self, kho: KHO) -> None:
        """The subtree added at finalize is dropped by KHO's own abort."""
