"""docs/handover-abi.md and the code that defines each format say the same thing.

Every layout table of the document is compared with the one definition in code: byte
offsets and sizes with the struct formats (machine header, scratch entry, KHO memory-map
chunk and element, chain page), property names and types with FDTs the code really
builds (KHO root, kexec-metadata, guestfs sub-FDT), keys and columns with an inode table
the code really encodes; and the magics, versions and `compatible` strings the document
names with the constants.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import msgpack
import pytest
from conftest_machine import BootKernel, boot_kernel, machine_env, unique_name  # noqa: F401

from guestfs import inode_table, subtree
from guestfs.filesystem import Ctx, Filesystem
from guestfs.handover import GuestfsHandover
from kho_backend import chain, header, kexec_metadata, kho, kho_mem
from kho_backend.fdt import FdtReader

DOC = Path(__file__).resolve().parents[2] / "docs" / "handover-abi.md"
_ROOT = Ctx(uid=0, gid=0)


def sections() -> dict[str, str]:
    """The document's ``## `` sections by title."""
    parts = re.split(r"^## (.+)$", DOC.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def section(title_start: str) -> str:
    found = [body for title, body in sections().items() if title.startswith(title_start)]
    assert len(found) == 1, f"one section starting {title_start!r} in {DOC.name}"
    return found[0]


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`: rows of cells, header and rule left out."""
    out, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            out.append([r for r in rows[2:]])
            rows = []
    return out


def struct_layout(fmt: str) -> list[tuple[int, int]]:
    """(offset, size) of every field of a little-endian struct format."""
    out, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt.lstrip("<")):
        n = int(count or 1)
        sizes = [n] if code == "s" else [struct.calcsize("<" + code)] * n
        for size in sizes:
            out.append((offset, size))
            offset += size
    return out


def offsets_sizes(table: list[list[str]]) -> list[tuple[int, int]]:
    """The offset and size columns; a size like ``72 × 56`` is multiplied out."""
    def number(text: str) -> int:
        product = 1
        for factor in text.replace("×", "x").split("x"):
            product *= int(factor)
        return product
    return [(int(row[0]), number(row[1])) for row in table]


def code_names(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


# --- fixed layouts ------------------------------------------------------------------


def test_machine_header_layout() -> None:
    text = section("Machine header")
    fixed, entry = tables(text)[:2]
    expected = struct_layout(header.HEADER_FIELDS.format) + [
        (header.SCRATCH_TABLE_OFFSET, header.MAX_SCRATCH * header.SCRATCH_ENTRY.size),
        (header.HEADER_END, header.HEADER_SIZE - header.HEADER_END)]
    assert offsets_sizes(fixed) == expected
    assert offsets_sizes(entry) == struct_layout(header.SCRATCH_ENTRY.format)
    assert f"magic `{header.MAGIC.decode()}`" in fixed[0][3]
    assert fixed[2][0] == str(header.CRC_OFFSET) and "CRC32" in fixed[2][3]
    assert f"Format version {header.VERSION}:" in text


def test_memory_map_chunk_layout() -> None:
    chunk, element = tables(section("Preserved-memory map"))[:2]
    expected = struct_layout(kho_mem.CHUNK_HDR.format) + [
        (kho_mem.CHUNK_HDR.size, kho_mem.ELM_DTYPE.itemsize * kho_mem.KHOSER_BITMAP_SIZE)]
    assert offsets_sizes(chunk) == expected
    assert f"`{kho_mem.CHUNK_MAGIC.decode()}`" in chunk[0][3]
    assert chunk[3][0] == str(kho_mem.CHUNK_CRC_OFFSET) and "CRC32" in chunk[3][3]
    dtype = kho_mem.ELM_DTYPE
    assert offsets_sizes(element) == [(dtype.fields[name][1], dtype.fields[name][0].itemsize)
                                      for name in dtype.names]


def test_chain_page_layout() -> None:
    page = tables(section("Chain pages"))[0]
    assert offsets_sizes(page) == struct_layout(chain.CHAIN_HDR.format) + [
        (chain.CHAIN_HDR.size, chain.CHAIN_PAYLOAD)]
    assert page[1][3] == f"version: {chain.CHAIN_VERSION}"
    assert page[4][0] == str(chain.CHAIN_CRC_OFFSET) and "CRC32" in page[4][3]
    assert f"magic `{inode_table.MAGIC.decode()}`" in section("guestfs inode table")


# --- FDTs and the inode table, as the code writes them --------------------------------


def fdt_properties(blob: bytes, path: str = "/") -> dict[str, str]:
    """{name: type} of a node's properties: string, u32 or u64 by their encoding."""
    r = FdtReader(blob, "a test FDT")
    node = r.node(path)
    out = {}
    for name, raw in r.properties(node):
        if raw.endswith(b"\0") and len(raw) not in (4, 8):
            out[name] = "string"
        else:
            out[name] = {4: "u32", 8: "u64"}.get(len(raw), "string")
    return out


def documented_properties(table: list[list[str]]) -> dict[str, str]:
    return {code_names(row[0])[0]: row[1] for row in table if not row[0].startswith("node")}


@pytest.fixture
def handed_over(boot_kernel: BootKernel) -> tuple[dict[str, bytes], bytes]:
    """A real handover of a small tree: {subtree: blob}, the root FDT and the table."""
    kernel = boot_kernel(unique_name("abi"), memory=16 << 20)
    kernel.finish_boot()
    fs = Filesystem(kernel)
    kernel.kho.register(GuestfsHandover(fs))
    d = fs.mkdir(1, b"d", 0o755, _ROOT)
    f = fs.create(d.ino, b"f", 0o644, _ROOT)
    fs.write(f.ino, 0, b"data")
    fs.symlink(1, b"l", b"d/f", _ROOT)
    fs.setxattr(f.ino, b"user.k", b"v", _ROOT)
    table = inode_table.encode_table(fs).payload
    kernel.kexec.prepare({"quiesce": 1})
    root_phys, root_size = kernel.kho.fdt
    blobs = {name: bytes(kernel.arena.phys_view(sub.phys, sub.size))
             for name, sub in kernel.kho.subtrees.items()}
    blobs["/"] = bytes(kernel.arena.phys_view(root_phys, root_size))
    return blobs, table


def test_kho_root_fdt_properties(handed_over: tuple[dict[str, bytes], bytes]) -> None:
    blobs, _ = handed_over
    root, child = tables(section("KHO root FDT"))[:2]
    assert fdt_properties(blobs["/"]) == documented_properties(root)
    assert fdt_properties(blobs["/"], "/" + subtree.NAME) == documented_properties(child)
    assert f'`"{kho.KHO_COMPATIBLE}"`' in root[0][2]


def test_kexec_metadata_properties(handed_over: tuple[dict[str, bytes], bytes]) -> None:
    blobs, _ = handed_over
    table = tables(section("kexec-metadata subtree"))[0]
    blob = blobs[kexec_metadata.METADATA_NODE]
    assert fdt_properties(blob) == documented_properties(table)
    assert "node `phases`" in table[-1][0] and fdt_properties(blob, "/phases")
    assert f'`"{kexec_metadata.METADATA_COMPATIBLE}"`' in table[0][2]
    assert table[1][2] == str(kexec_metadata.METADATA_VERSION)


def test_guestfs_subtree_properties(handed_over: tuple[dict[str, bytes], bytes]) -> None:
    blobs, _ = handed_over
    table = tables(section("guestfs sub-FDT"))[0]
    assert fdt_properties(blobs[subtree.NAME]) == documented_properties(table)
    assert f"`{subtree.COMPATIBLE}`" in table[0][2]
    assert f"(`{subtree.COMPATIBLE}`)" in [t for t in sections() if t.startswith("guestfs sub-FDT")][0]


def test_inode_table_keys_and_columns(handed_over: tuple[dict[str, bytes], bytes]) -> None:
    _, payload = handed_over
    keys, ranges = tables(section("guestfs inode table"))[:2]
    doc = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    assert [code_names(row[0])[0] for row in keys] == list(doc) == list(inode_table.KEYS)
    columns = re.search(r"`\[([^\]]+)\]`", keys[0][1]).group(1).replace(" ", "").split(",")
    assert tuple(columns) == inode_table.ATTRS
    ranged = {name for row in ranges for name in code_names(row[0])}
    assert set(inode_table.ATTRS) - {"ino"} <= ranged | {"ino"} and "ino" in ranged
