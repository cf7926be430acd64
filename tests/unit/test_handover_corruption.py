"""Corrupted handovers are refused by boot with a HandoverError naming what is wrong:
never a crash, a hang or a half-booted machine, and the arena is left byte for byte as
it was (so the boot can be retried once the cause is understood)."""

from __future__ import annotations

import hashlib
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
from kho_backend.errors import HandoverError
from kho_backend.fdt import FdtNode, build
from kho_backend.header import MachineHeader
from kho_backend.kho_in import IncomingHandover
from kho_backend.checksum import crc32_at
from kho_backend.kho_mem import CHUNK_CRC_OFFSET, CHUNK_HDR, ELM_DTYPE
from kho_backend.units import PAGE_SHIFT, PAGE_SIZE

MEMORY = 16 << 20


class Mem:
    """The arena file's bytes, for finding where things are."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.npages = len(data) // PAGE_SIZE

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        return memoryview(self.data)[pfn * PAGE_SIZE:(pfn + npages) * PAGE_SIZE]


class Machine:
    """A machine holding a good handover, corrupted and restored case by case."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.name = f"c{uuid.uuid4().hex[:10]}"
        kernel = boot(self.name, memory=MEMORY, machine_dir=directory)
        kernel.finish_boot()
        pfns = np.array([kernel.buddy.alloc(0) for _ in range(300)], np.int64)
        kernel.kho.preserve_pfns(pfns[::2], 0)
        kernel.kho.preserve_folio(kernel.buddy.alloc(9), 9)
        kernel.kho.add_subtree("guestfs", build(FdtNode(props={"compatible": "guestfs-v1"})))
        chain.write_chain(kernel.kho, b"x" * 10000, b"TEST")
        kernel.kexec.prepare({})
        kernel.shutdown()
        self.path = directory / f"{self.name}.mem"
        self.golden = bytearray(self.path.read_bytes())
        mem = Mem(self.golden)
        bp = MachineHeader.unpack(self.golden[:PAGE_SIZE]).boot_params
        self.handover = IncomingHandover.parse(mem, bp.fdt_phys, bp.fdt_size)

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

    @property
    def chunks(self) -> list[int]:
        return [pfn << PAGE_SHIFT for pfn in self.handover.pmap.chunk_pfns]


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    directory = Path(tempfile.mkdtemp(prefix="kho-corrupt-", dir="/dev/shm"))
    try:
        m = Machine(directory)
        yield m
        m.write(m.golden)
        boot(m.name, machine_dir=directory).shutdown()   # the untouched handover boots
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def flip(offset: int, bit: int) -> Callable[[bytearray], None]:
    def change(data: bytearray) -> None:
        data[offset] ^= 1 << bit
    return change


def rewrite_root(machine: Machine, edit: Callable[[libfdt.Fdt], None]) -> Callable[[bytearray], None]:
    """Change the root FDT (same size) and seal it again, as a buggy writer would."""
    phys, size = machine.root

    def change(data: bytearray) -> None:
        tree = libfdt.Fdt(bytes(data[phys:phys + size]))
        edit(tree)
        blob = fdt.seal(bytes(tree.as_bytearray()))
        assert len(blob) == size
        data[phys:phys + size] = blob
    return change


def rewrite_chunk(phys: int, edit: Callable[[bytearray], None]) -> Callable[[bytearray], None]:
    """Change a chunk page and give it a correct CRC again."""
    def change(data: bytearray) -> None:
        page = bytearray(data[phys:phys + PAGE_SIZE])
        edit(page)
        struct.pack_into("<I", page, 12, crc32_at(page, CHUNK_CRC_OFFSET))
        data[phys:phys + PAGE_SIZE] = page
    return change


def test_fdt_bit_flips(machine: Machine) -> None:
    phys, size = machine.root
    rng = np.random.default_rng(7)
    for offset in sorted(rng.choice(size, 40, replace=False).tolist()):
        machine.corrupt(flip(phys + offset, int(rng.integers(8))),
                        "KHO root FDT|kho-v1|preserved-memory|chunk|subtree")


def test_chunk_bit_flips(machine: Machine) -> None:
    rng = np.random.default_rng(8)
    for phys in machine.chunks:
        for offset in rng.choice(PAGE_SIZE, 15, replace=False).tolist():
            machine.corrupt(flip(phys + offset, int(rng.integers(8))),
                            "chunk at .* (fails its CRC32|has magic)")


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
                    "compatible 'kho-v9'; this kernel supports only 'kho-v1'")


def test_addresses_outside_the_arena(machine: Machine) -> None:
    def map_at(phys: int) -> Callable[[bytearray], None]:
        return rewrite_root(machine, lambda t: t.setprop(
            0, "preserved-memory-map", struct.pack("<Q", phys)))
    machine.corrupt(map_at(MEMORY), "points at 0x1000000, outside the arena")
    machine.corrupt(map_at(1 << 62), "outside the arena")
    machine.corrupt(map_at(machine.chunks[0] + 8), "not page aligned")

    def subtree_at(phys: int) -> Callable[[bytearray], None]:
        def edit(t: libfdt.Fdt) -> None:
            t.setprop(t.path_offset("/guestfs"), "fdt", struct.pack("<Q", phys))
        return rewrite_root(machine, edit)
    machine.corrupt(subtree_at(MEMORY - 8), "subtree 'guestfs' is at .* outside the arena")
    free_page = (MEMORY >> 1) & ~(PAGE_SIZE - 1)
    machine.corrupt(subtree_at(free_page), "subtree 'guestfs' .* is not in preserved")


def test_chunk_next_outside_the_arena(machine: Machine) -> None:
    last = machine.chunks[-1]
    machine.corrupt(rewrite_chunk(last, lambda p: struct.pack_into("<Q", p, 16, MEMORY)),
                    "next pointer of chunk .* outside the arena")


def test_cycle_in_the_chunk_chain(machine: Machine) -> None:
    first, last = machine.chunks[0], machine.chunks[-1]
    machine.corrupt(rewrite_chunk(last, lambda p: struct.pack_into("<Q", p, 16, first)),
                    "cycle")
    machine.corrupt(rewrite_chunk(first, lambda p: struct.pack_into("<Q", p, 16, first)),
                    "cycle")


def _elements(page: bytearray) -> tuple[int, np.ndarray]:
    _, order, num, _, _ = CHUNK_HDR.unpack_from(page)
    return order, np.frombuffer(bytes(page), ELM_DTYPE, count=num, offset=CHUNK_HDR.size)


def _append(page: bytearray, phys_start: int, bitmap: bytes) -> None:
    magic, order, num, crc, nxt = CHUNK_HDR.unpack_from(page)
    elm = np.zeros(1, ELM_DTYPE)
    elm["phys_start"], elm["bitmap"] = phys_start, np.frombuffer(bitmap, np.uint8)
    at = CHUNK_HDR.size + num * ELM_DTYPE.itemsize
    page[at:at + ELM_DTYPE.itemsize] = elm.tobytes()
    CHUNK_HDR.pack_into(page, 0, magic, order, num + 1, crc, nxt)


def test_overlapping_ranges(machine: Machine) -> None:
    golden = bytearray(machine.golden)
    by_order = {_elements(golden[p:p + PAGE_SIZE])[0]: p for p in machine.chunks}
    order0 = by_order[0]
    _, elms = _elements(golden[order0:order0 + PAGE_SIZE])
    # The same block described twice within order 0.
    machine.corrupt(rewrite_chunk(order0, lambda p: _append(
        p, int(elms[0]["phys_start"]), bytes(elms[0]["bitmap"]))), "overlap")
    # An order-9 folio over an order-0 page that is preserved too.
    bits = np.unpackbits(elms[0]["bitmap"], bitorder="little")
    page = (int(elms[0]["phys_start"]) >> PAGE_SHIFT) + int(np.flatnonzero(bits)[0])

    def add_folio(chunk: bytearray) -> None:   # the arena has one order-9 block: at 0
        bitmap_at = CHUNK_HDR.size + 8 + (page >> 9) // 8
        chunk[bitmap_at] |= 1 << ((page >> 9) % 8)
    machine.corrupt(rewrite_chunk(by_order[9], add_folio),
                    f"order-0 folio at pfn {page} lies inside the order-9 folio")


def test_chain_corruption_detected_by_consumer(machine: Machine) -> None:
    """A corrupt record chain is not the boot's business: its consumer refuses it."""
    mem = Mem(bytearray(machine.golden))
    first = next(pfn for pfn in range(1, mem.npages)
                 if bytes(mem.view(pfn)[:4]) == b"TEST" and chain.read_chain(
                     mem, pfn << PAGE_SHIFT, b"TEST") == b"x" * 10000)
    mem.data[first * PAGE_SIZE + 100] ^= 1
    with pytest.raises(HandoverError, match="CRC32"):
        chain.read_chain(mem, first << PAGE_SHIFT, b"TEST")
