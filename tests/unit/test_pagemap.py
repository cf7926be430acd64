"""PageMap: file page index -> PFN, on a real booted machine's arena and allocator."""

from __future__ import annotations

import tracemalloc

import pytest
from conftest_machine import BootKernel, boot_kernel, machine_env, unique_name  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestfs.pagemap import FOLIO_ORDER, REGION_PAGES, REGION_SIZE, PageMap, PagePool
from kho_backend.units import PAGE_SIZE

MiB = 1 << 20


@pytest.fixture
def pool(boot_kernel: BootKernel) -> PagePool:
    """The file-page pool of a freshly booted 64 MiB machine."""
    kernel = boot_kernel(unique_name("pagemap"), memory=64 * MiB)
    return PagePool(kernel.arena, kernel.buddy)


def fill(pool: PagePool, pm: PageMap, off: int, data: bytes) -> None:
    assert pm.write(pool, off, data)


def orders(pm: PageMap) -> set[int]:
    return {e[3] for e in pm.extents()}


def dirty_free_pages(pool: PagePool, npages: int) -> None:
    """Leave garbage in free pages, so that a missing zeroing shows."""
    pm = PageMap()
    fill(pool, pm, 0, b"\xff" * npages * PAGE_SIZE)
    pm.release(pool)


# --- reading and writing ---------------------------------------------------------


def test_small_write_reads_back_and_holes_read_zero(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 5000, b"hello")
    assert bytes(pm.read(pool, 4990, 20)) == bytes(10) + b"hello" + bytes(5)
    assert bytes(pm.read(pool, 0, 4096)) == bytes(4096)   # page 0 is a hole
    assert pm.npages == 1 and pm.blocks() == 8 and pool.used_pages == 1
    assert orders(pm) == {0}


def test_new_pages_are_zeroed_around_the_written_bytes(pool: PagePool) -> None:
    dirty_free_pages(pool, 64)
    pm = PageMap()
    fill(pool, pm, 100, b"x")
    assert bytes(pm.read(pool, 0, PAGE_SIZE)) == bytes(100) + b"x" + bytes(PAGE_SIZE - 101)


def test_read_within_one_folio_is_zero_copy(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 0, bytes(range(256)) * (REGION_SIZE // 256))
    assert orders(pm) == {FOLIO_ORDER}
    got = pm.read(pool, 4000, 10000)
    assert isinstance(got, memoryview)
    (pfn,) = pm.pfn_arrays()[FOLIO_ORDER]
    pool.view(int(pfn), 4000, 1)[0] = 0x42   # the view is the arena itself
    assert got[0] == 0x42


def test_read_across_pages_is_joined(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 0, b"a" * PAGE_SIZE)
    fill(pool, pm, 2 * PAGE_SIZE, b"c" * PAGE_SIZE)   # page 1 stays a hole
    expected = b"a" * PAGE_SIZE + bytes(PAGE_SIZE) + b"c" * PAGE_SIZE
    assert bytes(pm.read(pool, 0, 3 * PAGE_SIZE)) == expected


def test_sequential_large_file_uses_folios_after_region_zero(pool: PagePool) -> None:
    pm = PageMap()
    chunk = 128 * 1024
    for off in range(0, 3 * REGION_SIZE, chunk):
        fill(pool, pm, off, bytes([off // chunk % 251]) * chunk)
    ext = pm.extents()
    assert [e for e in ext if e[3] == FOLIO_ORDER] and sum(e[2] for e in ext) == 3 * REGION_PAGES
    assert all(e[0] >= REGION_PAGES for e in ext if e[3] == FOLIO_ORDER)
    for off in range(0, 3 * REGION_SIZE, chunk):
        assert bytes(pm.read(pool, off, chunk)) == bytes([off // chunk % 251]) * chunk


def test_a_write_covering_a_region_takes_a_folio(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 0, b"z" * REGION_SIZE)
    assert pm.extents() == [(0, pm.extents()[0][1], REGION_PAGES, FOLIO_ORDER)]


def test_a_sparse_write_far_out_takes_pages_not_a_folio(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 10 * REGION_SIZE + 5, b"far")
    assert pm.npages == 1 and orders(pm) == {0}


def test_no_free_folio_falls_back_to_pages(pool: PagePool) -> None:
    hog = _hog_folios(pool)
    pm = PageMap()
    fill(pool, pm, 0, b"a" * REGION_SIZE)
    assert orders(pm) == {0} and pm.npages == REGION_PAGES
    assert bytes(pm.read(pool, REGION_SIZE - 3, 3)) == b"aaa"
    pm.release(pool)
    for pfn in hog:
        pool.free(pfn, 0)


def _hog_folios(pool: PagePool) -> list[int]:
    """Take every free page but a few hundred scattered ones: no order-9 block is left."""
    hog = []
    while (pfn := pool.alloc(0)) is not None:
        hog.append(pfn)
    for pfn in hog[::2][:REGION_PAGES + 100]:   # every other page: never a whole folio
        pool.free(pfn, 0)
    kept = set(hog[::2][:REGION_PAGES + 100])
    return [p for p in hog if p not in kept]


# --- running out of memory ---------------------------------------------------------


def test_a_write_that_does_not_fit_stores_nothing(pool: PagePool) -> None:
    free = pool.free_pages()
    pm = PageMap()
    fill(pool, pm, 0, b"kept")
    assert not pm.write(pool, 100, b"q" * free * PAGE_SIZE)       # one page too many
    assert pm.npages == pool.used_pages == 1 and pool.free_pages() == free - 1
    assert bytes(pm.read(pool, 0, 8)) == b"kept\0\0\0\0" and pm.extents()[0][2] == 1
    assert pm.write(pool, 100, b"q" * (free - 1) * PAGE_SIZE)     # exactly what is left
    assert pool.free_pages() == 0 and not pm.write(pool, free * PAGE_SIZE, b"more")
    pm.release(pool)
    assert pool.free_pages() == free and pool.used_pages == 0


def test_allocate_is_all_or_nothing(pool: PagePool) -> None:
    free = pool.free_pages()
    pm = PageMap()
    fill(pool, pm, 0, b"keep")
    assert not pm.allocate(pool, 0, (free + 1) * PAGE_SIZE)
    assert pm.npages == 1 and pool.free_pages() == free - 1
    assert pm.allocate(pool, 3 * REGION_SIZE, REGION_SIZE + 1)
    assert bytes(pm.read(pool, 3 * REGION_SIZE, REGION_SIZE + 1)) == bytes(REGION_SIZE + 1)
    assert bytes(pm.read(pool, 0, 4)) == b"keep"


# --- truncate and punch ------------------------------------------------------------


def test_truncate_frees_pages_and_zeroes_the_cut_tail(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 0, b"x" * 10 * PAGE_SIZE)
    pm.truncate(pool, 3 * PAGE_SIZE + 10)
    assert pm.npages == 4 and pool.used_pages == 4
    assert bytes(pm.read(pool, 3 * PAGE_SIZE, PAGE_SIZE)) == b"x" * 10 + bytes(PAGE_SIZE - 10)
    pm.truncate(pool, 0)
    assert pm.npages == 0 and pool.used_pages == 0 and pm.extents() == []


def test_truncate_into_a_folio_keeps_it_zeroed_past_the_cut(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 0, b"y" * 3 * REGION_SIZE)
    pm.truncate(pool, REGION_SIZE + 7)
    assert pm.npages == 2 * REGION_PAGES   # region 1's folio is kept whole
    assert bytes(pm.read(pool, REGION_SIZE, 10)) == b"y" * 7 + bytes(3)
    assert bytes(pm.read(pool, REGION_SIZE + 7, REGION_SIZE - 7)) == bytes(REGION_SIZE - 7)
    pm.truncate(pool, REGION_SIZE)
    assert pm.npages == REGION_PAGES


def test_punch_hole_frees_whole_pages_and_folios_and_zeroes_the_rest(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 0, b"p" * 3 * REGION_SIZE)
    pm.punch_hole(pool, REGION_SIZE, REGION_SIZE)      # region 1: a whole folio
    pm.punch_hole(pool, 2 * REGION_SIZE + 10, 100)     # inside region 2's folio: zeroed
    assert pm.npages == 2 * REGION_PAGES
    assert bytes(pm.read(pool, REGION_SIZE - 1, 2)) == b"p\0"
    assert bytes(pm.read(pool, 2 * REGION_SIZE + 9, 102)) == b"p" + bytes(100) + b"p"
    small = PageMap()
    fill(pool, small, 0, b"s" * 4 * PAGE_SIZE)
    small.punch_hole(pool, 100, 2 * PAGE_SIZE)         # page 1 freed, pages 0 and 2 zeroed
    assert small.npages == 3
    assert bytes(small.read(pool, 0, 4 * PAGE_SIZE)) == (
        b"s" * 100 + bytes(2 * PAGE_SIZE) + b"s" * (2 * PAGE_SIZE - 100))


# --- the handover's view -------------------------------------------------------------


def test_extents_round_trip_and_pfn_arrays(pool: PagePool) -> None:
    pm = PageMap()
    fill(pool, pm, 0, b"a" * 5 * PAGE_SIZE)
    fill(pool, pm, 20 * PAGE_SIZE, b"b")
    fill(pool, pm, REGION_SIZE, b"c" * REGION_SIZE)
    ext = pm.extents()
    back = PageMap.from_extents(ext)
    assert back.extents() == ext and back.npages == pm.npages
    assert bytes(back.read(pool, 0, 2 * REGION_SIZE)) == bytes(pm.read(pool, 0, 2 * REGION_SIZE))
    arrays = pm.pfn_arrays()
    assert len(arrays[FOLIO_ORDER]) == 1 and len(arrays[0]) == 6
    assert sorted(arrays[0].tolist()) == sorted(
        p for off, pfn, n, o in ext if o == 0 for p in range(pfn, pfn + n))


@pytest.mark.parametrize("bad", [
    [(0, 1000, 1, 0), (0, 2000, 1, 0)],                 # the same page twice
    [(0, 1024, REGION_PAGES, FOLIO_ORDER), (5, 3000, 1, 0)],
    [(3, 1024, REGION_PAGES, FOLIO_ORDER)],              # folio not region-aligned
    [(0, 1000, 1, 3)],                                   # an order the map never uses
    [(0, 0, 1, 0)],                                      # PFN 0 is the machine header
])
def test_from_extents_refuses_malformed_maps(bad: list) -> None:
    with pytest.raises(ValueError):
        PageMap.from_extents(bad)


# --- against a model -------------------------------------------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3 * REGION_SIZE), st.integers(1, 300_000)),
    st.tuples(st.just("truncate"), st.integers(0, 4 * REGION_SIZE), st.just(0)),
    st.tuples(st.just("punch"), st.integers(0, 4 * REGION_SIZE), st.integers(1, 3 * REGION_SIZE)),
), max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_pagemap_matches_a_bytearray(pool: PagePool, ops: list) -> None:
    pm, model = PageMap(), bytearray()
    base = pool.used_pages
    for i, (op, off, n) in enumerate(ops):
        if op == "write":
            data = bytes([i + 1]) * n
            fill(pool, pm, off, data)
            model.extend(bytes(max(0, off + n - len(model))))
            model[off:off + n] = data
        elif op == "truncate":
            pm.truncate(pool, off)
            model = model[:off] + bytes(max(0, off - len(model)))
        else:
            pm.punch_hole(pool, off, n)
            end = min(off + n, len(model))
            if off < end:
                model[off:end] = bytes(end - off)
        if model:
            assert bytes(pm.read(pool, 0, len(model))) == model
        assert pool.used_pages - base == pm.npages == sum(e[2] for e in pm.extents())
    pm.release(pool)
    assert pool.used_pages == base


# --- memory ------------------------------------------------------------------------------


def test_python_memory_per_gib_of_large_file_data_is_under_1_mib(
        boot_kernel: BootKernel) -> None:
    data_size = 1 << 30
    kernel = boot_kernel(unique_name("pagemap"), memory=data_size + 64 * MiB)
    pool = PagePool(kernel.arena, kernel.buddy)
    chunk = b"\x5a" * MiB
    pm = PageMap()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for off in range(0, data_size, MiB):
        pm.write(pool, off, chunk)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"\nPython memory for 1 GiB of file data: {used} bytes")
    assert pm.npages * PAGE_SIZE == data_size
    assert used < MiB
    pm.release(pool)
