"""kho dump and kho memmap: read-only views of a machine, also of a refused handover."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kho_backend import views
from kho_backend.boot import Kernel, boot
from kho_backend.fdt import FdtNode, FdtReader, build

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


def png_colours(path: Path) -> set[tuple[int, int, int]]:
    """The RGB colours of a PNG file's pixels."""
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.ndim == 3
    return {tuple(c) for c in (pixels[..., :3] * 255).round().astype(int).reshape(-1, 3).tolist()}


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


def test_dump_decodes_values_and_dtb_blobs_are_the_arenas(machine_dir: Path) -> None:
    name, kernel = handed_over(machine_dir)
    kernel.kexec.prepare({"freeze": 3_000_000})
    kernel.shutdown()
    text = views.dump(name, machine_dir)
    assert "Device-tree source, decoded" in text
    assert "version = <1>;" in text                                  # a u32, by value
    assert "kexec-count = /bits/ 64 <1>;" in text                    # a u64, by value
    assert "freeze = /bits/ 64 <3000000>;" in text
    assert re.search(r"preserved-memory-map = /bits/ 64 <0x[0-9a-f]+>;", text)  # an address
    blobs = views.blobs(name, machine_dir)
    assert set(blobs) == {"", "guestfs", "kexec-metadata"}
    for blob in blobs.values():
        FdtReader(blob, "a dumped FDT")                              # whole, valid FDTs
    assert FdtReader(blobs["guestfs"], "x").string(0, "compatible") == "guestfs-v1"


def test_dts_value_decodes_by_name() -> None:
    assert views.dts_value("page-size", (4096).to_bytes(4, "little")) == "<4096>"
    assert views.dts_value("generation", (4).to_bytes(8, "little")) == "/bits/ 64 <4>"
    assert views.dts_value("superblock", (0x42000).to_bytes(8, "little")) == \
        "/bits/ 64 <0x42000>"
    assert views.dts_value("crc32", (0xdeadbeef).to_bytes(4, "little")) == "<0xdeadbeef>"
    assert views.dts_value("compatible", b"kho-v3\0") == '"kho-v3"'
    assert views.dts_value("odd", b"\x01\x02\x03") == "[01 02 03]"


def test_memmap_png_live_and_handed_over(machine_dir: Path) -> None:
    name, kernel = handed_over(machine_dir)
    out = machine_dir / "live.png"
    live = views.memmap_png(name, out, machine_dir, generation=7)
    assert "live memmap" in live.source
    colours = png_colours(out)
    assert views.COLOURS[views.Paint.USED] in colours
    assert views.COLOURS[views.Paint.PRESERVED] in colours          # from the live root
    assert views.COLOURS[views.Paint.POOL] in colours
    assert live.segments and live.closeup_pages_per_pixel == 1        # 32 MiB: page by page
    kernel.kexec.prepare({})
    kernel.shutdown()
    picture = views.memmap_png(name, out, machine_dir)
    assert "preserved-memory map" in picture.source
    assert picture.counts[views.Paint.PRESERVED] >= 40 + 512
    assert picture.counts[views.Paint.POOL] == 32
    assert picture.counts[views.Paint.KHO_META] >= 3 + 6             # FDTs, radix nodes
    assert views.COLOURS[views.Paint.PRESERVED] in png_colours(out)
    assert "preserved folios" in picture.legend()


def test_closeup_segments_find_a_little_use_in_a_large_arena() -> None:
    paint = np.full(1 << 20, views.Paint.FREE, np.uint8)             # 4 GiB of pages
    paint[256:256 + 5376] = views.Paint.USED                        # 21 MiB in use
    paint[1 << 19] = views.Paint.KHO_META                             # one page mid-way
    segments = views._segments(paint)
    assert segments == [views.Segment(256, 5376), views.Segment(1 << 19, 1)]
    ppp, cols = views._closeup_geometry(segments)
    assert ppp * cols * (views.CLOSEUP_ROWS - len(segments)) >= 5377
    paint[::1000] = views.Paint.USED                                  # scattered pages
    assert len(views._segments(paint)) == views.MAX_SEGMENTS
