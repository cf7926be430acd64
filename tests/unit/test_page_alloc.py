"""The memmap (per-page state in the arena) and the buddy page allocator."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest_machine import SHM, machine_env, unique_name  # noqa: F401
from kho_backend.arena import Arena
from kho_backend.errors import HandoverError, MachineError, OutOfMemory
from kho_backend.leaves import Leaves
from kho_backend.memmap import (
    FREE_PAGE,
    Memmap,
    PageCategory,
    PageState,
    encode,
)
from kho_backend.page_alloc import PageAllocator, split_runs
from kho_backend.units import MAX_ORDER, PAGE_SIZE

NPAGES = 4096  # 16 MiB, two nodes of 2048 pages
RESERVED = [(0, 2)]  # header page, memmap page
SCRATCH = [(100, 150), (3000, 200)]  # deliberately unaligned, one per node


@pytest.fixture(scope="module")
def arena() -> Iterator[Arena]:
    folder = Path(tempfile.mkdtemp(prefix="gfs-alloc-", dir=SHM))
    arena = Arena.create(folder / "a.mem", NPAGES * PAGE_SIZE, nodes=2)
    yield arena
    arena.close()
    shutil.rmtree(folder)


def fresh(arena: Arena, *, scratch: Sequence[tuple[int, int]] = SCRATCH,
          preserved: Sequence[tuple[np.ndarray, int]] = ()) -> PageAllocator:  # fmt: skip
    """An allocator as boot builds it: memmap at PFN 1, pages 0-1 reserved."""
    memmap = Memmap(arena, 1, reset=True)
    for start, n in scratch:
        memmap.mark_scratch(start, n)
    for start, n in RESERVED:
        memmap.mark_reserved(start, n)
    for pfns, order in preserved:
        memmap.set_preserved(Leaves.from_heads(pfns, order))
    return PageAllocator(arena, memmap)


def scratch_mask() -> np.ndarray:
    mask = np.zeros(NPAGES, bool)
    for start, n in SCRATCH:
        mask[start : start + n] = True
    return mask


# -- splitting free runs into blocks -----------------------------------------------------------


@st.composite
def runs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    cuts = sorted(draw(st.sets(st.integers(0, 20_000), max_size=12)))
    pairs = list(zip(cuts[::2], cuts[1::2]))
    return np.array([a for a, _ in pairs], np.int64), np.array([b for _, b in pairs], np.int64)


@given(runs())
def test_split_runs_gives_maximal_aligned_blocks(r: tuple[np.ndarray, np.ndarray]) -> None:
    starts, ends = r
    heads, orders = split_runs(starts, ends)
    assert (heads % (1 << orders) == 0).all()
    assert (orders >= 0).all() and (orders <= MAX_ORDER).all()
    sort = np.argsort(heads)
    heads, orders = heads[sort], orders[sort]
    covered = np.zeros(20_001, np.int64)
    for h, o in zip(heads.tolist(), orders.tolist()):
        covered[h : h + (1 << o)] += 1
    wanted = np.zeros(20_001, np.int64)
    for a, b in zip(starts.tolist(), ends.tolist()):
        wanted[a:b] = 1
    assert (covered == wanted).all()  # exact cover, no overlap
    blocks = set(zip(heads.tolist(), orders.tolist()))
    for h, o in blocks:  # maximal: no block's buddy is a free block of the same order
        assert o == MAX_ORDER or (h ^ (1 << o), o) not in blocks


def test_split_runs_is_fast_for_a_huge_run() -> None:
    heads, orders = split_runs(np.array([1], np.int64), np.array([6 << 20], np.int64))
    assert int((1 << orders).sum()) == (6 << 20) - 1
    assert (orders == MAX_ORDER).sum() == (6 << 20) // 1024 - 1


# -- the allocator ------------------------------------------------------------------------------


def test_initial_state(arena: Arena) -> None:
    pages = fresh(arena)
    s = pages.stats()
    assert s.total_pages == NPAGES and s.reserved_pages == 2
    assert s.free_pages == NPAGES - 2 and s.used_pages == 0 and s.preserved_pages == 0
    assert s.scratch_pages == s.free_scratch_pages == 350
    assert pages.free_pages() == NPAGES - 2 - 350
    assert pages.free_pages(movable=True) == NPAGES - 2
    assert [n.total_pages for n in s.nodes] == [2048, 2048]
    # Only [1024, 2048) is a whole 4 MiB block: scratch cuts node 1's [3072, 4096).
    assert [n.free_blocks[MAX_ORDER] for n in s.nodes] == [1, 0]
    pages.check()


def test_alloc_and_free_merge_back(arena: Arena) -> None:
    pages = fresh(arena)
    before = pages.stats()
    blocks = [(pages.alloc(o), o) for o in (0, 3, 0, 9, 10, 1)]
    assert len({p for p, _ in blocks}) == len(blocks)
    assert pages.stats().used_pages == sum(1 << o for _, o in blocks)
    assert pages.memmap.head(blocks[1][0]) == (PageState.ALLOCATED, 3)
    for pfn, order in reversed(blocks):
        pages.free(pfn, order)
    assert pages.stats() == before
    pages.check()


def test_unmovable_never_gets_scratch_and_movable_prefers_it(arena: Arena) -> None:
    pages = fresh(arena)
    mask = scratch_mask()
    movable = pages.alloc(2, movable=True, node=1)
    assert mask[movable : movable + 4].all()
    taken = []
    with pytest.raises(OutOfMemory):
        while True:
            taken.append(pages.alloc(0))
    assert not mask[taken].any()
    assert len(taken) == NPAGES - 2 - 350
    assert pages.free_pages() == 0 and pages.free_pages(movable=True) == 350 - 4
    assert mask[pages.alloc(0, movable=True)]
    pages.check()


def test_node_preference_and_fallback(arena: Arena) -> None:
    pages = fresh(arena)
    assert pages.alloc(0, node=1) >= 2048
    assert pages.alloc(0, node=0) < 2048
    assert pages.alloc(MAX_ORDER - 1, node=1) >= 2048  # node 1 has 512-page blocks
    assert pages.alloc(MAX_ORDER, node=1) == 1024  # but no 4 MiB one: node 0 serves
    with pytest.raises(MachineError, match="Node 2 does not exist"):
        pages.alloc(0, node=2)


def test_fallback_to_another_node(arena: Arena) -> None:
    pages = fresh(arena, scratch=())
    for _ in range(2):
        assert pages.alloc(MAX_ORDER, node=1) >= 2048
    assert pages.alloc(MAX_ORDER, node=1) < 2048  # node 1 full: node 0 serves


def test_zeroing(arena: Arena) -> None:
    pages = fresh(arena)
    arena.array()[2 * PAGE_SIZE :] = 0xAA  # everything but the header and memmap pages
    pfn = pages.alloc(1, zero=True)
    assert bytes(arena.view(pfn, 2)) == bytes(2 * PAGE_SIZE)
    other = pages.alloc(1)
    assert bytes(arena.view(other, 2)) == b"\xaa" * 2 * PAGE_SIZE


def test_out_of_memory_is_clean(arena: Arena) -> None:
    pages = fresh(arena)
    before = pages.stats()
    held = []
    with pytest.raises(OutOfMemory, match=r"no free block of order 10 \(4 MiB\) for a unmovable allocation"):
        while True:
            held.append(pages.alloc(MAX_ORDER))
    assert pages.stats().used_pages == len(held) << MAX_ORDER
    pages.check()
    with pytest.raises(OutOfMemory, match="largest free block is of order"):
        pages.alloc(MAX_ORDER, movable=True)
    for pfn in held:
        pages.free(pfn, MAX_ORDER)
    assert pages.stats() == before


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: (p.alloc(0), 0), "double free"),
        (lambda p: (p.alloc(2) + 1, 0), "inside the block headed by PFN"),
        (lambda p: (p.alloc(2), 1), "order 2, not of order 1"),
        (lambda p: (p.alloc(2) + 1, 1), "not aligned"),
        (lambda p: (0, 0), "reserved boot memory"),
        (lambda p: (NPAGES, 0), "outside the arena"),
        (lambda p: (0, MAX_ORDER + 1), "outside the buddy orders"),
    ],
)  # fmt: skip
def test_bad_frees_are_refused(arena: Arena, make, match: str) -> None:
    pages = fresh(arena)
    pfn, order = make(pages)
    if match == "double free":
        pages.free(pfn, order)
    before = (pages.stats(), bytes(pages.memmap.map))
    with pytest.raises(MachineError, match=match):
        pages.free(pfn, order)
    assert (pages.stats(), bytes(pages.memmap.map)) == before
    pages.check()


def test_free_pfns_in_bulk(arena: Arena) -> None:
    pages = fresh(arena)
    before = pages.stats()
    pfns = np.array([pages.alloc(0, movable=bool(i % 3 == 0)) for i in range(600)])
    pages.free_pfns(pfns, 0)
    assert pages.stats() == before
    pages.check()


def test_free_pfns_takes_many_listed_blocks_off_their_lists(arena: Arena) -> None:
    """A bulk free rebuilds the chunks it touches: their listed blocks (here a hundred
    single pages, each between two allocated ones) leave the free lists first."""
    pages = fresh(arena)
    before = pages.stats()
    pfns = np.array([pages.alloc(0) for _ in range(400)])
    for pfn in pfns[::2].tolist():
        pages.free(pfn, 0)
    assert pages.stats().free_blocks(0) >= 150
    pages.check()
    pages.free_pfns(pfns[1::2], 0)
    assert pages.stats() == before
    pages.check()


def test_free_pfns_is_all_or_nothing(arena: Arena) -> None:
    pages = fresh(arena)
    pfns = np.array([pages.alloc(0) for _ in range(10)])
    pages.free(int(pfns[4]), 0)
    state = (pages.stats(), bytes(pages.memmap.map))
    with pytest.raises(MachineError, match="double free"):
        pages.free_pfns(pfns, 0)
    with pytest.raises(MachineError, match="twice"):
        pages.free_pfns(np.array([pfns[0], pfns[0]]), 0)
    assert (pages.stats(), bytes(pages.memmap.map)) == state


# -- preserved pages -------------------------------------------------------------------------------


def test_preserved_blocks(arena: Arena) -> None:
    empty = fresh(arena).stats()
    pages = fresh(arena, preserved=[(np.array([512, 1024]), 9), (np.array([5, 7, 2100]), 0)])
    s = pages.stats()
    assert s.preserved_pages == 1024 + 3 and s.used_pages == 0
    assert s.free_pages == empty.free_pages - 1027
    assert [p.preserved_pages for p in s.nodes] == [1026, 1]
    heads = {order: pfns.tolist() for pfns, order in pages.memmap.preserved_heads()}
    assert heads == {0: [5, 7, 2100], 9: [512, 1024]}

    pages.memmap.claim_preserved(np.array([1024]), 9)  # restored: now an ordinary allocation
    assert pages.stats().used_pages == 512 and pages.stats().preserved_pages == 515
    with pytest.raises(HandoverError, match="not preserved as a folio of order 9"):
        pages.memmap.claim_preserved(np.array([1024]), 9)
    with pytest.raises(HandoverError, match="not preserved as a folio of order 0"):
        pages.memmap.claim_preserved(np.array([512]), 0)
    with pytest.raises(HandoverError, match="not preserved"):
        pages.memmap.claim_preserved(np.array([6]), 0)

    pages.free(512, 9)  # an unclaimed preserved block goes straight back
    pages.free_pfns(np.array([5, 7, 2100]), 0)
    pages.free(1024, 9)
    # The chunk of 1024 (marked in part by boot) is still unlisted: its pages counted.
    assert pages.stats().free_pages == empty.free_pages and pages.stats().unlisted_pages == 1024
    pages.check()
    pages.list_all()
    assert pages.stats() == empty
    pages.check()


def test_set_preserved_refuses_overlaps(arena: Arena) -> None:
    with pytest.raises(HandoverError, match="covers PFN 0, which is reserved boot memory"):
        fresh(arena, preserved=[(np.array([0]), 1)])
    with pytest.raises(HandoverError, match="in scratch"):
        fresh(arena, preserved=[(np.array([96]), 3)])
    with pytest.raises(HandoverError, match="inside the block headed by PFN 512"):
        fresh(arena, preserved=[(np.array([512]), 9), (np.array([600]), 0)])
    with pytest.raises(HandoverError, match="the head of a preserved block of order 2"):
        fresh(arena, preserved=[(np.array([512]), 2), (np.array([512]), 0)])


# -- memmap reading ------------------------------------------------------------------------------


def test_encoding() -> None:
    assert encode(PageState.FREE) == FREE_PAGE == 0x10
    assert encode(PageState.PRESERVED, 9, scratch=True) == 0x80 | 0x30 | 9


def test_categories_and_block_states(arena: Arena) -> None:
    pages = fresh(arena, preserved=[(np.array([512]), 2)])
    used = pages.alloc(3, node=1)
    movable = pages.alloc(0, movable=True)
    cat = pages.memmap.categories()
    assert cat[0] == cat[1] == PageCategory.RESERVED
    assert (cat[512:516] == PageCategory.PRESERVED).all()
    assert (cat[used : used + 8] == PageCategory.USED).all()
    assert cat[movable] == PageCategory.SCRATCH and cat[120] == PageCategory.SCRATCH
    assert cat[2000] == PageCategory.FREE
    counts = np.bincount(cat, minlength=5)
    assert counts[PageCategory.USED] == 8 and counts[PageCategory.PRESERVED] == 4
    probe = np.array([used, used + 5, 513, 2000, 0])
    assert pages.memmap.allocated_mask(probe).tolist() == [True, True, False, False, False]
    assert pages.memmap.block_states_of(probe).tolist() == [
        PageState.ALLOCATED, PageState.ALLOCATED, PageState.PRESERVED, PageState.FREE, PageState.RESERVED]  # fmt: skip
    assert "inside the block headed by PFN 512" in pages.memmap.describe(514)


def test_reattaching_counts_preserved(arena: Arena) -> None:
    fresh(arena, preserved=[(np.array([512]), 2), (np.array([9]), 0)])
    assert Memmap(arena, 1).preserved_pages == 5  # an inspector reading the live memmap


# -- the property test ------------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, MAX_ORDER), st.booleans(), st.sampled_from([None, 0, 1])),
        st.tuples(st.just("free"), st.integers(0, 1 << 30)),
        st.tuples(st.just("claim"), st.integers(0, 1 << 30)),
        st.tuples(st.just("list")),
    ),
    max_size=80,
)
PRESERVE = st.lists(st.tuples(st.integers(0, NPAGES - 1), st.integers(0, 6)), max_size=10)


def pick_preserved(wanted: list[tuple[int, int]]) -> dict[int, int]:
    """Disjoint blocks from `wanted`, clear of reserved pages and scratch: pfn -> order."""
    taken = scratch_mask()
    taken[:2] = True
    chosen = {}
    for pfn, order in wanted:
        pfn &= ~((1 << order) - 1)
        if not taken[pfn : pfn + (1 << order)].any() and pfn + (1 << order) <= NPAGES:
            taken[pfn : pfn + (1 << order)] = True
            chosen[pfn] = order
    return chosen


def assert_no_order_fits(pages: PageAllocator, order: int, movable: bool) -> None:
    for node in pages.stats().nodes:
        normal = [a - b for a, b in zip(node.free_blocks, node.free_scratch_blocks)]
        usable = [a + b for a, b in zip(normal, node.free_scratch_blocks)] if movable else normal
        assert not any(usable[order:]), "OutOfMemory although a block was free"


@settings(max_examples=200, deadline=None)
@given(preserve=PRESERVE, ops=OPS)
def test_random_alloc_free_keeps_the_books(arena: Arena, preserve, ops) -> None:
    empty = fresh(arena).stats()
    preserved = pick_preserved(preserve)
    pages = fresh(arena, preserved=[(np.array([p]), o) for p, o in preserved.items()])
    scratch = scratch_mask()
    owner = np.zeros(NPAGES, bool)
    for pfn, order in preserved.items():
        owner[pfn : pfn + (1 << order)] = True
    live: dict[int, int] = {}
    for op in ops:
        if op[0] == "alloc":
            _, order, movable, node = op
            try:
                pfn = pages.alloc(order, movable=movable, node=node)
            except OutOfMemory:
                assert_no_order_fits(pages, order, movable)
                continue
            span = slice(pfn, pfn + (1 << order))
            assert pfn % (1 << order) == 0 and not owner[span].any()  # no overlap
            assert movable or not scratch[span].any()  # unmovable never in scratch
            owner[span] = True
            live[pfn] = order
        elif op[0] == "free" and live:
            pfn = sorted(live)[op[1] % len(live)]
            order = live.pop(pfn)
            pages.free(pfn, order)
            owner[pfn : pfn + (1 << order)] = False
        elif op[0] == "claim" and preserved:
            pfn = sorted(preserved)[op[1] % len(preserved)]
            order = preserved.pop(pfn)
            pages.memmap.claim_preserved(np.array([pfn]), order)
            live[pfn] = order
        elif op[0] == "list":
            pages.list_some()
        s = pages.stats()
        assert s.used_pages == sum(1 << o for o in live.values())
        assert s.preserved_pages == sum(1 << o for o in preserved.values())
        assert s.free_pages + s.used_pages + s.preserved_pages + s.reserved_pages == s.total_pages
    pages.check()
    for pfn, order in [*live.items(), *preserved.items()]:
        pages.free(pfn, order)
    assert pages.stats().free_pages == empty.free_pages
    pages.check()
    pages.list_all()
    assert pages.stats() == empty  # everything merged back into the same blocks
    pages.check()


def test_whole_leaves_reserved_and_claimed() -> None:
    """Leaves preserved whole (contiguous memory) in chunks nothing else touched are
    deferred: their bytes are written when a chunk is first needed, as PRESERVED before
    the claim and ALLOCATED after it; a page in them that is not free is still named."""
    from kho_backend.leaves import LEAF_BITS
    folder = Path(tempfile.mkdtemp(prefix="gfs-alloc-", dir=SHM))
    arena = Arena.create(folder / "a.mem", 3 * LEAF_BITS * PAGE_SIZE)
    try:
        whole = Leaves.from_heads(np.arange(LEAF_BITS, 3 * LEAF_BITS), 0)
        memmap = Memmap(arena, 1, reset=True)
        memmap.mark_reserved(0, 2)
        memmap.set_preserved(whole)
        assert not memmap.settled
        pages = PageAllocator(arena, memmap)
        assert not memmap.settled          # the preserved chunks have no free page
        assert pages.stats().preserved_pages == 2 * LEAF_BITS
        assert pages.stats().free_pages == LEAF_BITS - 2
        assert memmap.head(LEAF_BITS + 5) == (PageState.PRESERVED, 0)   # one chunk settled
        memmap.claim_leaves(whole)
        assert pages.stats().preserved_pages == 0
        assert memmap.head(2 * LEAF_BITS) == (PageState.ALLOCATED, 0)
        with pytest.raises(HandoverError, match=f"PFN {LEAF_BITS} was not preserved"):
            memmap.claim_leaves(whole)
        pages.free(2 * LEAF_BITS + 4096, 0)           # a chunk not settled yet
        assert pages.stats().free_pages == LEAF_BITS - 1
        pages.check()                                  # settles the rest
        assert memmap.settled
        expected = np.full(2 * LEAF_BITS, encode(PageState.ALLOCATED), np.uint8)
        expected[LEAF_BITS + 4096] = encode(PageState.FREE)
        assert (memmap.map[LEAF_BITS:] == expected).all()
        again = Memmap(arena, 1, reset=True)
        again.mark_reserved(LEAF_BITS + 77, 1)
        with pytest.raises(HandoverError, match=f"covers PFN {LEAF_BITS + 77}, which is reserved"):
            again.set_preserved(whole)
    finally:
        arena.close()
        shutil.rmtree(folder)


def test_deferred_blocks_claimed_one_by_one_and_overlaps() -> None:
    """Blocks of deferred leaves claimed one by one (a chain's pages) stay deferred and
    are written ALLOCATED when their chunk settles; a claim twice, a whole claim after
    them and a second map over the same pages are refused, naming the page."""
    from kho_backend.leaves import LEAF_BITS
    folder = Path(tempfile.mkdtemp(prefix="gfs-alloc-", dir=SHM))
    arena = Arena.create(folder / "a.mem", 2 * LEAF_BITS * PAGE_SIZE)
    try:
        data = Leaves.from_heads(np.arange(LEAF_BITS, LEAF_BITS + 5000, 2), 0)
        memmap = Memmap(arena, 1, reset=True)
        memmap.mark_reserved(0, 2)
        memmap.set_preserved(data)
        with pytest.raises(HandoverError, match=f"covers PFN {LEAF_BITS + 4}, which is the head of a preserved"):
            memmap.set_preserved(Leaves.from_heads(np.array([LEAF_BITS + 4]), 2))
        pages = PageAllocator(arena, memmap)
        one = np.array([LEAF_BITS + 2048, LEAF_BITS + 4000])
        memmap.claim_preserved(one, 0)
        assert pages.stats().preserved_pages == 2500 - 2
        with pytest.raises(HandoverError, match=f"PFN {LEAF_BITS + 2048} was not preserved"):
            memmap.claim_preserved(one[:1], 0)
        with pytest.raises(HandoverError, match=f"PFN {LEAF_BITS + 2048} was not preserved"):
            memmap.claim_leaves(data)
        pages.free_pfns(one, 0)
        pages.check()
        assert memmap.head(LEAF_BITS + 2) == (PageState.PRESERVED, 0)
        assert memmap.head(LEAF_BITS + 2048)[0] is PageState.FREE
        assert pages.stats().free_pages == 2 * LEAF_BITS - 2 - (2500 - 2)
    finally:
        arena.close()
        shutil.rmtree(folder)


def test_deferred_folios_are_written_head_and_tails() -> None:
    """2 MiB folios (order 9, under a byte of leaf per chunk) are deferred too: claimed
    whole by state, then written as a head and its tails when their chunks settle."""
    folder = Path(tempfile.mkdtemp(prefix="gfs-alloc-", dir=SHM))
    arena = Arena.create(folder / "a.mem", 64 * 1024 * PAGE_SIZE)
    try:
        heads = np.arange(8192, 64 * 1024, 1024)          # one folio per second 2 MiB
        folios = Leaves.from_heads(heads, 9)
        memmap = Memmap(arena, 1, reset=True)
        memmap.mark_reserved(0, 17)
        memmap.set_preserved(folios, disjoint=True)
        assert not memmap.settled
        pages = PageAllocator(arena, memmap)
        memmap.claim_leaves(folios)
        assert pages.stats().preserved_pages == 0
        pages.free(int(heads[3]), 9)
        pages.check()
        assert memmap.settled
        states = memmap.block_states()
        assert (states[heads[4]:heads[4] + 512] == PageState.ALLOCATED).all()
        assert memmap.head(int(heads[4]) + 1)[0] is PageState.TAIL
        assert memmap.head(int(heads[3]))[0] is PageState.FREE
    finally:
        arena.close()
        shutil.rmtree(folder)


def test_settle_some_writes_the_deferred_chunks_a_slice_at_a_time() -> None:
    """What the daemon does after a boot, between requests: each call writes some of
    the chunks still deferred, until none is left and every block reads as marked."""
    folder = Path(tempfile.mkdtemp(prefix="gfs-alloc-", dir=SHM))
    arena = Arena.create(folder / "a.mem", 256 * 1024 * PAGE_SIZE)     # 1 GiB, 256 chunks
    try:
        heads = np.arange(1024, 201 * 1024, 1024)             # 200 chunks preserved whole
        folios = Leaves.from_heads(heads, 10)
        memmap = Memmap(arena, 1, reset=True)
        memmap.mark_reserved(0, 17)
        memmap.set_preserved(folios, disjoint=True)
        PageAllocator(arena, memmap)
        steps = 1
        while not memmap.settle_some():
            steps += 1
        assert steps >= 2 and memmap.settled
        assert memmap.head(int(heads[150])) == (PageState.PRESERVED, 10)
        assert (memmap.block_states()[heads[0]:heads[-1] + 1024] == PageState.PRESERVED).all()
    finally:
        arena.close()
        shutil.rmtree(folder)


# -- deferred listing ---------------------------------------------------------------------------


def half_preserved(npages: int, chunks: range) -> tuple[Arena, Path, Memmap, np.ndarray]:
    """A one-node arena as a boot leaves it after a fragmented handover: pages 0-1
    reserved, every even page of ``chunks`` preserved (deferred, as boot marks them)."""
    folder = Path(tempfile.mkdtemp(prefix="gfs-alloc-", dir=SHM))
    arena = Arena.create(folder / "a.mem", npages * PAGE_SIZE)
    memmap = Memmap(arena, 1, reset=True)
    memmap.mark_reserved(0, 2)
    kept = np.arange(chunks.start << MAX_ORDER, chunks.stop << MAX_ORDER, 2)
    memmap.set_preserved(Leaves.from_heads(kept, 0), disjoint=True)
    return arena, folder, memmap, kept


def test_partly_marked_chunks_start_unlisted_with_exact_counts() -> None:
    """Chunks boot marked in part are not cut at start-up (nor their memmap written):
    their free pages are counted from boot's marks, exact before any listing. An
    allocation that finds no listed block lists some; one that fits nowhere lists them
    all before it fails."""
    arena, folder, memmap, kept = half_preserved(16 << MAX_ORDER, range(1, 9))
    try:
        pages = PageAllocator(arena, memmap)
        s = pages.stats()
        # chunk 0 (two reserved pages) and chunks 1-8 (half preserved) are unlisted
        assert s.free_pages == (16 << MAX_ORDER) - 2 - len(kept)
        assert s.unlisted_pages == (1 << MAX_ORDER) - 2 + len(kept)
        assert s.free_blocks(MAX_ORDER) == 7 and sum(map(s.free_blocks, range(MAX_ORDER))) == 0
        assert not pages.listed and not memmap.settled
        fresh_blocks = [pages.alloc(MAX_ORDER) for _ in range(7)]
        assert min(fresh_blocks) == 9 << MAX_ORDER
        pfn = pages.alloc(0)                          # needs an unlisted chunk: a few listed
        assert pfn < 9 << MAX_ORDER and 0 < pages.stats().unlisted_pages < s.unlisted_pages
        assert pages.stats().free_pages == s.free_pages - (7 << MAX_ORDER) - 1
        with pytest.raises(OutOfMemory, match="largest free block is of order 9"):
            pages.alloc(MAX_ORDER)                    # lists every chunk first
        assert pages.listed and pages.stats().unlisted_pages == 0
        s = pages.stats()       # single pages, never merged (one allocated), and chunk 0
        assert s.free_blocks(0) == len(kept) - 1 == s.free_pages - 1022
        assert [s.free_blocks(k) for k in range(1, MAX_ORDER + 1)] == [1] * 9 + [0]
        pages.check()
    finally:
        arena.close()
        shutil.rmtree(folder)


def test_frees_into_an_unlisted_chunk_merge_when_it_is_listed() -> None:
    """A block freed into an unlisted chunk (one by one or in bulk) is counted at once
    and merged with its free buddies when the chunk is listed."""
    arena, folder, memmap, kept = half_preserved(4 << MAX_ORDER, range(1, 2))
    try:
        pages = PageAllocator(arena, memmap)
        base = 1 << MAX_ORDER
        memmap.claim_preserved(np.array([base, base + 2]), 0)
        before = pages.stats()
        pages.free(base, 0)
        pages.free_pfns(np.array([base + 2]), 0)
        pages.free(base + 4, 0)                       # preserved, unclaimed: released
        s = pages.stats()
        assert s.free_pages == before.free_pages + 3 and s.preserved_pages == len(kept) - 3
        assert s.unlisted_pages == before.unlisted_pages + 3 and s.free_blocks(2) == 0
        pages.free(base + 6, 0)                       # still preserved: freed as well
        pages.check()
        assert memmap.head(base) == (PageState.FREE, 0)     # marked, not merged yet
        pages.list_all()
        assert memmap.head(base) == (PageState.FREE, 3)     # [base, base + 8) whole
        assert pages.stats().free_blocks(0) == len(kept) - 4      # the others: single pages
        assert pages.stats().free_pages == before.free_pages + 4
        pages.check()
    finally:
        arena.close()
        shutil.rmtree(folder)


def test_list_some_lists_every_chunk_a_slice_at_a_time() -> None:
    """What the daemon does after a boot, between requests: each call lists some of the
    unlisted chunks, until none is left; the lists then hold what an eager start-up
    would have built."""
    arena, folder, memmap, kept = half_preserved(64 << MAX_ORDER, range(1, 41))
    try:
        pages = PageAllocator(arena, memmap)
        free = pages.stats().free_pages
        steps = 1
        while not pages.list_some():
            steps += 1
            assert pages.stats().free_pages == free
        assert steps >= 2 and pages.listed and memmap.settled
        s = pages.stats()
        assert s.unlisted_pages == 0 and s.free_pages == free
        assert s.free_blocks(0) == len(kept) and s.free_blocks(MAX_ORDER) == 23
        assert s.free_blocks(1) == 1 and s.free_blocks(9) == 1     # chunk 0 after pages 0-1
        pages.check()
    finally:
        arena.close()
        shutil.rmtree(folder)


def test_a_kexec_with_chunks_still_unlisted(machine_env: Path) -> None:
    """A kernel hands over (for an exec) before its free lists are all built: the next
    kernel finds the same free pages and the pool whole."""
    from guestfs.session import Options, Session
    from kho_backend.arena import drop_kept_mapping
    options = Options(unique_name("frag"), memory=64 << 20, format=True)
    session = Session.open(options)
    pool = session.kernel.kho.pools["guestfs"]
    taken = np.array([pool.alloc(0) for _ in range(4096)], np.int64)
    pool.free_bulk(taken[taken & 1 == 1], 0)
    pool_pages = pool.nr_pages
    session.hand_over({}, for_exec=False)
    session.close()
    options = dataclasses.replace(options, format=False)
    try:
        free = []
        for _ in range(2):
            session = Session.open(options)
            buddy = session.kernel.buddy
            assert not buddy.listed and buddy.stats().unlisted_pages > 1024
            free.append(buddy.stats().free_pages)
            assert session.kernel.kho.pools["guestfs"].nr_pages == pool_pages
            session.hand_over({}, for_exec=True)
            session.leave()
            session.close()
        session = Session.open(options)
        try:
            buddy = session.kernel.buddy
            assert buddy.stats().free_pages == free[0] == free[1]
            buddy.check()
            buddy.list_all()
            buddy.check()
            assert buddy.stats().free_pages == free[0]
        finally:
            session.hand_over({}, for_exec=False)
            session.close()
    finally:
        drop_kept_mapping()
