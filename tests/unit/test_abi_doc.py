"""docs/handover-abi.md and the code that defines each format say the same thing.

Every layout table of the document is compared with the one definition in code: byte
offsets and sizes with the struct formats (machine header version 2 and its static and
dynamic parts, version 1, scratch entry, kho-v1 memory-map chunk and element, chain
page), the radix tree's levels and key encoding with ``kho_radix`` and with a tree the
code really writes, property names and types with FDTs the code really builds (kho-v3
root, subtree and pool nodes, kexec-metadata, guestfs sub-FDT) or release 0.2.0 built
(the kho-v1 root of the compatibility fixture), keys and columns with an inode table the
code really encodes; and the magics, versions and `compatible` strings the document
names with the constants.
"""

from __future__ import annotations

import lzma
import re
import struct
from pathlib import Path

import msgpack
import pytest
from conftest_machine import BootKernel, boot_kernel, machine_env, unique_name  # noqa: F401

from guestfs import inode_table, subtree
from guestfs.filesystem import Ctx, Filesystem
from guestfs.handover import GuestfsHandover
from kho_backend import chain, header, kexec_metadata, kho, kho_mem, kho_radix
from kho_backend.fdt import FdtReader
from kho_backend.units import PAGE_SHIFT, PAGE_SIZE

DOC = Path(__file__).resolve().parents[2] / "docs" / "handover-abi.md"
#: The arena release 0.2.0 handed over (tests/unit/test_compat.py mounts it).
V1_ARENA = Path(__file__).resolve().parents[1] / "fixtures" / "guestfs-0.2.0.arena.xz"
POOL = "abi-pool"
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


def shifted(layout: list[tuple[int, int]], by: int) -> list[tuple[int, int]]:
    return [(offset + by, size) for offset, size in layout]


def test_versions_written_and_read() -> None:
    preamble = re.split(r"^## ", DOC.read_text(), flags=re.M)[0]
    rows = {row[0]: row[1:] for row in tables(preamble)[0]}
    assert rows["machine header"][0] == f"version {header.VERSION}"
    assert rows["machine header"][1].startswith("version 1 ")
    assert code_names(rows["KHO root FDT"][0]) == [kho.KHO_COMPATIBLE]
    assert code_names(rows["KHO root FDT"][1]) == [kho_mem.KHO_V1_COMPATIBLE]
    assert code_names(rows["pool"][0]) == [kho.POOL_COMPATIBLE]
    assert rows["chain page"][0] == f"version {chain.CHAIN_VERSION}"
    assert code_names(rows["kexec-metadata"][0]) == [kexec_metadata.METADATA_COMPATIBLE]
    assert code_names(rows["guestfs sub-FDT"][0]) == [subtree.COMPATIBLE]


def test_machine_header_layout() -> None:
    text = section("Machine header")
    current, v1 = text.split("### Version 1", 1)
    page, head, policy, entry, dynamic = tables(current)
    # The page: the static pieces and the two dynamic copies in place, reserved between.
    pieces = sorted([*header.STATIC_RANGES,
                     *((o, o + header.DYNAMIC.size) for o in header.DYNAMIC_OFFSETS)])
    expected, at = [], 0
    for start, end in pieces + [(header.HEADER_SIZE, header.HEADER_SIZE)]:
        if start > at:
            expected.append((at, start - at))
        if end > start:
            expected.append((start, end - start))
        at = end
    assert offsets_sizes(page) == expected
    kinds = {start: "static part" for start, _ in header.STATIC_RANGES}
    kinds |= {start: "dynamic part" for start in header.DYNAMIC_OFFSETS}
    assert [row[3].split(",")[0] for row in page] == [kinds.get(o, "reserved") for o, _ in expected]
    assert f"copy A at {header.DYNAMIC_OFFSETS[0]}, copy B at {header.DYNAMIC_OFFSETS[1]}" \
        in " ".join(text.split())
    # Static part.
    assert offsets_sizes(head) == struct_layout(header.STATIC_HEAD.format)
    assert f"magic `{header.MAGIC.decode()}`" in head[0][3]
    assert head[1][0] == str(header.VERSION_WORD) and head[1][3] == f"format version: {header.VERSION}"
    assert head[2][0] == str(header.CRC_OFFSET) and "CRC32 of the static part" in head[2][3]
    assert "bytes " + ", ".join(f"{a}..{b}" for a, b in header.STATIC_RANGES) in head[2][3]
    assert offsets_sizes(policy) == shifted(struct_layout(header.STATIC_POLICY.format),
                                            header.POLICY_OFFSET)
    assert f"0..{header.MAX_SCRATCH}" in policy[5][3]
    assert offsets_sizes(entry) == struct_layout(header.SCRATCH_ENTRY.format)
    # Dynamic part, one copy.
    assert offsets_sizes(dynamic) == struct_layout(header.DYNAMIC.format)
    assert dynamic[1][0] == str(header.DYNAMIC_CRC_OFFSET) and "CRC32" in dynamic[1][3]
    assert f"({header.DYNAMIC.size} bytes;" in text
    flags = dynamic[4][3]
    assert header.BP_VALID == 1 << 0 and "bit 0 `VALID`" in flags
    assert header.BP_CRASHED == 1 << 1 and "bit 1 `CRASHED`" in flags
    assert f"0..{header.CMDLINE_MAX}" in dynamic[14][3]
    assert dynamic[-1][2] == f"char[{header.CMDLINE_MAX}]"
    assert dynamic[-2][2] == f"char[{header.RELEASE_MAX}]"
    # Version 1, read only.
    [old] = tables(v1)
    assert offsets_sizes(old) == struct_layout(header.V1_FIELDS.format) + [
        (header.SCRATCH_TABLE_OFFSET, header.MAX_SCRATCH * header.SCRATCH_ENTRY.size),
        (header.SCRATCH_TABLE_END, header.HEADER_SIZE - header.SCRATCH_TABLE_END)]
    assert old[1][3] == "format version: 1" and old[2][0] == str(header.CRC_OFFSET)
    assert f"0..{header.V1_CMDLINE_MAX}" in old[20][3]


def test_the_v1_header_of_release_0_2_0_reads_as_documented() -> None:
    page = lzma.open(V1_ARENA).read(header.HEADER_SIZE)
    [old] = tables(section("Machine header").split("### Version 1", 1)[1])
    fields = header.V1_FIELDS.unpack_from(page)
    assert fields[0] == header.MAGIC and fields[1] == 1 and old[0][3].endswith(
        f"`{header.MAGIC.decode()}`")
    parsed = header.MachineHeader.unpack(page)
    assert parsed.version == 1 and parsed.boot_params.valid


def test_memory_map_chunk_layout() -> None:
    chunk, element = tables(section("`khoser_mem_chunk` preserved-memory map"))[:2]
    expected = struct_layout(kho_mem.CHUNK_HDR.format) + [
        (kho_mem.CHUNK_HDR.size, kho_mem.ELM_DTYPE.itemsize * kho_mem.KHOSER_BITMAP_SIZE)]
    assert offsets_sizes(chunk) == expected
    assert f"`{kho_mem.CHUNK_MAGIC.decode()}`" in chunk[0][3]
    assert chunk[3][0] == str(kho_mem.CHUNK_CRC_OFFSET) and "CRC32" in chunk[3][3]
    dtype = kho_mem.ELM_DTYPE
    assert offsets_sizes(element) == [(dtype.fields[name][1], dtype.fields[name][0].itemsize)
                                      for name in dtype.names]


def test_radix_map_key_and_levels() -> None:
    text = section("Preserved-memory map (radix tree)")
    examples, levels = tables(text)
    flat = " ".join(text.split())
    assert (f"`key = (1 << ({kho_radix.ORDER0_BIT} - order)) | (phys >> ({PAGE_SHIFT} + order))`"
            in flat)
    for pfn, order, key in examples:
        assert kho_radix.block_key(int(pfn), int(order)) == int(code_names(key)[0], 16)
        assert kho_radix.key_block(int(code_names(key)[0], 16)) == (int(pfn), int(order))
    assert len(levels) == kho_radix.DEPTH
    bits = [tuple(int(b) for b in row[2].split(":")) for row in levels]
    assert bits == [(shift + kho_radix.TABLE_SHIFT - 1, shift)
                    for shift in kho_radix.LEVEL_SHIFTS] + [(kho_radix.LEAF_SHIFT - 1, 0)]
    assert [row[1] for row in levels] == ["table"] * len(kho_radix.LEVEL_SHIFTS) + ["bitmap"]
    assert f"A table is {kho_radix.TABLE_ENTRIES} u64 entries ({PAGE_SIZE} bytes)" in flat
    assert f"A leaf is a bitmap of {kho_radix.LEAF_BITS} bits ({PAGE_SIZE} bytes)" in flat
    assert (f"lie in `[2^{kho_radix.KEY_LOW.bit_length() - 1}, "
            f"2^{kho_radix.KEY_END.bit_length() - 1})`") in flat


def documented_lookup(mem: bytes, root_phys: int, pfn: int, order: int) -> bool:
    """Is the block preserved, by the document's reading of the tree: the levels' key
    bits from its table, a table of u64 addresses, a bitmap least significant bit first."""
    levels = tables(section("Preserved-memory map (radix tree)"))[1]
    key = (1 << (52 - order)) | (pfn >> order)
    node = root_phys
    for row in levels:
        high, low = (int(b) for b in row[2].split(":"))
        index = key >> low & ((1 << (high - low + 1)) - 1)
        if row[1] == "bitmap":
            return bool(mem[node + index // 8] >> (index % 8) & 1)
        node = struct.unpack_from("<Q", mem, node + 8 * index)[0]
        if not node:
            return False
    raise AssertionError("the levels end without a bitmap")


def test_a_tree_the_code_writes_reads_as_documented(boot_kernel: BootKernel) -> None:
    kernel = boot_kernel(unique_name("abi"), memory=16 << 20)
    kernel.finish_boot()
    folios = [(kernel.buddy.alloc(order), order) for order in (0, 0, 3, 9)]
    for pfn, order in folios:
        kernel.kho.preserve_folio(pfn, order)
    pool = kernel.kho.create_pool(POOL)
    block = pool.alloc(1)
    mem = bytes(kernel.arena.array())
    for pfn, order in folios:
        assert documented_lookup(mem, kernel.kho.track.root_phys, pfn, order)
        assert not documented_lookup(mem, kernel.kho.track.root_phys, pfn, order + 1)
        assert not documented_lookup(mem, pool.tree.root_phys, pfn, order)
    assert documented_lookup(mem, pool.tree.root_phys, block, 1)
    assert not documented_lookup(mem, kernel.kho.track.root_phys, block, 1)


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
    kernel.kho.create_pool(POOL).alloc(0)
    kernel.kexec.prepare({"quiesce": 1})
    root_phys, root_size = kernel.kho.fdt
    blobs = {name: bytes(kernel.arena.phys_view(sub.phys, sub.size))
             for name, sub in kernel.kho.subtrees.items()}
    blobs["/"] = bytes(kernel.arena.phys_view(root_phys, root_size))
    return blobs, table


def test_kho_root_fdt_properties(handed_over: tuple[dict[str, bytes], bytes]) -> None:
    blobs, _ = handed_over
    text = section("KHO root FDT")
    root, child, pool = tables(text)[:3]
    assert fdt_properties(blobs["/"]) == documented_properties(root)
    assert fdt_properties(blobs["/"], "/" + subtree.NAME) == documented_properties(child)
    assert fdt_properties(blobs["/"], f"/{kho.POOLS_NODE}") == {}
    assert fdt_properties(blobs["/"], f"/{kho.POOLS_NODE}/{POOL}") == documented_properties(pool)
    assert f"A node `{kho.POOLS_NODE}`" in text
    assert f'`"{kho.KHO_COMPATIBLE}"`' in root[0][2]
    assert f'`"{kho.POOL_COMPATIBLE}"`' in pool[0][2]
    assert f"(`{kho.KHO_COMPATIBLE}`)" in [t for t in sections() if t.startswith("KHO root FDT")][0]


def test_kho_v1_root_fdt_of_release_0_2_0(tmp_path: Path) -> None:
    arena = lzma.open(V1_ARENA).read()
    bp = header.MachineHeader.unpack(arena[:header.HEADER_SIZE]).boot_params
    blob = arena[bp.fdt_phys:bp.fdt_phys + bp.fdt_size]
    root, child = tables(section("`kho-v1` root FDT"))[:2]
    assert fdt_properties(blob) == documented_properties(root)
    assert fdt_properties(blob, "/" + subtree.NAME) == documented_properties(child)
    assert f'`"{kho_mem.KHO_V1_COMPATIBLE}"`' in root[0][2]
    assert {kho_mem.PROP_FDT, kho_mem.PROP_FDT_SIZE, kho_mem.PROP_FDT_CRC} == set(
        documented_properties(child))
    r = FdtReader(blob, "the v1 root")
    first_chunk = r.u64(r.node("/"), kho.PROP_MEM_MAP)
    assert arena[first_chunk:first_chunk + 4] == kho_mem.CHUNK_MAGIC


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
