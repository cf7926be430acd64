"""Blocks as radix-leaf bitmaps (kho_backend.leaves): what boot and restore work on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kho_backend.leaves import LEAF_BITS, RUN_LEAVES, Leaves, set_bits

NPAGES = 40 * LEAF_BITS + 1234      # leaves of order 0 and a partial last one


@settings(max_examples=60, deadline=None)
@given(order=st.integers(0, 10), picks=st.lists(st.integers(0, NPAGES), max_size=300),
       dense=st.booleans())
def test_leaves_hold_exactly_their_blocks(order: int, picks: list[int], dense: bool) -> None:
    """Heads, counts, membership and runs agree with the plain set of heads."""
    slots = NPAGES >> order
    if dense and slots:
        start = picks[0] % slots if picks else 0
        picks = picks + [(start + i) << order for i in range(min(3 * LEAF_BITS, slots - start))]
    heads = np.unique(np.array([p >> order << order for p in picks if p >> order < slots],
                               np.int64))
    leaves = Leaves.from_heads(heads, order)
    assert leaves.heads().tolist() == heads.tolist()
    assert leaves.count() == len(heads) and leaves.pages() == len(heads) << order
    probe = np.unique(np.concatenate([heads, np.arange(0, NPAGES, 997) >> order << order]))
    assert leaves.contains(probe).tolist() == np.isin(probe, heads).tolist()
    from_runs = []
    for run in leaves.runs(NPAGES):
        assert run.first % (LEAF_BITS << order) == 0 and run.slots <= RUN_LEAVES * LEAF_BITS
        assert run.first + (run.slots << order) <= NPAGES
        bits = run.bits()
        assert len(bits) == run.slots and int(bits.sum()) == run.count
        assert run.heads().tolist() == (run.first + (np.flatnonzero(bits) << order)).tolist()
        from_runs += run.heads().tolist()
    assert from_runs == heads.tolist()


def test_without_and_set_bits() -> None:
    leaves = Leaves.from_heads(np.array([0, 7, 8, LEAF_BITS + 3]), 0)
    claimed = np.zeros_like(leaves.bitmaps)
    claimed[0, 0] = 0x80                               # bit 7 of the first leaf
    assert leaves.without(claimed).heads().tolist() == [0, 8, LEAF_BITS + 3]
    assert set_bits(np.array([0, 0b1001, 0, 0x80], np.uint8)).tolist() == [8, 11, 31]


def test_from_heads_refuses_what_is_no_block() -> None:
    with pytest.raises(ValueError, match="not aligned"):
        Leaves.from_heads(np.array([6]), 2)
    with pytest.raises(ValueError, match="negative"):
        Leaves.from_heads(np.array([-4]), 2)
