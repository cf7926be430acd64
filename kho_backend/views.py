"""Read-only views of a machine: ``guestfs kho dump`` and ``guestfs kho memmap``.

Both map the arena read-only and take no lock, so they work beside a running kernel and
on an arena whose handover a boot refused; they never change a byte.

* :func:`dump` prints the pending handover (from the header's boot-parameter slot), or
  else the live KHO root of the running (or crashed) kernel, as device-tree source
  (``dtc -I dtb -O dts`` when installed, else a built-in printer), the kexec-metadata,
  and a summary of the preserved memory per order and node: the radix map (nodes,
  leaves) and every pool.
* :func:`memmap_png` draws the arena as a PNG (written with zlib and struct): one pixel
  per page or per group of pages, one band per NUMA node, coloured by what the pages
  are.  It reads the running kernel's memmap when there is one, and the handover's (or
  the live root's) maps for what is preserved, pooled and KHO metadata.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from .arena import node_starts
from .errors import HandoverError, MachineError
from .fdt import FdtReader
from .header import MachineHeader, MachineState
from .kho_in import IncomingHandover, read_phys
from .kho_mem import KHO_V1_COMPATIBLE
from .machine import machine_path
from .memmap import Memmap, PageCategory, block_pages
from .units import PAGE_SHIFT, PAGE_SIZE, format_size


class ReadOnlyArena:
    """An arena file mapped read-only: the part of Arena the readers need."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            self.header = MachineHeader.unpack(os.pread(fd, PAGE_SIZE, 0), size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.path = path
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self.nodes = self.header.nr_nodes
        self._starts = node_starts(self.npages, self.nodes)

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        if pfn < 0 or pfn + npages > self.npages:
            raise MachineError(f"Pages [{pfn}, {pfn + npages}) lie outside the arena.")
        return memoryview(self._mm)[pfn << PAGE_SHIFT:(pfn + npages) << PAGE_SHIFT]

    def node_range(self, node: int) -> tuple[int, int]:
        return self._starts[node], self._starts[node + 1]

    def close(self) -> None:
        self._mm.close()


def _open(machine: str, directory: Path | None) -> ReadOnlyArena:
    return ReadOnlyArena(machine_path(machine, directory))


def _scratch(header: MachineHeader) -> list[tuple[int, int]]:
    return [(a.start_pfn, a.npages) for a in header.scratch]


def _handover(mem: ReadOnlyArena) -> IncomingHandover:
    bp = mem.header.boot_params
    return IncomingHandover.parse(mem, bp.fdt_phys, bp.fdt_size, scratch=_scratch(mem.header),
                                  crashed=bp.crashed)


def _live(mem: ReadOnlyArena) -> IncomingHandover | None:
    """The live root of a running (or crashed) kernel, or None if there is none or it
    cannot be read right now (a running kernel may be rewriting it)."""
    h = mem.header
    if h.boot_params.valid or h.state is not MachineState.RUNNING or not h.live_root_size:
        return None
    try:
        return IncomingHandover.parse(mem, h.live_root_phys, h.live_root_size,
                                      scratch=_scratch(h), crashed=True)
    except HandoverError:
        return None


# -- dump -------------------------------------------------------------------------------

def dump(machine: str, directory: Path | None = None) -> str:
    """The pending handover of ``machine`` as text: DTS of every FDT, kexec-metadata,
    and the preserved memory per order and node."""
    mem = _open(machine, directory)
    try:
        return "\n".join(_dump(machine, mem))
    finally:
        mem.close()


def _dump(machine: str, mem: ReadOnlyArena) -> list[str]:
    h, bp = mem.header, mem.header.boot_params
    out = [f"machine {machine} ({mem.path}): {format_size(mem.size)}, {h.nr_nodes} node(s), "
           f"state {h.state.name}, boot count {h.boot_count}, release {h.release or '-'}, "
           f"header version {h.version}"]
    out.append(f"live KHO root at {h.live_root_phys:#x} ({h.live_root_size} bytes)"
               if h.live_root_size else "no live KHO root")
    out += [f"scratch: {a.kind.name.lower()} node {a.node}, pfns [{a.start_pfn}, "
            f"{a.end_pfn}) ({format_size(a.npages << PAGE_SHIFT)})" for a in h.scratch]
    if not bp.valid:
        out.append("no pending handover: the boot-parameter slot is empty")
        live = _live(mem)
        if live is None:
            return out
        return out + ["", "/* the live KHO root (what a crash boot would take up) */"] + \
            _describe(live, mem)
    crashed = " (the live state of a kernel that crashed)" if bp.crashed else ""
    out.append(f"boot parameters: KHO FDT at {bp.fdt_phys:#x} ({bp.fdt_size} bytes){crashed}, "
               f"scratch table at {bp.scratch_phys:#x} ({bp.scratch_size} bytes), command "
               f"line {bp.cmdline!r}")
    try:
        kho_in = _handover(mem)
    except HandoverError as e:
        out += [f"THE HANDOVER IS NOT VALID (a boot refuses it): {e}", "",
                f"/* root FDT at {bp.fdt_phys:#x}, as found */",
                _dts(read_phys(mem, bp.fdt_phys, min(bp.fdt_size, mem.size - bp.fdt_phys)))]
        return out
    return out + [""] + _describe(kho_in, mem)


def _describe(kho_in: IncomingHandover, mem: ReadOnlyArena) -> list[str]:
    out = [f"/* KHO root FDT ({kho_in.version}) at {kho_in.fdt_phys:#x}, "
           f"{kho_in.fdt_size} bytes */", _dts(read_phys(mem, kho_in.fdt_phys, kho_in.fdt_size))]
    for sub in kho_in.subtrees.values():
        out += [f"/* subtree {sub.name}: FDT at {sub.phys:#x}, {len(sub.blob)} bytes */",
                _dts(sub.blob)]
    if kho_in.metadata is not None:
        m = kho_in.metadata
        phases = ", ".join(f"{k} {v / 1e6:.2f} ms" for k, v in m.phases.items())
        out.append(f"exec from: {m.previous_release} (count {m.kexec_count}); phases: "
                   f"{phases or 'none'}")
    return out + [""] + preserved_summary(kho_in, mem)


def preserved_summary(kho_in: IncomingHandover, mem: ReadOnlyArena) -> list[str]:
    """Lines: the preserved folios and ranges per order and node with totals, the map
    that holds them, and the same for every pool."""
    pmap = kho_in.pmap
    if kho_in.version == KHO_V1_COMPATIBLE:
        shape = f"{len(pmap.chunk_pfns)} chunk page(s)"
    else:
        shape = f"radix tree of {len(pmap.nodes)} node(s), {pmap.nr_leaves} leaf(s)"
    out = _block_table("preserved memory", "folios", pmap.ranges(), mem, shape)
    for pool in kho_in.pools.values():
        out += _block_table(f"pool {pool.name!r}", "blocks", pool.map.ranges(), mem,
                            f"radix tree of {len(pool.map.nodes)} node(s), "
                            f"{pool.map.nr_leaves} leaf(s)")
    return out


def _block_table(title: str, unit: str, ranges: Iterator[tuple[np.ndarray, int]],
                 mem: ReadOnlyArena, shape: str) -> list[str]:
    starts = np.asarray([mem.node_range(n)[0] for n in range(1, mem.nodes)], np.int64)
    rows = [f"order  node {unit:>9}    ranges       pages        size"]
    blocks = runs = pages = 0
    for heads, order in ranges:
        nodes = np.searchsorted(starts, heads, side="right")
        for node in np.unique(nodes).tolist():
            h = heads[nodes == node]
            n_runs = 1 + int(np.count_nonzero(np.diff(h) != 1 << order))
            rows.append(f"{order:5d} {node:5d} {len(h):9d} {n_runs:9d} {len(h) << order:11d} "
                        f"{format_size(len(h) << (order + PAGE_SHIFT)):>11}")
            blocks, runs, pages = blocks + len(h), runs + n_runs, pages + (len(h) << order)
    return [f"{title}: {pages} pages ({format_size(pages << PAGE_SHIFT)}) in {blocks} "
            f"{unit}, {runs} ranges; map: {shape}"] + rows


def _dts(blob: bytes) -> str:
    """Device-tree source of ``blob``: dtc's if installed, else the built-in printer."""
    dtc = shutil.which("dtc")
    if dtc:
        done = subprocess.run([dtc, "-q", "-I", "dtb", "-O", "dts", "-"], input=blob,
                              capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
            return done.stdout.decode(errors="replace").rstrip()
    try:
        return _print_dts(FdtReader(blob, "the FDT"))
    except HandoverError as e:
        return f"/* cannot decode: {e} */"


def _print_dts(r: FdtReader) -> str:
    lines = ["/dts-v1/;", ""]

    def node(off: int, name: str, depth: int) -> None:
        pad = "\t" * depth
        lines.append(f"{pad}{name or '/'} {{")
        for prop, value in r.properties(off):
            lines.append(f"{pad}\t{prop} = {_value(value)};")
        for child, child_off in r.subnodes(off):
            node(child_off, child, depth + 1)
        lines.append(f"{pad}}};")

    node(r.node("/"), "", 0)
    return "\n".join(lines)


def _value(value: bytes) -> str:
    text = value[:-1]
    if value.endswith(b"\0") and text and all(32 <= c < 127 for c in text):
        return f'"{text.decode()}"'
    if len(value) == 8:
        return f"/bits/ 64 <{int.from_bytes(value, 'little'):#x}>  /* le64 */"
    return "[" + " ".join(f"{b:02x}" for b in value) + "]"


# -- memmap picture ----------------------------------------------------------------------

class Paint(IntEnum):
    """What a pixel shows; a group of pages takes the highest value among them."""

    NONE = 0          # padding after a node's last page
    FREE = 1
    SCRATCH = 2
    USED = 3
    RESERVED = 4
    PRESERVED = 5
    POOL = 6          # a block of a preserved pool
    KHO_META = 7      # the handover's own pages: root FDT, map nodes or chunks, sub-FDTs


COLOURS = {
    Paint.NONE: (255, 255, 255),
    Paint.FREE: (225, 225, 225),
    Paint.SCRATCH: (240, 200, 40),
    Paint.USED: (60, 110, 200),
    Paint.RESERVED: (140, 40, 40),
    Paint.PRESERVED: (40, 170, 80),
    Paint.POOL: (20, 120, 120),
    Paint.KHO_META: (200, 60, 200),
}
SEPARATOR = (0, 0, 0)
_FROM_CATEGORY = {PageCategory.FREE: Paint.FREE, PageCategory.USED: Paint.USED,
                  PageCategory.PRESERVED: Paint.PRESERVED,
                  PageCategory.SCRATCH: Paint.SCRATCH, PageCategory.RESERVED: Paint.RESERVED}


@dataclass(frozen=True)
class Picture:
    """What :func:`memmap_png` drew: the legend and the geometry, for the caller to print."""

    width: int
    height: int
    pages_per_pixel: int
    source: str
    counts: dict[Paint, int]

    def legend(self) -> str:
        names = {Paint.FREE: "free", Paint.SCRATCH: "scratch", Paint.USED: "used",
                 Paint.RESERVED: "reserved (header, memmap)", Paint.PRESERVED: "preserved",
                 Paint.POOL: "preserved pools",
                 Paint.KHO_META: "KHO metadata (FDTs, map nodes or chunks)"}
        lines = [f"{self.width}x{self.height} px, {self.pages_per_pixel} page(s) per pixel, "
                 f"one band per node (black lines between), from {self.source}"]
        lines += [f"  rgb{COLOURS[p]}: {names[p]}: {self.counts.get(p, 0)} pages"
                  for p in names]
        return "\n".join(lines)


def memmap_png(machine: str, path: str | Path, directory: Path | None = None, *,
               width: int = 512) -> Picture:
    """Draw ``machine``'s arena into the PNG file ``path``; returns the legend."""
    mem = _open(machine, directory)
    try:
        paint, source = _paint(mem)
        picture, counts, ppp = _layout(paint, mem, width)
    finally:
        mem.close()
    Path(path).write_bytes(png(picture))
    return Picture(picture.shape[1], picture.shape[0], ppp, source, counts)


def _paint(mem: ReadOnlyArena) -> tuple[np.ndarray, str]:
    h = mem.header
    paint = np.full(mem.npages, Paint.FREE, np.uint8)
    kho_in = None
    if h.boot_params.valid:
        try:
            kho_in = _handover(mem)
        except HandoverError:
            pass   # still draw what the memmap / scratch table say
    else:
        kho_in = _live(mem)
    # Only a running kernel's memmap is current: after a kexec it is stale, or poisoned.
    if h.state is MachineState.RUNNING and h.memmap_npages:
        lut = np.array([_FROM_CATEGORY[c] for c in PageCategory], np.uint8)
        paint = lut[Memmap(mem, h.memmap_pfn).categories()]
        source = f"the live memmap at pfn {h.memmap_pfn}"
    else:
        for start, n in _scratch(h):
            paint[start:start + n] = Paint.SCRATCH
        paint[0] = Paint.RESERVED
        source = "the handover's preserved-memory maps and the scratch table"
    if kho_in is not None:
        for heads, order in kho_in.pmap.ranges():
            paint[block_pages(heads, order)] = Paint.PRESERVED
        for pool in kho_in.pools.values():
            for heads, order in pool.map.ranges():
                paint[block_pages(heads, order)] = Paint.POOL
        paint[_metadata_pages(kho_in)] = Paint.KHO_META
    return paint, source


def _metadata_pages(kho_in: IncomingHandover) -> np.ndarray:
    """The handover's own pages: root FDT, the maps' nodes (or v1 chunks), sub-FDTs."""
    pages = [np.asarray(kho_in.pmap.chunk_pfns, np.int64), kho_in.pmap.nodes]
    pages += [pool.map.nodes for pool in kho_in.pools.values()]
    for phys, size in [(kho_in.fdt_phys, kho_in.fdt_size)] + [
            (s.phys, len(s.blob)) for s in kho_in.subtrees.values()]:
        pages.append(np.arange(phys >> PAGE_SHIFT, (phys + size - 1 >> PAGE_SHIFT) + 1))
    return np.concatenate(pages).astype(np.int64)


def _layout(paint: np.ndarray, mem: ReadOnlyArena,
            width: int) -> tuple[np.ndarray, dict[Paint, int], int]:
    """Pixels: pages grouped ``ppp`` to a pixel, rows of ``cols`` pixels, each pixel
    scaled up so that small arenas still fill ``width``; one band per node."""
    counts = {Paint(p): int(n) for p, n in enumerate(np.bincount(paint, minlength=len(Paint)))
              if n}
    ppp = 1
    while mem.npages // ppp > width * width:
        ppp *= 2
    cols = min(width, 1 << max(0, int(np.ceil(np.log2(np.sqrt(mem.npages / ppp))))))
    scale = max(1, width // cols)
    palette = np.array([COLOURS[p] for p in Paint], np.uint8)
    bands = []
    for node in range(mem.nodes):
        lo, hi = mem.node_range(node)
        rows = -(-(hi - lo) // (ppp * cols))
        cells = np.full(rows * cols * ppp, Paint.NONE, np.uint8)
        cells[:hi - lo] = paint[lo:hi]
        grouped = cells.reshape(-1, ppp).max(axis=1).reshape(rows, cols)
        if bands:
            bands.append(np.tile(np.array(SEPARATOR, np.uint8), (2, cols * scale, 1)))
        bands.append(np.repeat(np.repeat(palette[grouped], scale, 0), scale, 1))
    return np.concatenate(bands), counts, ppp


def png(rgb: np.ndarray) -> bytes:
    """A PNG file of an (height, width, 3) uint8 image: 8-bit RGB, no interlace."""
    height, width, _ = rgb.shape
    raw = np.zeros((height, 1 + width * 3), np.uint8)   # filter byte 0 (None) per row
    raw[:, 1:] = rgb.reshape(height, width * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))
