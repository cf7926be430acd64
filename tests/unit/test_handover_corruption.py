"""Corrupted handovers are refused by boot with a HandoverError naming what is wrong:
never a crash, a hang or a half-booted machine, and the arena is left byte for byte as
it was (so the boot can be retried once the cause is understood).

A kho-v3 handover made here (root FDT, radix maps, a pool, subtrees) is corrupted field
by field; the kho-v1 reader is checked on the arena release 0.2.0 handed over
(tests/fixtures)."""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libfdt
import numpy as np
import pytest

from kho_backend import chain, fdt
from kho_backend.boot import boot
from kho_backend.checksum import crc32_at
from kho_backend.errors import HandoverError
from kho_backend.fdt import FdtNode, build
from kho_backend.header import MachineHeader
from kho_backend.kho_in import IncomingHandover
from kho_backend.kho_mem import CHUNK_CRC_OFFSET, CHUNK_HDR, ELM_DTYPE
from kho_backend.kho_radix import LEAF_BITS, LEVEL_SHIFTS, TABLE_ENTRIES, block_key
from kho_backend.units import PAGE_SHIFT, PAGE_SIZE

MEMORY = 16 << 20
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "guestfs-0.2.0.arena.xz"


class Mem:
    """The arena file's bytes, for finding where things are."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.npages = len(data) // PAGE_SIZE

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        return memoryview(self.data)[pfn * PAGE_SIZE:(pfn + npages) * PAGE_SIZE]


class Machine:
    """A machine holding a good handover, corrupted and restored case by case."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.path = directory / f"{name}.mem"
        self.golden = bytearray(self.path.read_bytes())
        bp = MachineHeader.unpack(self.golden[:PAGE_SIZE]).boot_params
        self.handover = IncomingHandover.parse(Mem(self.golden), bp.fdt_phys, bp.fdt_size)

    def write(self, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.write(data)

    def refused(self, expect: str) -> None:
        """Boot must fail with HandoverError matching ``expect``, changing nothing."""
        before = hashlib.sha256(self.path.read_bytes()).digest()
        with pytest.raises(HandoverError, match=expect):
            boot(self.name, machine_dir=self.dir).shutdown()
        assert hashlib.sha256(self.path.read_bytes()).digest() == before

    def corrupt(self, change: Callable[[bytearray], None], expect: str) -> None:
        data = bytearray(self.golden)
        change(data)
        self.write(data)
        try:
            self.refused(expect)
        finally:
            self.write(self.golden)

    # where things are
    @property
    def root(self) -> tuple[int, int]:
        return self.handover.fdt_phys, self.handover.fdt_size

    def map_root(self, pool: str | None = None) -> int:
        """Physical address of the global map's root node (or a pool's)."""
        r = fdt.FdtReader(bytes(self.golden[self.root[0]:self.root[0] + self.root[1]]), "root")
        node = r.node("/" if pool is None else f"/pools/{pool}")
        return r.u64(node, "preserved-memory-map")

    def path_to(self, pfn: int, order: int, pool: str | None = None) -> list[tuple[int, int]]:
        """(node phys, slot) from the root down to the leaf of a block, then (leaf phys,
        bit): where each pointer, and the block's bit, lie."""
        key = block_key(pfn, order)
        node = self.map_root(pool)
        path = []
        for shift in LEVEL_SHIFTS:
            slot = (key >> shift) & (TABLE_ENTRIES - 1)
            path.append((node, slot))
            node = struct.unpack_from("<Q", self.golden, node + 8 * slot)[0]
            assert node, "the block is not in the map"
        return path + [(node, key & (LEAF_BITS - 1))]


def make_v3(directory: Path) -> Machine:
    name = f"c{uuid.uuid4().hex[:10]}"
    kernel = boot(name, memory=MEMORY, machine_dir=directory)
    kernel.finish_boot()
    pfns = np.array([kernel.buddy.alloc(0) for _ in range(300)], np.int64)
    kernel.kho.preserve_pfns(pfns[::2], 0)
    kernel.kho.preserve_folio(kernel.buddy.alloc(9), 9)
    kernel.kho.add_subtree("guestfs", build(FdtNode(props={"compatible": "guestfs-v1"})))
    chain.write_chain(kernel.kho, b"x" * 10000, b"TEST")
    pool = kernel.kho.create_pool("p")
    for _ in range(20):
        pool.alloc(1)
    kernel.kexec.prepare({})
    kernel.shutdown()
    return Machine(directory, name)


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    directory = Path(tempfile.mkdtemp(prefix="kho-corrupt-", dir="/dev/shm"))
    try:
        m = make_v3(directory)
        yield m
        m.write(m.golden)
        boot(m.name, machine_dir=directory).shutdown()   # the untouched handover boots
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def flip(offset: int, bit: int) -> Callable[[bytearray], None]:
    def change(data: bytearray) -> None:
        data[offset] ^= 1 << bit
    return change


def poke(offset: int, value: int) -> Callable[[bytearray], None]:
    """Store a u64 (a node pointer, as a buggy writer would)."""
    def change(data: bytearray) -> None:
        struct.pack_into("<Q", data, offset, value)
    return change


def set_bit(leaf: int, bit: int) -> Callable[[bytearray], None]:
    def change(data: bytearray) -> None:
        data[leaf + bit // 8] |= 1 << (bit % 8)
    return change


def rewrite_root(machine: Machine, edit: Callable[[libfdt.Fdt], None]) -> Callable[[bytearray], None]:
    """Change the root FDT and seal it again, as a buggy writer would."""
    phys, size = machine.root

    def change(data: bytearray) -> None:
        tree = libfdt.Fdt(bytes(data[phys:phys + size]))
        tree.resize(size + 256)
        edit(tree)
        tree.pack()
        blob = fdt.seal(bytes(tree.as_bytearray()))
        header = MachineHeader.unpack(bytes(data[:PAGE_SIZE]))
        assert len(blob) <= PAGE_SIZE
        data[phys:phys + PAGE_SIZE] = blob + bytes(PAGE_SIZE - len(blob))
        header.set_boot_params(phys, len(blob), header.boot_params.cmdline)
        data[:PAGE_SIZE] = header.pack()
    return change


# -- the root FDT ---------------------------------------------------------------------------


def test_fdt_bit_flips(machine: Machine) -> None:
    phys, size = machine.root
    rng = np.random.default_rng(7)
    for offset in sorted(rng.choice(size, 40, replace=False).tolist()):
        machine.corrupt(flip(phys + offset, int(rng.integers(8))),
                        "KHO root FDT|kho-v|preserved-memory|subtree|pool|map")


def test_subtree_bit_flips(machine: Machine) -> None:
    sub = machine.handover.subtrees["guestfs"]
    for offset in range(0, len(sub.blob), 11):
        machine.corrupt(flip(sub.phys + offset, offset % 8), "subtree 'guestfs' fails its CRC32")


def test_truncated_fdt(machine: Machine) -> None:
    def truncate(data: bytearray) -> None:
        header = MachineHeader.unpack(bytes(data[:PAGE_SIZE]))
        header.set_boot_params(header.boot_params.fdt_phys, header.boot_params.fdt_size - 16,
                               header.boot_params.cmdline)
        data[:PAGE_SIZE] = header.pack()
    machine.corrupt(truncate, "FDT header says .* bytes but .* were handed over")


def test_wrong_compatible(machine: Machine) -> None:
    machine.corrupt(rewrite_root(machine, lambda t: t.setprop_str(0, "compatible", "kho-v9")),
                    "compatible 'kho-v9'; this kernel supports 'kho-v3' and 'kho-v1'")

    def pool_compatible(t: libfdt.Fdt) -> None:
        t.setprop_str(t.path_offset("/pools/p"), "compatible", "kho-pool-v7")
    machine.corrupt(rewrite_root(machine, pool_compatible),
                    "node /pools/p is compatible 'kho-pool-v7'; this kernel supports only "
                    "'kho-pool-v1'")


@pytest.mark.parametrize("prop, expect", [
    ("preserved-data", "no property 'preserved-data'"),
    ("blob-size", "no property 'blob-size'"),
    ("blob-crc32", "no property 'blob-crc32'"),
])
def test_missing_subtree_property(machine: Machine, prop: str, expect: str) -> None:
    machine.corrupt(rewrite_root(machine, lambda t: t.delprop(t.path_offset("/guestfs"), prop)),
                    expect)


def test_wrong_subtree_size(machine: Machine) -> None:
    def size(value: int) -> Callable[[bytearray], None]:
        return rewrite_root(machine, lambda t: t.setprop(
            t.path_offset("/guestfs"), "blob-size", struct.pack("<Q", value)))
    machine.corrupt(size(machine.handover.subtrees["guestfs"].blob.__len__() - 4),
                    "subtree 'guestfs' fails its CRC32")
    machine.corrupt(size(MEMORY), "subtree 'guestfs' is at .* outside the arena")


def test_addresses_outside_the_arena(machine: Machine) -> None:
    def map_at(phys: int) -> Callable[[bytearray], None]:
        return rewrite_root(machine, lambda t: t.setprop(
            0, "preserved-memory-map", struct.pack("<Q", phys)))
    machine.corrupt(map_at(MEMORY), "root pointer is 0x1000000, which is not the address of "
                    "a page of the arena")
    machine.corrupt(map_at(1 << 62), "not the address of a page")
    machine.corrupt(map_at(machine.map_root() + 8), "not the address of a page")
    machine.corrupt(map_at(0), "not the address of a page")

    def subtree_at(phys: int) -> Callable[[bytearray], None]:
        def edit(t: libfdt.Fdt) -> None:
            t.setprop(t.path_offset("/guestfs"), "preserved-data", struct.pack("<Q", phys))
        return rewrite_root(machine, edit)
    machine.corrupt(subtree_at(MEMORY - 8), "subtree 'guestfs' is at .* outside the arena")
    free_page = (MEMORY >> 1) & ~(PAGE_SIZE - 1)
    machine.corrupt(subtree_at(free_page), "subtree 'guestfs' .* is not in preserved")
    pool_page = int(machine.handover.pools["p"].map.leaves[1].heads()[0]) << PAGE_SHIFT
    machine.corrupt(subtree_at(pool_page), "subtree 'guestfs' .* is not in preserved")


def test_two_pools_on_one_tree(machine: Machine) -> None:
    def share(t: libfdt.Fdt) -> None:
        q = t.add_subnode(t.path_offset("/pools"), "q")
        t.setprop_str(q, "compatible", "kho-pool-v1")
        t.setprop(q, "preserved-memory-map", struct.pack("<Q", machine.map_root("p")))
    machine.corrupt(rewrite_root(machine, share), "overlaps itself at pfn .*: the map node "
                    "of pool '[pq]' at pfn .* and the map node of pool '[pq]'")


# -- the radix maps ---------------------------------------------------------------------------


def test_tree_pointer_corruptions(machine: Machine) -> None:
    """Every kind of bad pointer in a node, at every level, is refused with its place."""
    folio = int(machine.handover.pmap.leaves[9].heads()[0])
    path = machine.path_to(folio, 9)
    root = path[0][0]
    for level, (node, slot) in enumerate(path[:-1]):
        at = node + 8 * slot
        machine.corrupt(poke(at, MEMORY), f"slot {slot} of the level-{5 - level} node at "
                        f"{node:#x} points at 0x1000000, outside the arena")
        machine.corrupt(poke(at, 0x5008), "not page aligned")
        machine.corrupt(poke(at, 1 << 63), "points at 0x8000000000000000, outside the arena")
        machine.corrupt(poke(at, root), f"links the node at {root:#x} twice")   # a cycle
    machine.corrupt(poke(root + 8 * 7, path[1][0]), "slot 7 of the level-5 node .* where no "
                    "key of order 0 to 10 can be")
    # A node shared by two parents: the same subtree twice.
    node, slot = path[2]
    child = struct.unpack_from("<Q", machine.golden, node + 8 * slot)[0]
    machine.corrupt(poke(node + 8 * (slot ^ 1), child), f"links the node at {child:#x} twice")


def test_a_node_in_scratch(machine: Machine) -> None:
    folio = int(machine.handover.pmap.leaves[9].heads()[0])
    node, slot = machine.path_to(folio, 9)[3]
    area = MachineHeader.unpack(bytes(machine.golden[:PAGE_SIZE])).scratch[0]

    def into_scratch(data: bytearray) -> None:     # the node's page copied into scratch
        child = struct.unpack_from("<Q", data, node + 8 * slot)[0]
        target = (area.start_pfn + 2) << PAGE_SHIFT
        data[target:target + PAGE_SIZE] = data[child:child + PAGE_SIZE]
        struct.pack_into("<Q", data, node + 8 * slot, target)
    machine.corrupt(into_scratch, f"The preserved-memory map's node at pfn "
                    f"{area.start_pfn + 2} lies in the scratch area")


def test_overlapping_blocks(machine: Machine) -> None:
    """A block twice (an order-0 page inside the order-9 folio; a pool's page in the
    global map too; a node inside a block) is refused, naming both."""
    folio = int(machine.handover.pmap.leaves[9].heads()[0])
    page = int(machine.handover.pmap.leaves[0].heads()[0])
    leaf, _ = machine.path_to(page, 0)[-1]
    inside = folio + 3
    machine.corrupt(set_bit(leaf, block_key(inside, 0) & (LEAF_BITS - 1)),
                    f"overlaps itself at pfn {inside}: the preserved order-0 folio at pfn "
                    f"{inside} and the preserved order-9 folio at pfn {folio}")
    pooled = int(machine.handover.pools["p"].map.leaves[1].heads()[0])
    machine.corrupt(set_bit(leaf, block_key(pooled, 0) & (LEAF_BITS - 1)),
                    f"overlaps itself at pfn {pooled}: the preserved order-0 folio .* and "
                    f"the order-1 block of pool 'p' at pfn {pooled}")
    node = int(machine.handover.pmap.nodes[-1])
    machine.corrupt(set_bit(leaf, block_key(node, 0) & (LEAF_BITS - 1)), "overlaps itself")
    past = machine.path_to(page, 0)[-1][0]
    machine.corrupt(set_bit(past, (MEMORY >> PAGE_SHIFT) + 5),
                    "records an order-0 block at pfn .* which ends past the arena")


def test_a_block_on_page_0_or_in_scratch(machine: Machine) -> None:
    page = int(machine.handover.pmap.leaves[0].heads()[0])
    leaf, _ = machine.path_to(page, 0)[-1]
    machine.corrupt(set_bit(leaf, 0), "covers page 0, the machine header")
    header = MachineHeader.unpack(bytes(machine.golden[:PAGE_SIZE]))
    area = header.scratch[0]
    machine.corrupt(set_bit(leaf, area.start_pfn + 1),
                    f"order-0 folio at pfn {area.start_pfn + 1} lies in the scratch area")


def test_chain_corruption_detected_by_consumer(machine: Machine) -> None:
    """A corrupt record chain is not the boot's business: its consumer refuses it."""
    mem = Mem(bytearray(machine.golden))
    first = next(pfn for pfn in range(1, mem.npages)
                 if bytes(mem.view(pfn)[:4]) == b"TEST" and chain.read_chain(
                     mem, pfn << PAGE_SHIFT, b"TEST") == b"x" * 10000)
    mem.data[first * PAGE_SIZE + 100] ^= 1
    with pytest.raises(HandoverError, match="CRC32"):
        chain.read_chain(mem, first << PAGE_SHIFT, b"TEST")


# -- kho-v1, as release 0.2.0 wrote it ---------------------------------------------------------


@pytest.fixture(scope="module")
def release() -> Iterator[Machine]:
    directory = Path(tempfile.mkdtemp(prefix="kho-corrupt-v1-", dir="/dev/shm"))
    try:
        name = "compat-v1"
        with lzma.open(FIXTURE) as src:
            (directory / f"{name}.mem").write_bytes(src.read())
        m = Machine(directory, name)
        assert m.handover.version == "kho-v1"
        yield m
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def rewrite_chunk(phys: int, edit: Callable[[bytearray], None]) -> Callable[[bytearray], None]:
    """Change a chunk page and give it a correct CRC again."""
    def change(data: bytearray) -> None:
        page = bytearray(data[phys:phys + PAGE_SIZE])
        edit(page)
        struct.pack_into("<I", page, 12, crc32_at(page, CHUNK_CRC_OFFSET))
        data[phys:phys + PAGE_SIZE] = page
    return change


def chunks(m: Machine) -> list[int]:
    return [pfn << PAGE_SHIFT for pfn in m.handover.pmap.chunk_pfns]


def test_v1_chunk_bit_flips(release: Machine) -> None:
    rng = np.random.default_rng(8)
    for phys in chunks(release):
        for offset in rng.choice(PAGE_SIZE, 15, replace=False).tolist():
            release.corrupt(flip(phys + offset, int(rng.integers(8))),
                            "chunk at .* (fails its CRC32|has magic)")


def test_v1_chunk_next_outside_the_arena_and_cycles(release: Machine) -> None:
    first, last = chunks(release)[0], chunks(release)[-1]
    release.corrupt(rewrite_chunk(last, lambda p: struct.pack_into("<Q", p, 16, MEMORY)),
                    "next pointer of chunk .* outside the arena")
    release.corrupt(rewrite_chunk(last, lambda p: struct.pack_into("<Q", p, 16, first)),
                    "cycle")


def _elements(page: bytearray) -> tuple[int, np.ndarray]:
    _, order, num, _, _ = CHUNK_HDR.unpack_from(page)
    return order, np.frombuffer(bytes(page), ELM_DTYPE, count=num, offset=CHUNK_HDR.size)


def test_v1_overlapping_ranges(release: Machine) -> None:
    golden = release.golden
    by_order = {_elements(golden[p:p + PAGE_SIZE])[0]: p for p in chunks(release)}
    heads = release.handover.pmap.leaves[0].heads()
    page = int(heads[heads >= 512][0])
    folio = page >> 9 << 9

    def add_folio(chunk: bytearray) -> None:    # an order-9 folio over that order-0 page
        _, elms = _elements(chunk)
        assert int(elms[0]["phys_start"]) == 0
        bitmap_at = CHUNK_HDR.size + 8 + (page >> 9) // 8
        chunk[bitmap_at] |= 1 << ((page >> 9) % 8)
    release.corrupt(rewrite_chunk(by_order[9], add_folio),
                    r"overlaps itself at pfn \d+: the preserved order-0 folio at pfn \d+ and "
                    f"the preserved order-9 folio at pfn {folio}")
