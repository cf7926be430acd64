"""A radix table: u64 keys to non-zero u64 values, in pages (docs/handover-abi.md,
"Radix table").

A table of height 0 is its root value alone (the value of key 0; nothing else can be
stored). A table of height h has a root node: a page whose 510 slots cover 510**(h-1)
keys each; a slot holds a child node's PFN, or at height 1 the value itself, or 0.
Nodes that become empty are freed, so a sparse table costs only the paths it uses; the
height only grows, but a table whose root node is freed is empty, of height 0 again.
The owner keeps (root, height), e.g. in an inode record.

    node page: page header (magic GRX2, crc32, owner), then u64 slots[510]
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from guestfs.store.journal import Txn
from guestfs.store.page import HEADER_SIZE, CorruptPage, Kind, Pages

FANOUT = 510
SLOT = struct.Struct("<Q")
_EMPTY = bytes(FANOUT * SLOT.size)
MAX_HEIGHT = 8              # 510**7 > 2**63: no key needs more


@dataclass
class RadixRoot:
    """Where a table starts: its root value (height 0) or root node, and its height."""

    root: int = 0
    height: int = 0


def capacity(height: int) -> int:
    """How many keys a table of `height` covers."""
    return _CAPACITY[height] if height < len(_CAPACITY) else FANOUT ** height


_CAPACITY = tuple(FANOUT ** h for h in range(MAX_HEIGHT + 2))


class Radix:
    """Reads and changes radix tables of one owner (changes go through a `Txn`)."""

    def __init__(self, pages: Pages, owner: int) -> None:
        self.pages = pages
        self.owner = owner

    def get(self, table: RadixRoot, key: int) -> int:
        """The value of `key` (0 when there is none)."""
        height = table.height
        if key >= capacity(height):
            return 0
        node = table.root
        read, unpack = self.pages.read, SLOT.unpack_from
        for level in range(height, 0, -1):       # every file read and write walks this
            if not node:
                return 0
            node = unpack(read(node, Kind.RADIX),
                          HEADER_SIZE + (key // _CAPACITY[level - 1]) % FANOUT * 8)[0]
        return node

    def set(self, txn: Txn, table: RadixRoot, key: int, value: int) -> None:
        """Store `value` for `key` (0 removes it). `table` is updated in place."""
        if key >= capacity(table.height):
            if not value:
                return
            self._grow(txn, table, key)
        if table.height == 0:
            table.root = value
            return
        path: list[tuple[int, int]] = []        # (node, slot offset) from the root down
        node = table.root
        if not node:
            if not value:
                return
            node = table.root = txn.new_page(Kind.RADIX, self.owner)
        for level in range(table.height, 0, -1):
            off = _slot_offset(key, level)
            path.append((node, off))
            if level == 1:
                break
            child = SLOT.unpack_from(self._read(node), off)[0]
            if not child:
                if not value:
                    return
                child = txn.new_page(Kind.RADIX, self.owner)
                SLOT.pack_into(txn.write(node, Kind.RADIX), off, child)
            node = child
        leaf, off = path[-1]
        SLOT.pack_into(txn.write(leaf, Kind.RADIX), off, value)
        if not value:
            self._prune(txn, table, path)

    def items(self, table: RadixRoot, start: int = 0) -> Iterator[tuple[int, int]]:
        """(key, value) of every key from `start` that has a value, in key order. The
        table must not change while this runs."""
        if table.height == 0:
            if table.root and start == 0:
                yield 0, table.root
            return
        if table.root:
            yield from self._walk(table.root, table.height, 0, start)

    def free_all(self, txn: Txn, table: RadixRoot) -> None:
        """Free every node (not the values: the owner frees what they point at)."""
        if table.height and table.root:
            self._free_nodes(txn, table.root, table.height)
        table.root, table.height = 0, 0

    def nodes(self, table: RadixRoot) -> Iterator[int]:
        """Every node page of the table (for the full check)."""
        if table.height and table.root:
            yield from self._node_pages(table.root, table.height)

    # --- internals -------------------------------------------------------------------

    def _read(self, node: int) -> memoryview:
        return self.pages.read(node, Kind.RADIX)

    def _slots(self, node: int) -> np.ndarray:
        return np.frombuffer(self._read(node), dtype="<u8", count=FANOUT, offset=HEADER_SIZE)

    def _grow(self, txn: Txn, table: RadixRoot, key: int) -> None:
        while key >= capacity(table.height):
            if table.height >= MAX_HEIGHT:
                raise CorruptPage(table.root, f"radix key {key} is out of range")
            if table.root:
                node = txn.new_page(Kind.RADIX, self.owner)
                SLOT.pack_into(txn.write(node, Kind.RADIX), HEADER_SIZE, table.root)
                table.root = node
            table.height += 1

    def _prune(self, txn: Txn, table: RadixRoot, path: list[tuple[int, int]]) -> None:
        """Free the nodes along `path` that are empty now, from the bottom up."""
        for depth in range(len(path) - 1, -1, -1):
            node, _ = path[depth]
            if bytes(self._read(node)[HEADER_SIZE:HEADER_SIZE + len(_EMPTY)]) != _EMPTY:
                return
            txn.free(node)
            if depth == 0:
                table.root = table.height = 0      # empty: the same as a new table
            else:
                parent, off = path[depth - 1]
                SLOT.pack_into(txn.write(parent, Kind.RADIX), off, 0)

    def _walk(self, node: int, level: int, base: int, start: int
              ) -> Iterator[tuple[int, int]]:
        span = capacity(level - 1)
        slots = self._slots(node)
        for i in np.flatnonzero(slots).tolist():
            lo = base + i * span
            if lo + span <= start:
                continue
            value = int(slots[i])
            if level == 1:
                yield lo, value
            else:
                yield from self._walk(value, level - 1, lo, start)

    def _free_nodes(self, txn: Txn, node: int, level: int) -> None:
        if level > 1:
            slots = self._slots(node)
            for child in slots[slots != 0].tolist():
                self._free_nodes(txn, child, level - 1)
        txn.free(node)

    def _node_pages(self, node: int, level: int) -> Iterator[int]:
        yield node
        if level > 1:
            slots = self._slots(node)
            for i in np.flatnonzero(slots).tolist():
                yield from self._node_pages(int(slots[i]), level - 1)


def _slot_offset(key: int, level: int) -> int:
    return HEADER_SIZE + (key // capacity(level - 1)) % FANOUT * SLOT.size
