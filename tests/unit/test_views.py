"""kho dump and kho memmap: read-only views of a machine, also of a refused handover."""

from __future__ import annotations

import hashlib
import shutil
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kho_backend import views
from kho_backend.boot import Kernel, boot
from kho_backend.fdt import FdtNode, build

MEMORY = 32 << 20


@pytest.fixture
def machine_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kho-inspect-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def handed_over(machine_dir: Path) -> tuple[str, Kernel]:
    name = f"i{uuid.uuid4().hex[:10]}"
    kernel = boot(name, memory=MEMORY, nodes=2, machine_dir=machine_dir)
    kernel.finish_boot()
    kernel.kho.preserve_pfns(np.array([kernel.buddy.alloc(0) for _ in range(40)]), 0)
    kernel.kho.preserve_folio(kernel.buddy.alloc(9, node=1), 9)
    kernel.kho.add_subtree("guestfs", build(FdtNode(props={"compatible": "guestfs-v1"})))
    pool = kernel.kho.create_pool("cache")
    for _ in range(8):
        pool.alloc(2)
    kernel.buddy.alloc(5)                                          # used, not preserved
    return name, kernel


def read_png(path: Path) -> tuple[int, int, np.ndarray]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == \
            zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    return width, height, rows[:, 1:].reshape(height, width, 3)


def test_dump_pending_handover(machine_dir: Path) -> None:
    name, kernel = handed_over(machine_dir)
    kernel.kexec.prepare({"freeze": 3_000_000})
    kernel.shutdown()
    before = hashlib.sha256((machine_dir / f"{name}.mem").read_bytes()).digest()
    text = views.dump(name, machine_dir)
    assert "state HANDED_OVER" in text
    assert 'compatible = "kho-v3"' in text and "preserved-memory-map" in text
    assert 'compatible = "guestfs-v1"' in text and 'compatible = "kexec-metadata-v1"' in text
    assert "exec from: " in text and "freeze 3.00 ms" in text
    assert "    9     1         1         1         512" in text      # order 9 on node 1
    assert "map: radix tree of" in text and "pool 'cache': 32 pages (128 KiB) in 8 blocks" in text
    assert 'cache {\n\t\t\tcompatible = "kho-pool-v1"' in text
    assert hashlib.sha256((machine_dir / f"{name}.mem").read_bytes()).digest() == before


def test_dump_refused_handover_and_none(machine_dir: Path) -> None:
    name, kernel = handed_over(machine_dir)
    live = views.dump(name, machine_dir)                           # while running
    assert "no pending handover" in live and "the live KHO root" in live
    assert "pool 'cache'" in live
    kernel.kexec.prepare({})
    phys, _ = kernel.kho.fdt
    kernel.arena.view(phys >> 12)[20] ^= 0xFF                      # damage the root FDT
    kernel.shutdown()
    text = views.dump(name, machine_dir)
    assert "THE HANDOVER IS NOT VALID" in text


def test_memmap_png_live_and_handed_over(machine_dir: Path) -> None:
    name, kernel = handed_over(machine_dir)
    out = machine_dir / "live.png"
    live = views.memmap_png(name, out, machine_dir)
    assert "live memmap" in live.source
    width, height, pixels = read_png(out)
    assert (width, height) == (live.width, live.height)
    colours = {tuple(c) for c in pixels.reshape(-1, 3).tolist()}
    assert views.COLOURS[views.Paint.USED] in colours
    assert views.COLOURS[views.Paint.PRESERVED] in colours          # from the live root
    assert views.COLOURS[views.Paint.POOL] in colours
    assert views.SEPARATOR in colours                                # two nodes
    kernel.kexec.prepare({})
    kernel.shutdown()
    picture = views.memmap_png(name, out, machine_dir)
    assert "preserved-memory map" in picture.source
    assert picture.counts[views.Paint.PRESERVED] >= 40 + 512
    assert picture.counts[views.Paint.POOL] == 32
    assert picture.counts[views.Paint.KHO_META] >= 3 + 6             # FDTs, radix nodes
    _, _, pixels = read_png(out)
    colours = {tuple(c) for c in pixels.reshape(-1, 3).tolist()}
    assert views.COLOURS[views.Paint.PRESERVED] in colours
    assert "preserved" in picture.legend()
