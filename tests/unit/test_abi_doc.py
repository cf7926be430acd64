"""docs/handover-abi.md and the code that defines each format say the same thing.

Every layout table of the document is compared with the one definition in code: byte
offsets and sizes with the struct formats (machine header version 2 and its static and
dynamic parts, version 1, scratch entry, kho-v1 memory-map chunk and element, chain
page), the radix tree's levels and key encoding with ``kho_radix`` and with a tree the
code really writes, property names and types with FDTs the code really builds (kho-v3
root, subtree and pool nodes, kexec-metadata, guestfs sub-FDT) or release 0.2.0 built
(the kho-v1 root and guestfs-v1 inode table of the compatibility fixture), the guestfs-v2
metadata layouts (page header, superblock, journal, inode record, B+tree, blob) with
their structs and constants; and the magics, versions and `compatible` strings the
document names with the constants.
"""

from __future__ import annotations

import lzma
import re
import struct
from pathlib import Path

import msgpack
import pytest
from conftest_machine import BootKernel, boot_kernel, machine_env, unique_name  # noqa: F401

from guestfs import connection, handover, upgrade_v1
from guestfs.refs import BLOCK_INOS, SET_INOS, InodeSet, KernelRefs
from guestfs.filesystem import Ctx
from guestfs.store import blob, btree, journal, page, pagemap, radix, records, superblock
from kho_backend import chain, header, kexec_metadata, kho, kho_mem, kho_radix
from kho_backend.arena import Arena
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


def subsection(parent: str, title_start: str) -> str:
    """A ``### `` subsection of the section starting `parent`."""
    parts = re.split(r"^### (.+)$", section(parent), flags=re.M)
    found = [body for title, body in zip(parts[1::2], parts[2::2], strict=True)
             if title.startswith(title_start)]
    assert len(found) == 1, f"one subsection starting {title_start!r} of {parent!r}"
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
    assert code_names(rows["guestfs sub-FDT"][0]) == [handover.COMPATIBLE]
    assert code_names(rows["guestfs-fuse sub-FDT"][0]) == [connection.COMPATIBLE]
    assert code_names(rows["guestfs sub-FDT"][1]) == [upgrade_v1.COMPATIBLE]
    assert rows["guestfs superblock"][0] == f"version {superblock.VERSION}"
    assert rows["guestfs journal"][0] == f"version {journal.VERSION}"


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
    assert f"(`{upgrade_v1.MAGIC.decode()}`)" in section("guestfs-v1")


# --- FDTs and the inode table, as the code writes them --------------------------------


def fdt_properties(blob: bytes, path: str = "/") -> dict[str, str]:
    """{name: type} of a node's properties: string, u32 or u64 by their encoding."""
    r = FdtReader(blob, "a test FDT")
    node = r.node(path)
    out = {}
    for name, raw in r.properties(node):
        if raw.endswith(b"\0") and (len(raw) not in (4, 8) or raw[:-1].isascii()
                                     and raw[:-1].decode().isprintable() and raw[0]):
            out[name] = "string"
        else:
            out[name] = {4: "u32", 8: "u64"}.get(len(raw), "string")
    return out


def documented_properties(table: list[list[str]]) -> dict[str, str]:
    return {code_names(row[0])[0]: row[1] for row in table if not row[0].startswith("node")}


@pytest.fixture
def handed_over(boot_kernel: BootKernel) -> dict[str, bytes]:
    """A real handover of a small tree: {subtree: blob}, and the root FDT as "/"."""
    kernel = boot_kernel(unique_name("abi"), memory=16 << 20)
    fs = handover.format(kernel)
    kernel.kho.register(handover.GuestfsHandover(fs))
    kernel.finish_boot()
    d = fs.mkdir(1, b"d", 0o755, _ROOT)
    f = fs.create(d.ino, b"f", 0o644, _ROOT)
    fs.write(f.ino, 0, b"data")
    fs.symlink(1, b"l", b"d/f", _ROOT)
    fs.setxattr(f.ino, b"user.k", b"v", _ROOT)
    kernel.kho.create_pool(POOL).alloc(0)
    kernel.kexec.prepare({"quiesce": 1})
    root_phys, root_size = kernel.kho.fdt
    blobs = {name: bytes(kernel.arena.phys_view(sub.phys, sub.size))
             for name, sub in kernel.kho.subtrees.items()}
    blobs["/"] = bytes(kernel.arena.phys_view(root_phys, root_size))
    return blobs


def test_kho_root_fdt_properties(handed_over: dict[str, bytes]) -> None:
    blobs = handed_over
    text = section("KHO root FDT")
    root, child, pool = tables(text)[:3]
    assert fdt_properties(blobs["/"]) == documented_properties(root)
    assert fdt_properties(blobs["/"], "/" + handover.NAME) == documented_properties(child)
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
    assert fdt_properties(blob, "/" + handover.NAME) == documented_properties(child)
    assert f'`"{kho_mem.KHO_V1_COMPATIBLE}"`' in root[0][2]
    assert {kho_mem.PROP_FDT, kho_mem.PROP_FDT_SIZE, kho_mem.PROP_FDT_CRC} == set(
        documented_properties(child))
    r = FdtReader(blob, "the v1 root")
    first_chunk = r.u64(r.node("/"), kho.PROP_MEM_MAP)
    assert arena[first_chunk:first_chunk + 4] == kho_mem.CHUNK_MAGIC


def test_kexec_metadata_properties(handed_over: dict[str, bytes]) -> None:
    blobs = handed_over
    table = tables(section("kexec-metadata subtree"))[0]
    blob = blobs[kexec_metadata.METADATA_NODE]
    assert fdt_properties(blob) == documented_properties(table)
    assert "node `phases`" in table[-1][0] and fdt_properties(blob, "/phases")
    assert f'`"{kexec_metadata.METADATA_COMPATIBLE}"`' in table[0][2]
    assert table[1][2] == str(kexec_metadata.METADATA_VERSION)


def test_guestfs_fuse_subtree_properties() -> None:
    refs = KernelRefs()
    refs.add_lookups(5, 3)
    refs.open(5)
    state = connection.capture(connection.ConnectionId(7, 42), refs,
                               [(4, 5, False, True), (6, 1, True, False)], 8,
                               InodeSet.of([5]))
    blob = connection.to_fdt(state, 0x7000)
    properties, payload = tables(section("guestfs-fuse subtree"))
    assert fdt_properties(blob) == documented_properties(properties)
    assert f'`"{connection.COMPATIBLE}"`' in properties[0][2]
    assert properties[1][2] == str(connection.VERSION)
    # The chain's tables: their names, order and entry sizes.
    assert [(row[0].strip("`"), int(row[2])) for row in payload] == [
        (name, dtype.itemsize) for name, dtype in connection.TABLES]
    assert f"`{connection.CHAIN_MAGIC.decode()}`" in section("guestfs-fuse subtree")
    assert (connection.HANDLE_DIR, connection.HANDLE_DIRECT) == (1, 2)
    assert f"per block of lookup counts, {BLOCK_INOS})" in section("guestfs-fuse subtree")
    assert f"per mask of cached inodes, {SET_INOS})" in section("guestfs-fuse subtree")
    back = connection.from_fdt(blob)
    assert (back.owner, back.next_fh, back.tables) == (state.owner, 8, 0x7000)


def test_guestfs_subtree_properties(handed_over: dict[str, bytes]) -> None:
    table = tables(subsection("guestfs-v2", "guestfs sub-FDT"))[0]
    assert fdt_properties(handed_over[handover.NAME]) == documented_properties(table)
    assert f"`{handover.COMPATIBLE}`" in table[0][2]


def test_guestfs_v1_of_release_0_2_0(tmp_path: Path) -> None:
    """The v1 sub-FDT and inode table as the compatibility fixture holds them."""
    arena = lzma.open(V1_ARENA).read()
    (tmp_path / "v1.mem").write_bytes(arena)
    bp = header.MachineHeader.unpack(arena[:header.HEADER_SIZE]).boot_params
    r = FdtReader(arena[bp.fdt_phys:bp.fdt_phys + bp.fdt_size], "the v1 root")
    sub = r.node("/" + handover.NAME)
    phys, size = r.u64(sub, kho_mem.PROP_FDT), r.u64(sub, kho_mem.PROP_FDT_SIZE)
    blob_ = arena[phys:phys + size]
    props, keys, ranges = (tables(subsection("guestfs-v1", "guestfs sub-FDT"))[0],
                           *tables(subsection("guestfs-v1", "guestfs inode table"))[:2])
    assert fdt_properties(blob_) == documented_properties(props)
    sb = upgrade_v1.read_superblock(blob_)
    with Arena.open(tmp_path / "v1.mem") as mem:
        payload = chain.walk_chain(mem, sb.table_phys, upgrade_v1.MAGIC).payload
    doc = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    assert [code_names(row[0])[0] for row in keys] == list(doc)
    columns = re.search(r"`\[([^\]]+)\]`", keys[0][1]).group(1).replace(" ", "").split(",")
    assert tuple(columns) == upgrade_v1.ATTRS
    ranged = {name for row in ranges for name in code_names(row[0])}
    assert set(upgrade_v1.ATTRS) <= ranged | {"atime_ns", "mtime_ns", "ctime_ns"}


# --- guestfs-v2 metadata ----------------------------------------------------------------


def _field_offsets(table: list[list[str]]) -> list[int]:
    return [int(row[0]) for row in table]


def test_metadata_page_header_and_magics() -> None:
    text = subsection("guestfs-v2", "Metadata pages")
    rows = tables(text)[0]
    assert [(int(r[0]), r[1]) for r in rows] == [(0, "u32"), (4, "u32"), (8, "u64")]
    assert page.HEADER.format == "<IIQ" and page.CRC_OFFSET == 4
    magics = code_names(rows[0][2])
    assert magics == [kind.to_bytes(4, "little").decode() for kind in page.Kind]


def test_superblock_layout() -> None:
    rows = tables(subsection("guestfs-v2", "Superblock"))[0]
    layout = shifted(struct_layout(superblock.FIELDS.format), page.HEADER_SIZE)
    starts = [offset for offset, size in layout]
    assert set(_field_offsets(rows)) <= set(starts)
    assert _field_offsets(rows)[-1] == superblock.OPTIONS_OFFSET - 2
    assert superblock.JOURNAL_OFFSET == 128 and "| 128 | u64 | journal" in \
        subsection("guestfs-v2", "Superblock")
    assert rows[0][2] == f"version ({superblock.VERSION})"


def test_journal_layout() -> None:
    text = " ".join(subsection("guestfs-v2", "Journal").split())
    rows = tables(subsection("guestfs-v2", "Journal"))[0]
    assert _field_offsets(rows) == [journal.STATE_OFFSET, journal.GEOMETRY_OFFSET,
                                    journal.PFNS_OFFSET]
    assert f"version ({journal.VERSION}), undo slots ({journal.DEFAULT_SLOTS}), entry pages " \
           f"({journal.DEFAULT_ENTRY_PAGES})" in rows[1][2]
    assert f"Entry pages hold {journal.ENTRIES_PER_PAGE} entries of {journal.ENTRY.size} bytes" in text
    kinds = {k.name: k.value for k in journal.EntryKind}
    assert f"({kinds['UNDO']} UNDO, {kinds['ALLOC']} ALLOC, {kinds['FREE']} FREE)" in text
    assert f"`pfn | order << {journal.ORDER_SHIFT}`" in text
    phases = {p.name.lower(): p.value for p in journal.Phase}
    assert f"phase {phases['idle']} idle, {phases['active']} active, " \
           f"{phases['committing']} committing" in rows[0][2]


def test_radix_inode_record_btree_blob_and_page_map() -> None:
    radix_text = " ".join(subsection("guestfs-v2", "Radix table").split())
    assert f"{radix.FANOUT} u64 slots at offset {page.HEADER_SIZE}" in radix_text
    assert f"At most {radix.MAX_HEIGHT} levels" in radix_text
    itable = subsection("guestfs-v2", "Inode table")
    text = " ".join(itable.split())
    assert f"{records.PER_PAGE} records of {records.RECORD_SIZE} bytes" in text
    assert f"`ino // {records.PER_PAGE}`" in text
    record = tables(itable)[0]
    starts = [offset for offset, _ in struct_layout(records.RECORD.format)]
    assert set(_field_offsets(record)) <= set(starts)
    assert f"u32 inline PFNs[{records.INLINE_PFNS}]" in record[-1][2]
    assert f"at most {records.INLINE_TARGET} bytes" in record[-1][2]
    bt = " ".join(subsection("guestfs-v2", "B+tree").split())
    assert f"at most {btree.MAX_VALUE} bytes" in bt
    assert f"up to {btree.LEAF_KEYS} keys) has u16 value offsets at {btree.OFFSETS_OFFSET}" in bt
    assert f"up to {btree.INNER_KEYS} keys) has `keys + 1` u64 child PFNs at " \
           f"{btree.CHILDREN_OFFSET}" in bt
    bl = " ".join(subsection("guestfs-v2", "Blob").split())
    assert blob.LINK.format == "<II" and f"the bytes from {blob.DATA_OFFSET}" in bl
    pm = " ".join(subsection("guestfs-v2", "Page map").split())
    assert f"{pagemap.REGION_PAGES} u32 PFNs at offset {page.HEADER_SIZE}" in pm
    assert f"order-{pagemap.FOLIO_ORDER} folio" in pm
