"""The ``guestfs`` KHO subtree: the superblock as the properties of a sub-FDT.

``compatible = "guestfs-v1"``; it says where the inode table lies and how many records
it holds, so that a reader can check one against the other. The layout is specified in
docs/handover-abi.md, "guestfs sub-FDT".
"""

from __future__ import annotations

from dataclasses import dataclass

from guestfs.inode import ROOT_INO
from guestfs.inode_table import U32_END, U63_END, EncodedTable
from guestfs.superblock import MAX_FILE_SIZE, MAX_INODES, Superblock
from kho_backend.errors import HandoverError
from kho_backend.fdt import FdtNode, FdtReader, build, u32
from kho_backend.units import PAGE_SIZE

COMPATIBLE = "guestfs-v1"
NAME = "guestfs"


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
