"""Hand a guestfs filesystem over through KHO, and take it back after kexec.

The outgoing kernel (`GuestfsHandover`, a KHO participant) writes the superblock as the
``guestfs`` sub-FDT (`guestfs.subtree`) and every inode into the inode table
(`guestfs.inode_table`) in a chain of preserved pages. Data pages are never copied: each
file's page map is recorded as extents and its pages and folios are preserved where they
are. The incoming kernel (`restore`) validates all of it before it claims a single
page, rebuilds the inodes with page maps pointing at the same PFNs, and frees the inode
table's pages. The byte layouts are specified in docs/handover-abi.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from guestfs import inode_table, subtree
from guestfs.filesystem import Filesystem
from guestfs.inode import Inode
from guestfs.superblock import Superblock
from kho_backend.chain import free_chain, walk_chain, write_chain
from kho_backend.errors import HandoverError

if TYPE_CHECKING:
    from kho_backend.boot import Kernel
    from kho_backend.kho import KHO


@dataclass
class _Outgoing:
    """What one finalize did, so that an abort can undo exactly that."""

    table_phys: int = 0
    preserved: dict[int, np.ndarray] = field(default_factory=dict)
    subtree_added: bool = False


class GuestfsHandover:
    """The KHO participant that serializes one mounted filesystem at finalize."""

    name = subtree.NAME

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self._out: _Outgoing | None = None

    def kho_finalize(self, kho: KHO) -> None:
        """Write the inode table, preserve every data page, add the ``guestfs`` subtree."""
        out = self._out = _Outgoing()
        table = inode_table.encode_table(self.fs)
        out.table_phys = write_chain(kho, table.payload, inode_table.MAGIC)
        for order, pfns in table.data_pfns.items():
            kho.preserve_pfns(pfns, order)
            out.preserved[order] = pfns
        kho.add_subtree(subtree.NAME, subtree.superblock_fdt(self.fs.sb, table, out.table_phys))
        out.subtree_added = True

    def kho_abort(self, kho: KHO) -> None:
        """Undo `kho_finalize`: the filesystem goes on as if nothing happened."""
        out, self._out = self._out, None
        if out is None:
            return
        if out.subtree_added:
            kho.remove_subtree(subtree.NAME)
        for order, pfns in out.preserved.items():
            kho.unpreserve_pfns(pfns, order)
        if out.table_phys:
            free_chain(kho, out.table_phys, inode_table.MAGIC)


# --- restore ----------------------------------------------------------------------


def restore(kernel: Kernel) -> Filesystem | None:
    """The filesystem handed over to `kernel`, or None when there is none to restore.

    Everything is checked (the sub-FDT's seal and version, the inode table's chain and
    checksums, the counts, the directory tree, that every mapped page was preserved
    exactly so) before the filesystem exists; a handover that fails any check raises
    HandoverError and leaves the arena's data as it was, so that it can be inspected.
    """
    kho_in = kernel.kho_in
    if kho_in is None or subtree.NAME not in kho_in.subtrees:
        return None
    _, blob = kho_in.retrieve_subtree(subtree.NAME)
    meta = subtree.read_superblock(blob)
    try:
        chain = walk_chain(kernel.arena, meta.table_phys, inode_table.MAGIC)
    except HandoverError as e:
        raise HandoverError(f"the guestfs inode table cannot be trusted: {e}") from None
    if len(chain.payload) != meta.table_size:
        raise HandoverError(f"the guestfs inode table holds {len(chain.payload)} bytes; "
                            f"the sub-FDT says {meta.table_size}")
    table = inode_table.decode_table(chain.payload, meta.sb.next_ino)
    _check_counts(meta, len(table.inodes), table.dirents, len(table.extents),
                  table.data_pages)
    fs = _build(kernel, meta.sb, table.inodes)
    for order, pfns in inode_table.extent_heads(table.extents).items():
        kho_in.restore_pfns(pfns, order)
    kho_in.free_chain(chain)
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


def _check_counts(meta: subtree.HandedOver, inodes: int, dirents: int, extents: int,
                  data_pages: int) -> None:
    for what, said, found in (("inodes", meta.inode_count, inodes),
                              ("directory entries", meta.dirent_count, dirents),
                              ("extents", meta.extent_count, extents),
                              ("data pages", meta.data_pages, data_pages)):
        if said != found:
            raise HandoverError(f"the guestfs sub-FDT counts {said} {what}; the inode table "
                                f"holds {found}")
