"""Read-only views of a machine: ``guestfs kho dump`` and ``guestfs kho memmap``.

Both map the arena read-only and take no lock, so they work beside a running kernel and
on an arena whose handover a boot refused; they never change a byte.

* :func:`dump` prints the pending handover (from the header's boot-parameter slot), or
  else the live KHO root of the running (or crashed) kernel, as device-tree source with
  every integer decoded (KHO's are little-endian, which ``dtc`` would show byte-swapped),
  the kexec-metadata, and a summary of the preserved memory per order and node: the
  radix map (nodes, leaves) and every pool. :func:`blobs` gives the FDTs as they are,
  for ``dtc -I dtb -O dts``.
* :func:`memmap_png` draws the arena as a PNG with matplotlib (imported only there): the
  whole arena, one band per NUMA node, and a close-up of the ranges in use, coloured by
  what the pages are, with a title, a legend and scales. It reads the running kernel's
  memmap when there is one, and the handover's (or the live root's) maps for what is
  preserved, pooled and KHO metadata.
"""

from __future__ import annotations

import mmap
import os
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

#: Properties whose value is a physical address (printed in hex); the ``crc32`` ones are
#: hex too; every other integer is a count, a size or nanoseconds (printed in decimal).
ADDRESS_PROPERTIES = frozenset({"preserved-memory-map", "preserved-data", "superblock",
                                "fdt", "inode-table"})
DTS_NOTE = ("/* Device-tree source, decoded: KHO stores integers little-endian (as Linux's "
            "KHO does),\n * and they are shown here by value (a page size as 4096, "
            "addresses in hex). `dtc` would\n * compile this text big-endian; "
            "'guestfs kho dump --dtb FILE' writes the blobs as they are. */")


def dump(machine: str, directory: Path | None = None) -> str:
    """The pending handover of ``machine`` as text: DTS of every FDT, kexec-metadata,
    and the preserved memory per order and node."""
    mem = _open(machine, directory)
    try:
        return "\n".join(_dump(machine, mem))
    finally:
        mem.close()


def blobs(machine: str, directory: Path | None = None) -> dict[str, bytes]:
    """The FDT blobs of the pending handover (or of the live KHO root), as they lie in
    the arena, for ``dtc -I dtb``: ``{"": root, name: subtree, ...}``. A root that does
    not validate is returned alone, as found. `HandoverError` if there is none."""
    mem = _open(machine, directory)
    try:
        bp = mem.header.boot_params
        if not bp.valid:
            live = _live(mem)
            if live is None:
                raise HandoverError(f"machine {machine} has no pending handover and no live "
                                    "KHO root")
            return _blobs_of(live, mem)
        try:
            return _blobs_of(_handover(mem), mem)
        except HandoverError:
            return {"": read_phys(mem, bp.fdt_phys, min(bp.fdt_size, mem.size - bp.fdt_phys))}
    finally:
        mem.close()


def _blobs_of(kho_in: IncomingHandover, mem: ReadOnlyArena) -> dict[str, bytes]:
    return {"": read_phys(mem, kho_in.fdt_phys, kho_in.fdt_size),
            **{sub.name: sub.blob for sub in kho_in.subtrees.values()}}


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
        return out + ["", "/* the live KHO root (what a crash boot would take up) */",
                      DTS_NOTE] + _describe(live, mem)
    crashed = " (the live state of a kernel that crashed)" if bp.crashed else ""
    out.append(f"boot parameters: KHO FDT at {bp.fdt_phys:#x} ({bp.fdt_size} bytes){crashed}, "
               f"scratch table at {bp.scratch_phys:#x} ({bp.scratch_size} bytes), command "
               f"line {bp.cmdline!r}")
    try:
        kho_in = _handover(mem)
    except HandoverError as e:
        out += [f"THE HANDOVER IS NOT VALID (a boot refuses it): {e}", "", DTS_NOTE,
                f"/* root FDT at {bp.fdt_phys:#x}, as found */",
                _dts(read_phys(mem, bp.fdt_phys, min(bp.fdt_size, mem.size - bp.fdt_phys)))]
        return out
    return out + ["", DTS_NOTE] + _describe(kho_in, mem)


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
    """Device-tree source of ``blob`` with every value decoded (see DTS_NOTE)."""
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
            lines.append(f"{pad}\t{prop} = {dts_value(prop, value)};")
        for child, child_off in r.subnodes(off):
            node(child_off, child, depth + 1)
        lines.append(f"{pad}}};")

    node(r.node("/"), "", 0)
    return "\n".join(lines)


def dts_value(name: str, value: bytes) -> str:
    """One property's value as DTS: a string, a little-endian u32 or u64 by value
    (addresses and CRCs in hex, the rest in decimal), else its bytes."""
    text = value[:-1]
    if value.endswith(b"\0") and text and all(32 <= c < 127 for c in text):
        return f'"{text.decode()}"'
    if len(value) in (4, 8):
        number = int.from_bytes(value, "little")
        hexadecimal = name in ADDRESS_PROPERTIES or "crc32" in name
        shown = f"{number:#x}" if hexadecimal else str(number)
        return f"<{shown}>" if len(value) == 4 else f"/bits/ 64 <{shown}>"
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
_FROM_CATEGORY = {PageCategory.FREE: Paint.FREE, PageCategory.USED: Paint.USED,
                  PageCategory.PRESERVED: Paint.PRESERVED,
                  PageCategory.SCRATCH: Paint.SCRATCH, PageCategory.RESERVED: Paint.RESERVED}


NAMES = {Paint.FREE: "free", Paint.SCRATCH: "scratch (the next boot's memory)",
         Paint.USED: "used", Paint.RESERVED: "reserved (header, memmap)",
         Paint.PRESERVED: "preserved folios",
         Paint.POOL: "preserved pool (every page of the filesystem)",
         Paint.KHO_META: "KHO's own (FDTs, map nodes or chunks)"}
OVERVIEW_CELLS = 256 * 256   # pixels of the whole-arena map, at most
CLOSEUP_ROWS = 160           # rows of the close-up, at most
MAX_SEGMENTS = 8             # ranges in the close-up, at most


@dataclass(frozen=True)
class Segment:
    """A range of pages the close-up shows: [start, start + npages)."""

    start: int
    npages: int


@dataclass(frozen=True)
class Picture:
    """What :func:`memmap_png` drew, for the caller to print beside it."""

    width: int
    height: int
    pages_per_pixel: int          # in the whole-arena map
    closeup_pages_per_pixel: int
    source: str
    counts: dict[Paint, int]
    segments: list[Segment]

    def legend(self) -> str:
        """The same facts as text: what each colour counts, and what the close-up shows."""
        lines = [f"{self.width}x{self.height} px; whole arena at {self.pages_per_pixel} "
                 f"page(s) per pixel, close-up of {len(self.segments)} range(s) at "
                 f"{self.closeup_pages_per_pixel}; from {self.source}"]
        lines += [f"  {NAMES[p]}: {self.counts.get(p, 0)} pages "
                  f"({format_size(self.counts.get(p, 0) << PAGE_SHIFT)})" for p in NAMES]
        lines += [f"  close-up: pfns [{s.start}, {s.start + s.npages}) at "
                  f"{s.start << PAGE_SHIFT:#x}, {format_size(s.npages << PAGE_SHIFT)}"
                  for s in self.segments]
        return "\n".join(lines)


def memmap_png(machine: str, path: str | Path, directory: Path | None = None, *,
               generation: int | None = None) -> Picture:
    """Draw ``machine``'s arena into the PNG file ``path`` (with matplotlib, imported
    here only): a title (machine, size, generation), the whole arena one band per node,
    a close-up of the ranges that hold anything but free pages (so that 20 MiB in use
    of 4 GiB still shows its detail), a legend and scales in bytes."""
    mem = _open(machine, directory)
    try:
        paint, source = _paint(mem)
        starts = [mem.node_range(n)[0] for n in range(mem.nodes)] + [mem.npages]
        header = mem.header
    finally:
        mem.close()
    counts = {Paint(p): int(n) for p, n in enumerate(np.bincount(paint, minlength=len(Paint)))
              if n}
    ppp, cols = _overview_geometry(len(paint))
    segments = _segments(paint)
    cppp, ccols = _closeup_geometry(segments)
    title = (f"machine {machine}: {format_size(len(paint) << PAGE_SHIFT)}, "
             f"{len(starts) - 1} NUMA node(s), generation "
             f"{'-' if generation is None else generation}, "
             f"{header.state.name.lower().replace('_', ' ')}")
    busy = len(paint) - counts.get(Paint.FREE, 0)
    subtitle = (f"{format_size(busy << PAGE_SHIFT)} of it not free "
                f"({100 * busy / len(paint):.2g} %); from {source}")
    size = _draw(path, paint, starts, (ppp, cols), segments, (cppp, ccols), counts,
                 (title, subtitle))
    return Picture(size[0], size[1], ppp, cppp, source, counts, segments)


def _overview_geometry(npages: int) -> tuple[int, int]:
    """Pages per pixel (a power of two) and pixels per row of the whole-arena map."""
    ppp = 1
    while npages // ppp > OVERVIEW_CELLS:
        ppp *= 2
    cells = -(-npages // ppp)
    cols = 1 << max(0, int(np.ceil(np.log2(np.sqrt(cells)))))
    return ppp, cols


def _segments(paint: np.ndarray) -> list[Segment]:
    """The ranges holding anything but free pages, nearby ones merged, at most
    MAX_SEGMENTS (the closest merged first)."""
    busy = np.flatnonzero(paint != Paint.FREE)
    if not len(busy):
        return []
    breaks = np.flatnonzero(np.diff(busy) > 1)
    runs = list(zip(np.r_[busy[0], busy[breaks + 1]].tolist(),
                    np.r_[busy[breaks], busy[-1]].tolist()))
    while len(runs) > MAX_SEGMENTS:
        gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
        i = int(np.argmin(gaps))
        runs[i:i + 2] = [(runs[i][0], runs[i + 1][1])]
    return [Segment(a, b + 1 - a) for a, b in runs]


def _closeup_geometry(segments: list[Segment]) -> tuple[int, int]:
    """Pages per pixel (a power of two) and pixels per row of the close-up."""
    total = sum(s.npages for s in segments) or 1
    cols = 64
    while cols < 512 and -(-total // cols) + len(segments) > CLOSEUP_ROWS:
        cols *= 2
    ppp = 1
    while sum(-(-s.npages // (ppp * cols)) for s in segments) + len(segments) > CLOSEUP_ROWS:
        ppp *= 2
    return ppp, cols


def _grid(paint: np.ndarray, lo: int, hi: int, ppp: int, cols: int) -> np.ndarray:
    """Pages [lo, hi) as rows of `cols` pixels of `ppp` pages, each pixel showing the
    highest paint among its pages (so a single used page still shows)."""
    rows = -(-(hi - lo) // (ppp * cols))
    cells = np.full(rows * cols * ppp, Paint.NONE, np.uint8)
    cells[:hi - lo] = paint[lo:hi]
    return cells.reshape(-1, ppp).max(axis=1).reshape(rows, cols)


def _draw(path: str | Path, paint: np.ndarray, starts: list[int], overview: tuple[int, int],
          segments: list[Segment], closeup: tuple[int, int], counts: dict[Paint, int],
          titles: tuple[str, str]) -> tuple[int, int]:
    """Render the figure into `path`; its size in pixels."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cmap = ListedColormap([np.array(COLOURS[p]) / 255 for p in Paint])
    fig = Figure(figsize=(10, 12), dpi=100)
    fig.suptitle(f"{titles[0]}\n{titles[1]}", fontsize=12)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 2])
    _draw_band(top, cmap, paint, [(lo, hi, f"node {n}") for n, (lo, hi)
                                  in enumerate(zip(starts, starts[1:]))], *overview)
    top.set_title(f"the whole arena: 1 pixel = {_pages(overview[0])}, 1 row = "
                  f"{_pages(overview[0] * overview[1])}", fontsize=10)
    if segments:
        _draw_band(bottom, cmap, paint, [(s.start, s.start + s.npages, None)
                                         for s in segments], *closeup)
        bottom.set_title(f"close-up: the {len(segments)} range(s) holding anything but "
                         f"free pages (free stretches between them left out): 1 pixel = "
                         f"{_pages(closeup[0])}", fontsize=10)
    else:
        bottom.set_axis_off()
        bottom.set_title("close-up: every page is free", fontsize=10)
    handles = [Patch(facecolor=np.array(COLOURS[p]) / 255, edgecolor="black",
                     label=f"{NAMES[p]}: {format_size(counts.get(p, 0) << PAGE_SHIFT)}")
               for p in NAMES]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.22, right=0.97, top=0.9, bottom=0.13, hspace=0.3)
    fig.savefig(path, format="png")
    width, height = fig.canvas.get_width_height()
    return width, height


def _draw_band(ax, cmap, paint: np.ndarray, parts: list[tuple[int, int, str | None]],
               ppp: int, cols: int) -> None:
    """Stack `parts` (page ranges) as rows of pixels, a white row between two, the
    rows labelled with their physical address (each part's first row, and more where
    there is room)."""
    rows: list[np.ndarray] = []
    ticks: list[tuple[int, str, bool]] = []   # row, label, whether it starts a part
    y = 0
    for lo, hi, name in parts:
        if rows:
            rows.append(np.full((1, cols), Paint.NONE, np.uint8))
            y += 1
        grid = _grid(paint, lo, hi, ppp, cols)
        for r in range(0, len(grid), max(1, len(grid) // 4)):
            address = (lo + r * ppp * cols) << PAGE_SHIFT
            label = f"{address:#x} ({format_size(address)})"
            ticks.append((y + r, f"{name}  {label}" if name and r == 0 else label, r == 0))
        rows.append(grid)
        y += len(grid)
    image = np.concatenate(rows)
    ax.imshow(image, cmap=cmap, vmin=0, vmax=len(Paint) - 1, interpolation="nearest",
              aspect="auto")
    room = max(1, len(image) // 24)      # rows between two labels, so that none overlap
    kept: list[tuple[int, str]] = []
    for row, label, first in ticks:
        if kept and row - kept[-1][0] < room:
            if not first:
                continue
            kept.pop()      # a part's own first row wins over a row inside the last one
            if kept and row - kept[-1][0] < room:
                continue
        kept.append((row, label))
    ax.set_yticks([r for r, _ in kept], [label for _, label in kept], fontsize=8)
    xt = [0, cols // 4, cols // 2, 3 * cols // 4, cols]
    ax.set_xticks([x - 0.5 for x in xt], [format_size(x * ppp << PAGE_SHIFT) for x in xt],
                  fontsize=8)
    ax.set_xlabel("offset within the row")
    ax.set_ylabel("physical address of the row")


def _pages(n: int) -> str:
    return f"{n} page{'s' if n != 1 else ''} ({format_size(n << PAGE_SHIFT)})"


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
