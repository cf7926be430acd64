"""The kernel's references to the inodes of one mount: lookup and open counts, and
which inodes may have pages in the kernel's page cache.

The kernel holds a lookup reference on every inode in its inode cache, so after a walk
of the tree it holds one on every inode: a Python object per inode would make the
daemon's memory grow with the tree, and so would the work of handing the table to the
next kernel when the mount is kept across a kexec (`guestfs.connection`). Lookup counts
therefore live in blocks of `BLOCK_INOS` consecutive inode numbers, and the blocks lie
side by side in one flat array, with the block key of each row in another: the table
goes to the next kernel by a few array operations and a dict entry per block, not a
Python object per inode. A count takes 16 bits: it is small (1 after the kernel's first
lookup, one more each time a listing of the inode's directory returns it); one that does
not fit (the kernel's own counter is 64-bit) is kept in a dict beside. Inode numbers are
handed out in order and never reused, so inodes made together share blocks: a tree the
kernel holds whole costs about 5 bytes per inode. A block goes as soon as none of its
inodes is held (the last row takes its place), so the numbers of inodes long deleted
cost nothing; the dearest case, one held inode per block, is about 200 bytes.

Open counts are a plain dict: few files are open at once, next to the inodes the kernel
merely caches.

The table belongs to the kernel's mount, not to the filesystem in the arena: a
`Filesystem` that replaces another in the same process over the same mount (an
in-process re-boot) adopts its table (`Filesystem.adopt_kernel_refs`).

`InodeSet`, a set of inode numbers as 64-bit masks per block of 64, is the adapter's
record of the inodes whose pages the kernel may cache: also one per inode of a tree read
whole, and handed over with the references.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Inode numbers per block of lookup counts (`PackedLookups.live` counts a block's
#: held inodes in a u32 bitmap).
BLOCK_INOS = 32
#: The last slot of a block counts its non-zero slots, so that an empty block is freed
#: without a scan.
_LIVE = BLOCK_INOS
#: Slots per block (row) in the flat array.
STEP = BLOCK_INOS + 1
#: The type code of the flat array: u16 (`APART`: the count is kept apart).
_SLOT = "H"
_ZERO_BLOCK = array(_SLOT, bytes(2 * STEP))
_ZERO_SLOT = array(_SLOT, [0])


#: The slot value of a count that does not fit 16 bits: kept apart, by inode.
APART = 0xFFFF


@dataclass(frozen=True)
class PackedLookups:
    """A table of lookup counts as a handover carries it, and as `KernelRefs` keeps
    it: block keys, and per key `BLOCK_INOS` u16 counts, where `APART` says the count
    is listed in `inos` and `counts`. Sound when no key is listed twice, every block
    holds an inode (a count not 0), and `inos` lists each inode of a slot `APART`
    once, with a count of at least `APART`, and nothing else."""

    keys: np.ndarray        # u64 block keys
    slots: np.ndarray       # u16 (or u8) counts, `BLOCK_INOS` a key
    inos: np.ndarray        # u64 inodes whose count is kept apart
    counts: np.ndarray      # u64 their counts

    @functools.cached_property
    def live(self) -> np.ndarray:
        """How many counts of each block are not 0 (u32), by a popcount of a bitmap:
        a fraction of a millisecond a million inodes."""
        held = np.packbits(self.slots != 0, axis=1)         # 4 bytes a block
        return np.bitwise_count(held.view(np.uint32)).reshape(-1)

    def rows_of(self, inos: np.ndarray) -> np.ndarray:
        """The index in `keys` of the block of each of `inos`, or len(keys) for a block
        not listed (the keys listed once each)."""
        blocks = inos // np.uint64(BLOCK_INOS)
        if not len(self.keys):
            return np.zeros(len(inos), np.intp)
        order = np.argsort(self.keys, kind="stable")
        at = np.minimum(np.searchsorted(self.keys, blocks, sorter=order), len(order) - 1)
        rows = order[at]
        return np.where(self.keys[rows] == blocks, rows, len(self.keys))


class KernelRefs:
    """Lookup and open counts per inode of one kernel mount (see the module docstring)."""

    __slots__ = ("_big", "_keys", "_opens", "_rows", "_slots")

    def __init__(self) -> None:
        self._slots = array(_SLOT)          # the blocks, `STEP` slots a row
        self._keys = array("Q")             # the block key of each row
        self._rows: dict[int, int] = {}     # block key -> row
        self._big: dict[int, int] = {}      # inode -> count, where the slot says APART
        self._opens: dict[int, int] = {}

    def lookups(self, ino: int) -> int:
        """The kernel's lookup count of `ino`."""
        row = self._rows.get(ino // BLOCK_INOS)
        if row is None:
            return 0
        count = self._slots[row * STEP + ino % BLOCK_INOS]
        return count if count != APART else self._big[ino]

    def opens(self, ino: int) -> int:
        """How many opens of `ino` are not released yet."""
        return self._opens.get(ino, 0)

    def held(self, ino: int) -> bool:
        """Whether the kernel holds `ino` at all (a lookup or an open)."""
        return ino in self._opens or self.lookups(ino) > 0

    def add_lookups(self, ino: int, n: int) -> None:
        """The kernel took `n` more lookup references to `ino`."""
        key, slot = divmod(ino, BLOCK_INOS)
        row = self._rows.get(key)
        slots = self._slots
        if row is None:
            row = self._rows[key] = len(self._keys)
            self._keys.append(key)
            slots.extend(_ZERO_BLOCK)
        i = row * STEP + slot
        count = slots[i]
        if count == APART:
            count = self._big[ino]
        elif not count:
            slots[i - slot + _LIVE] += 1
        if count + n < APART:       # the usual case, without a call
            slots[i] = count + n
        else:
            self._set(ino, i, count + n)

    def drop_lookups(self, ino: int, n: int) -> None:
        """The kernel dropped `n` lookup references to `ino` (never below zero)."""
        key, slot = divmod(ino, BLOCK_INOS)
        row = self._rows.get(key)
        if row is None:
            return
        slots, i = self._slots, row * STEP + slot
        count = slots[i]
        if count == APART:
            count = self._big[ino]
        if count > n:
            self._set(ino, i, count - n)
        elif count:
            if slots[i] == APART:
                del self._big[ino]
            slots[i] = 0
            live = i - slot + _LIVE
            slots[live] -= 1
            if not slots[live]:
                self._remove(key, row)

    def _set(self, ino: int, i: int, count: int) -> None:
        if count < APART:
            if self._slots[i] == APART:
                del self._big[ino]
            self._slots[i] = count
        else:
            self._slots[i] = APART
            self._big[ino] = count

    def _remove(self, key: int, row: int) -> None:
        # The last row moves into the freed one: the rows stay dense, so the table is
        # copied whole at a handover and its memory shrinks as blocks go.
        last = len(self._keys) - 1
        if row != last:
            moved = self._keys[last]
            self._keys[row] = moved
            self._slots[row * STEP:(row + 1) * STEP] = self._slots[last * STEP:]
            self._rows[moved] = row
        del self._keys[last], self._slots[last * STEP:], self._rows[key]
        if not self._rows:
            # The dict and the keys (shortened one at a time) keep their peak size:
            # give it back when the kernel holds nothing.
            self._keys, self._slots, self._rows = array("Q"), array(_SLOT), {}

    def open(self, ino: int) -> None:
        """Count an open of `ino`."""
        self._opens[ino] = self._opens.get(ino, 0) + 1

    def release(self, ino: int) -> None:
        """Count a release of an open of `ino` (never below zero)."""
        count = self._opens.get(ino, 0)
        if count > 1:
            self._opens[ino] = count - 1
        else:
            self._opens.pop(ino, None)

    def open_counts(self) -> dict[int, int]:
        """Open counts per inode with files open."""
        return dict(self._opens)

    def packed(self) -> PackedLookups:
        """The lookup counts in the form a handover carries them (`PackedLookups`):
        copies of the flat arrays, nothing per inode in Python."""
        slots = np.frombuffer(self._slots, np.uint16).reshape(-1, STEP)
        n = len(self._big)
        return PackedLookups(np.array(self._keys, np.uint64), slots[:, :BLOCK_INOS].copy(),
                             np.fromiter(self._big.keys(), np.uint64, n),
                             np.fromiter(self._big.values(), np.uint64, n))

    @classmethod
    def restored(cls, lookups: PackedLookups, opens: dict[int, int]) -> KernelRefs:
        """A table from what `packed` and `open_counts` returned, checked by the caller
        (`PackedLookups` says how: a key listed twice or a count kept apart but not
        listed would corrupt the table). Costs a few array copies and a dict entry per
        block."""
        refs = cls()
        n = len(lookups.keys)
        refs._keys.frombytes(np.ascontiguousarray(lookups.keys, "<u8").tobytes())
        refs._slots = _ZERO_SLOT * (STEP * n)      # one allocation, no copy
        # A view of the new array: it must not outlive this call (the array cannot
        # grow while a view of it exists).
        slots = np.frombuffer(refs._slots, np.uint16).reshape(n, STEP)
        slots[:, :BLOCK_INOS] = lookups.slots
        slots[:, _LIVE] = lookups.live
        del slots
        refs._rows = dict(zip(refs._keys.tolist(), range(n)))
        refs._big = dict(zip(lookups.inos.tolist(), lookups.counts.tolist()))
        refs._opens = dict(opens)
        return refs

    def clear(self) -> None:
        """Forget every reference: the mount ended."""
        self._slots = array(_SLOT)
        self._keys = array("Q")
        self._rows.clear()
        self._big.clear()
        self._opens.clear()


#: Inode numbers per mask of an `InodeSet`.
SET_INOS = 64


class InodeSet:
    """A set of inode numbers, as a 64-bit mask per block of `SET_INOS` consecutive
    numbers that holds any: an eighth of a byte per member in a tree taken whole, and
    copied to and from arrays with a dict entry per block."""

    __slots__ = ("_masks",)

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}

    def add(self, ino: int) -> None:
        """Add `ino`."""
        key, bit = divmod(ino, SET_INOS)
        self._masks[key] = self._masks.get(key, 0) | (1 << bit)

    def discard(self, ino: int) -> None:
        """Remove `ino` if it is a member."""
        key, bit = divmod(ino, SET_INOS)
        mask = self._masks.get(key, 0) & ~(1 << bit)
        if mask:
            self._masks[key] = mask
        else:
            self._masks.pop(key, None)

    def __contains__(self, ino: object) -> bool:
        if not isinstance(ino, int):
            return False
        key, bit = divmod(ino, SET_INOS)
        return bool(self._masks.get(key, 0) >> bit & 1)

    def __len__(self) -> int:
        return sum(mask.bit_count() for mask in self._masks.values())

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(block keys, masks) as u64 arrays, in the same order: bit b of a mask is
        inode key × `SET_INOS` + b."""
        n = len(self._masks)
        return (np.fromiter(self._masks.keys(), np.uint64, n),
                np.fromiter(self._masks.values(), np.uint64, n))

    @classmethod
    def from_masks(cls, keys: np.ndarray, masks: np.ndarray) -> InodeSet:
        """The set `masks` returned (checked by the caller: no key twice, no empty
        mask)."""
        out = cls()
        out._masks = dict(zip(keys.tolist(), masks.tolist()))
        return out

    @classmethod
    def of(cls, inos: Iterable[int]) -> InodeSet:
        """The set of the inode numbers `inos`."""
        out = cls()
        for ino in inos:
            out.add(ino)
        return out
