"""Sizing and placing the KHO scratch areas.

Scratch is the memory a kernel booting with a handover may use before it knows which
pages are preserved. As in the kernel there is one *lowmem* area, one *global* area and
one area per NUMA node.

Sizing happens once, at the machine's first boot, after that boot's memblock allocations
(the memmap): either ``kho_scratch=N%`` (default 200 %) of what memblock allocated

* lowmem: N % of the allocations below the low limit,
* global: N % of all allocations,
* node n: N % of the allocations on node n,

each rounded up to whole pages and to at least ``MIN_SCRATCH_PAGES``; or explicit sizes
``kho_scratch=LOW,GLOBAL,PERNODE`` (a size of 0 means no area of that kind).

"Low" memory is the first 1/16 of node 0 (at least ``MIN_LOW_PAGES`` pages): the
emulation has no DMA zone, but keeping a low area gives the same shape as the kernel's
(allocations that must sit low can still be served during a KHO boot).

Placement, through memblock so that scratch never overlaps reserved memory: lowmem
bottom-up right after the header page, global top-down in the highest node where it fits,
each node's area top-down inside that node. Global and node areas start aligned to their
largest buddy block where they can.

The sizes and places are recorded in the machine header, and every later boot reuses
them and ignores ``kho_scratch=`` (the running kernels' preserved pages lie outside them,
so they cannot move).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .cmdline import ScratchPolicy
from .errors import BootError
from .header import MachineHeader, ScratchArea, ScratchKind
from .memblock import Memblock, MemblockUsage, Span
from .units import MAX_ORDER, PAGE_SHIFT, format_size, pages_for

log = logging.getLogger(__name__)

MIN_SCRATCH_PAGES = 64
LOW_FRACTION = 16
MIN_LOW_PAGES = 256


@dataclass(frozen=True)
class ScratchSizes:
    """Sizes of the scratch areas in pages (0: no area of that kind)."""

    lowmem: int
    global_: int
    per_node: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.lowmem + self.global_ + sum(self.per_node)


def low_limit(node_ranges: list[Span]) -> int:
    """End PFN of "low" memory: the first 1/16 of node 0, at least MIN_LOW_PAGES pages."""
    start, end = node_ranges[0]
    return min(end, start + max((end - start) // LOW_FRACTION, MIN_LOW_PAGES))


def size_scratch(policy: ScratchPolicy, usage: MemblockUsage) -> ScratchSizes:
    """Scratch sizes for ``policy`` given this boot's memblock ``usage``."""
    if policy.percent is None:
        return ScratchSizes(
            lowmem=pages_for(policy.lowmem),
            global_=pages_for(policy.global_),
            per_node=tuple(pages_for(policy.pernode) for _ in usage.per_node),
        )

    def scaled(pages: int) -> int:
        return max(MIN_SCRATCH_PAGES, math.ceil(pages * policy.percent / 100))

    return ScratchSizes(
        lowmem=scaled(usage.low),
        global_=scaled(usage.total),
        per_node=tuple(scaled(used) for used in usage.per_node),
    )


def place_scratch(sizes: ScratchSizes, memblock: Memblock) -> list[ScratchArea]:
    """Place the areas in free memory (recorded in ``memblock``); BootError if one does not fit."""
    areas = []
    nodes = range(len(memblock.memory))
    wanted = [(ScratchKind.LOWMEM, 0, sizes.lowmem, [(0, memblock.low_limit)], False)]
    wanted.append((ScratchKind.GLOBAL, 0, sizes.global_, [memblock.memory[n] for n in reversed(nodes)], True))
    wanted += [(ScratchKind.NODE, n, sizes.per_node[n], [memblock.memory[n]], True) for n in nodes]
    for kind, node, npages, ranges, top_down in wanted:
        if npages == 0:
            continue
        # Lowmem goes right after the header page; the others start on their largest
        # buddy block if they can, so the page allocator sees big blocks there.
        align = 1 if kind is ScratchKind.LOWMEM else 1 << min(MAX_ORDER, npages.bit_length() - 1)
        start = _find(memblock, npages, ranges, align, top_down)
        if start is None and align > 1:
            start = _find(memblock, npages, ranges, 1, top_down)
        if start is None:
            raise BootError(
                f"The {kind.name.lower()} scratch area of {npages} pages "
                f"({format_size(npages << PAGE_SHIFT)}) does not fit: the largest free range "
                f"there is {_largest(memblock, ranges)} pages. Use a smaller kho_scratch= or "
                "a larger machine."
            )
        if kind is ScratchKind.GLOBAL:
            node = next(n for n in nodes if memblock.memory[n][0] <= start < memblock.memory[n][1])
        area = ScratchArea(kind, node, start, npages)
        memblock.add_scratch(area)
        areas.append(area)
    return areas


def setup_scratch(header: MachineHeader, policy: ScratchPolicy, memblock: Memblock) -> list[ScratchArea]:
    """Scratch areas for this boot: sized and placed at the first boot (and recorded in
    ``header``), reused unchanged afterwards."""
    if header.scratch_policy is not None:
        if policy != header.scratch_policy:
            log.info(
                "kho_scratch=%s ignored: reusing the scratch areas sized at first boot (kho_scratch=%s)",
                policy, header.scratch_policy,
            )  # fmt: skip
        return header.scratch
    sizes = size_scratch(policy, memblock.usage)
    areas = place_scratch(sizes, memblock)
    header.scratch_policy = policy
    header.scratch = areas
    log.info(
        "kho_scratch=%s: %d scratch areas, %s in all",
        policy, len(areas), format_size(sizes.total << PAGE_SHIFT),
    )  # fmt: skip
    return areas


def _find(memblock: Memblock, npages: int, ranges: list[Span], align: int, top_down: bool) -> int | None:
    for lo, hi in ranges:
        start = memblock.find(npages, lo, hi, align=align, top_down=top_down)
        if start is not None:
            return start
    return None


def _largest(memblock: Memblock, ranges: list[Span]) -> int:
    return max((e - s for lo, hi in ranges for s, e in memblock.free_spans(lo, hi)), default=0)
