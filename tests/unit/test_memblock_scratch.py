"""memblock (boot-time allocator, scratch-only mode) and the scratch areas."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest_machine import boot_kernel, machine_env, machine_name  # noqa: F401
from kho_backend.cmdline import ScratchPolicy
from kho_backend.errors import BootError, OutOfMemory
from kho_backend.header import MachineHeader, ScratchArea, ScratchKind
from kho_backend.memblock import Memblock, MemblockUsage
from kho_backend.memmap import Memmap
from kho_backend.scratch import MIN_SCRATCH_PAGES, low_limit, place_scratch, setup_scratch, size_scratch

NODES2 = [(0, 4096), (4096, 8192)]


def memblock(**kwargs: object) -> Memblock:
    return Memblock(NODES2, low_limit=low_limit(NODES2), **kwargs)


# -- memblock -------------------------------------------------------------------------------


def test_alloc_is_top_down_and_reserves() -> None:
    mb = memblock()
    mb.reserve(0, 1)
    a = mb.alloc(10)
    assert a == 8192 - 10
    b = mb.alloc(10)
    assert b == a - 10
    assert mb.reserved == [(0, 1), (b, 8192)]


def test_alloc_on_node_and_aligned() -> None:
    mb = memblock()
    pfn = mb.alloc(100, node=0, align=64)
    assert 0 <= pfn and pfn + 100 <= 4096 and pfn % 64 == 0


def test_usage_is_counted_total_per_node_and_low() -> None:
    mb = memblock()
    mb.alloc(10, node=1)
    mb.alloc(20, node=0)
    mb.alloc(200, node=0)
    assert mb.usage.total == 230 and mb.usage.per_node == [220, 10]
    assert mb.usage.low == 0  # top-down: nothing landed low


def test_low_usage_counts_pages_below_the_limit() -> None:
    mb = Memblock([(0, 4096)], low_limit=256)
    mb.reserve(300, 4096 - 300)
    pfn = mb.alloc(100)  # only [0, 300) is left: it straddles the limit
    assert pfn == 200 and mb.usage.low == 56


def test_reserve_merges() -> None:
    mb = memblock()
    mb.reserve(10, 5)
    mb.reserve(20, 5)
    mb.reserve(14, 7)
    mb.reserve(0, 0)
    assert mb.reserved == [(10, 25)]


def test_out_of_memory_names_sizes() -> None:
    mb = memblock()
    mb.reserve(0, 8000)
    with pytest.raises(OutOfMemory, match=r"cannot allocate 300 pages \(1.17 MiB\).*largest free range is 192 pages"):
        mb.alloc(300)


def scratch_areas() -> list[ScratchArea]:
    return [ScratchArea(ScratchKind.LOWMEM, 0, 1, 64), ScratchArea(ScratchKind.GLOBAL, 1, 7000, 100),
            ScratchArea(ScratchKind.NODE, 0, 3000, 50), ScratchArea(ScratchKind.NODE, 1, 8000, 50)]  # fmt: skip


def test_normal_allocations_avoid_scratch() -> None:
    mb = memblock(scratch=scratch_areas())
    for _ in range(10):
        pfn = mb.alloc(500)
        assert all(pfn + 500 <= a.start_pfn or pfn >= a.end_pfn for a in scratch_areas())


def test_scratch_only_prefers_node_then_global_then_lowmem() -> None:
    mb = memblock(scratch=scratch_areas(), scratch_only=True)
    assert 3000 <= mb.alloc(50, node=0) < 3050  # node 0's own area
    assert 7000 <= mb.alloc(60, node=0) < 7100  # then global
    assert 1 <= mb.alloc(64, node=0) < 65  # then lowmem
    with pytest.raises(OutOfMemory, match="from scratch on node 0: the largest free range is 40"):
        mb.alloc(41, node=0)
    assert 8000 <= mb.alloc(50) < 8050  # node None: any node's area first


def test_scratch_only_without_scratch_fails() -> None:
    mb = memblock(scratch_only=True)
    assert mb.total_free() == 0
    with pytest.raises(OutOfMemory, match="from scratch"):
        mb.alloc(1)


# -- scratch sizing and placement ----------------------------------------------------------


def test_default_sizing_is_200_percent_with_a_minimum() -> None:
    usage = MemblockUsage(total=1000, low=10, per_node=[990, 10])
    sizes = size_scratch(ScratchPolicy(), usage)
    assert sizes.global_ == 2000
    assert sizes.per_node == (1980, MIN_SCRATCH_PAGES)
    assert sizes.lowmem == MIN_SCRATCH_PAGES
    assert size_scratch(ScratchPolicy(percent=150), usage).global_ == 1500
    assert size_scratch(ScratchPolicy(percent=101), MemblockUsage(100, 0, [100])).global_ == 101
    assert size_scratch(ScratchPolicy(percent=133), MemblockUsage(100, 0, [100])).global_ == 133


def test_explicit_sizing_rounds_up_to_pages() -> None:
    policy = ScratchPolicy.parse("16K,1M,5000")
    sizes = size_scratch(policy, MemblockUsage(0, 0, [0, 0, 0]))
    assert (sizes.lowmem, sizes.global_, sizes.per_node) == (4, 256, (2, 2, 2))
    assert sizes.total == 4 + 256 + 6


def test_placement() -> None:
    mb = memblock()
    mb.reserve(0, 1)
    mb.alloc(3)  # a memmap at the top
    areas = place_scratch(size_scratch(ScratchPolicy(), mb.usage), mb)
    kinds = [(a.kind, a.node) for a in areas]
    assert kinds == [(ScratchKind.LOWMEM, 0), (ScratchKind.GLOBAL, 1), (ScratchKind.NODE, 0), (ScratchKind.NODE, 1)]
    low = areas[0]
    assert low.start_pfn == 1 and low.end_pfn <= mb.low_limit  # right after the header page
    spans = sorted((a.start_pfn, a.end_pfn) for a in areas)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
    assert all(e <= 8192 - 3 or s >= 8192 for s, e in spans)  # clear of the memmap
    for a in areas[2:]:
        lo, hi = NODES2[a.node]
        assert lo <= a.start_pfn and a.end_pfn <= hi
    assert areas[1].start_pfn % 64 == 0  # aligned to its largest block


def test_placement_that_does_not_fit() -> None:
    mb = memblock()
    with pytest.raises(BootError, match=r"global scratch area of 9000 pages \(35.16 MiB\) does not fit: the largest free range there is 4096"):
        place_scratch(size_scratch(ScratchPolicy.parse("4K,36000K,4K"), mb.usage), mb)


def test_zero_size_means_no_area() -> None:
    mb = memblock()
    areas = place_scratch(size_scratch(ScratchPolicy.parse("0,1M,0"), mb.usage), mb)
    assert [a.kind for a in areas] == [ScratchKind.GLOBAL]


def test_setup_records_at_first_boot_and_reuses_later(caplog: pytest.LogCaptureFixture) -> None:
    header = MachineHeader(arena_size=8192 * 4096, nr_nodes=2)
    mb = memblock()
    mb.alloc(2)
    first = setup_scratch(header, ScratchPolicy(), mb)
    assert header.scratch == first and header.scratch_policy == ScratchPolicy()
    with caplog.at_level(logging.INFO, logger="kho_backend.scratch"):
        again = setup_scratch(header, ScratchPolicy(percent=500), memblock(scratch=first))
    assert again == first
    assert "kho_scratch=500% ignored" in caplog.text


# -- through boot ------------------------------------------------------------------------------


def test_first_boot_sizes_scratch_from_the_memmap(boot_kernel, machine_name: str) -> None:
    k = boot_kernel(machine_name, memory=256 << 20, nodes=2)
    memmap_pages = Memmap.pages_needed(k.arena.npages)
    assert k.memblock.usage.total == memmap_pages
    by_kind = {(a.kind, a.node): a.npages for a in k.header.scratch}
    assert by_kind[(ScratchKind.GLOBAL, 1)] == max(MIN_SCRATCH_PAGES, 2 * memmap_pages)
    assert set(k.scratch_ranges()) == {(a.start_pfn, a.npages) for a in k.header.scratch}
    stats = k.buddy.stats()
    assert stats.scratch_pages == sum(a.npages for a in k.header.scratch)
    assert stats.free_scratch_pages == stats.scratch_pages  # nothing placed there yet


def test_explicit_scratch_and_reuse_on_later_boots(boot_kernel, machine_name: str, machine_env: Path) -> None:
    k = boot_kernel(machine_name, memory=64 << 20, cmdline="kho_scratch=64K,1M,128K")
    assert sorted(a.npages for a in k.header.scratch) == [16, 32, 256]
    first = list(k.header.scratch)
    k.shutdown()
    k = boot_kernel(machine_name, cmdline="kho_scratch=300%", format=True)
    assert k.header.scratch == first
    assert k.header.scratch_policy == ScratchPolicy.parse("64K,1M,128K")
    k.shutdown()
    on_disk = MachineHeader.unpack((machine_env / f"{machine_name}.mem").read_bytes()[:4096])
    assert on_disk.scratch == first


def test_boot_with_scratch_that_cannot_be_placed(boot_kernel, machine_name: str) -> None:
    with pytest.raises(BootError, match="does not fit"):
        boot_kernel(machine_name, memory=8 << 20, cmdline="kho_scratch=4K,64M,4K")
