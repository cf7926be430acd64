"""The filesystem's place in KHO: made once, found again by every later kernel.

Everything the filesystem has lives in the ``guestfs`` pool (`kho.create_pool`),
preserved from allocation, so no kexec serializes anything: the ``guestfs`` subtree
(``compatible = "guestfs-v2"``, docs/handover-abi.md) only says where the superblock
is, and is written once when the filesystem is made. The next kernel, booted by kexec,
by a later mount or after the daemon died, takes the pool back whole
(`kho_in.restore_pool`), lets the journal finish or undo what was cut short, and opens
the store; nothing else is read until it is used. A ``guestfs-v1`` handover (release
0.2.0) is converted once (`guestfs.upgrade_v1`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guestfs import upgrade_v1
from guestfs.atime import AtimePolicy
from guestfs.errors import FsError
from guestfs.filesystem import Filesystem
from guestfs.refs import KernelRefs
from guestfs.store.journal import JournalError, TxnTooLarge
from guestfs.store.page import CorruptPage, Pages
from guestfs.store.store import MetaStore
from guestfs.store.superblock import Superblock
from kho_backend.arena import Arena
from kho_backend.errors import HandoverError, KhoError
from kho_backend.fdt import FdtNode, FdtReader, build, u32
from kho_backend.units import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from kho_backend.boot import Kernel
    from kho_backend.kho import KHO
    from kho_backend.kho_in import IncomingHandover

log = logging.getLogger(__name__)

COMPATIBLE = "guestfs-v2"
NAME = "guestfs"
POOL = "guestfs"


@dataclass(frozen=True)
class Subtree:
    """What the ``guestfs`` subtree says."""

    superblock_phys: int
    pool: str
    uuid: str


def subtree_fdt(sub: Subtree) -> bytes:
    """The ``guestfs`` sub-FDT (sealed)."""
    return build(FdtNode("", {"compatible": COMPATIBLE, "page-size": u32(PAGE_SIZE),
                              "superblock": sub.superblock_phys, "pool": sub.pool,
                              "uuid": sub.uuid}), sealed=True)


def compatible_of(blob: bytes) -> str:
    """The ``compatible`` of a ``guestfs`` sub-FDT (any version); HandoverError if the
    blob is no sound FDT."""
    r = FdtReader(blob, "the guestfs sub-FDT")
    return r.string(r.node("/"), "compatible")


def read_subtree(blob: bytes) -> Subtree:
    """Parse and check a ``guestfs-v2`` sub-FDT; HandoverError naming what is wrong."""
    r = FdtReader(blob, "the guestfs sub-FDT")
    r.check_seal()
    root = r.node("/")
    r.expect_compatible(root, COMPATIBLE)
    page_size = r.u32(root, "page-size")
    if page_size != PAGE_SIZE:
        raise HandoverError(f"the guestfs handover uses {page_size}-byte pages; this kernel "
                            f"uses {PAGE_SIZE}")
    phys = r.u64(root, "superblock")
    if phys % PAGE_SIZE:
        raise HandoverError(f"the guestfs superblock address {phys:#x} is not page-aligned")
    return Subtree(phys, r.string(root, "pool"), r.string(root, "uuid"))


class GuestfsHandover:
    """The KHO participant of one mounted filesystem. A handover has nothing to write
    (the filesystem is in its pool all along); finalize checks that no transaction is
    open, since the quiesce gate should have let every request finish, and writes the
    counters the store keeps in memory (one small transaction: the next kernel then
    need not recount the inodes)."""

    name = NAME

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    def kho_finalize(self, kho: KHO) -> None:
        """Refuse to hand over in the middle of a transaction."""
        if self.fs.store.journal.busy:
            raise KhoError("guestfs has a metadata transaction open; the handover would "
                           "leave it to the next kernel's recovery")
        self.fs.reap_pending()      # what waits to be freed need not wait for the next kernel
        try:
            self.fs.store.flush_counters()
        except (CorruptPage, TxnTooLarge) as e:     # rolled back: the flag stays set
            log.warning("guestfs counters left for the next mount to recount: %s", e)

    def kho_abort(self, kho: KHO) -> None:
        """Nothing to undo."""


def format(kernel: Kernel, *, atime: AtimePolicy = AtimePolicy()) -> Filesystem:
    """Make a new filesystem in a new ``guestfs`` pool, and publish where it is."""
    pool = kernel.kho.create_pool(POOL)
    fs = Filesystem.format(kernel.arena, pool, atime=atime)
    _publish(kernel.kho, fs)
    return fs


def restore(kernel: Kernel, *, atime: AtimePolicy = AtimePolicy(),
            refs: KernelRefs | None = None) -> Filesystem | None:
    """The filesystem handed over to `kernel` (by kexec, an unmount, or a kernel that
    died), or None when there is none. Opens the store (recovering its journal), frees
    what the orphan list holds, counts the boot in the superblock's generation and
    publishes the subtree for the next kernel. `refs` are the kernel references of a
    FUSE connection kept across the kexec (`Filesystem.adopt_kernel_refs`): the orphans
    they hold stay. HandoverError if the superblock or the journal cannot be trusted:
    the arena keeps the handover for an inspection or retry.
    """
    kho_in = kernel.kho_in
    if kho_in is None or NAME not in kho_in.subtrees:
        return None
    _, blob = kho_in.retrieve_subtree(NAME)
    if compatible_of(blob) == upgrade_v1.COMPATIBLE:
        fs = upgrade_v1.upgrade(kernel, blob, POOL, atime=atime)
    else:
        fs = _open(kernel, read_subtree(blob), atime, refs)
    _publish(kernel.kho, fs)
    return fs


def waiting_generation(arena: Arena, kho_in: IncomingHandover) -> int | None:
    """The generation the filesystem in a handover will run at its next mount (read
    without changing anything: for ``guestfs status``), or None if it has none or it
    cannot be read."""
    try:
        blob = kho_in.retrieve_subtree(NAME)[1]
        if compatible_of(blob) == upgrade_v1.COMPATIBLE:
            return upgrade_v1.read_superblock(blob).generation
        pfn = read_subtree(blob).superblock_phys >> PAGE_SHIFT
        return Superblock.read(Pages(arena), pfn).generation + 1
    except (HandoverError, CorruptPage):
        return None


def _open(kernel: Kernel, sub: Subtree, atime: AtimePolicy,
          refs: KernelRefs | None) -> Filesystem:
    if sub.pool != POOL:
        raise HandoverError(f"the guestfs subtree names the pool {sub.pool!r}, not {POOL!r}")
    pool = kernel.kho_in.restore_pool(POOL)
    sb_pfn = sub.superblock_phys >> PAGE_SHIFT
    if not pool.owns(sb_pfn, 0):
        raise HandoverError(f"the guestfs superblock at {sub.superblock_phys:#x} is not a "
                            "page of the guestfs pool")
    try:
        store, _ = MetaStore.open(kernel.arena, pool, sb_pfn)
    except (CorruptPage, JournalError) as e:
        raise HandoverError(f"the guestfs metadata cannot be trusted: {e}") from None
    if store.sb.uuid != sub.uuid:
        raise HandoverError(f"the guestfs superblock is of filesystem {store.sb.uuid}; the "
                            f"subtree names {sub.uuid}")
    fs = Filesystem(store, atime=atime)
    if refs is not None:
        fs.adopt_kernel_refs(refs)
    try:
        finished = fs.finish_orphans()
        if finished:
            log.info("freed or truncated %d orphaned inodes", finished)
    except FsError as e:        # they stay listed; the filesystem serves without them
        log.error("orphaned inodes left for a later mount: %s", e)
    try:
        fs.count_boot()
    except FsError as e:
        raise HandoverError(f"the guestfs superblock cannot be updated: {e}") from None
    return fs


def _publish(kho: KHO, fs: Filesystem) -> None:
    kho.add_subtree(NAME, subtree_fdt(Subtree(fs.store.sb_pfn << PAGE_SHIFT, POOL,
                                              fs.sb.uuid)))
