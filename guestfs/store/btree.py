"""A B+tree of u64 keys to short byte values, one page per node (docs/handover-abi.md,
"B+tree").

Directories keep their entries in one (keyed by the entry's cookie), the superblock
its orphan list. Nodes change in place under a `Txn`. An insert that does not fit a
node splits it (and its parents as needed); a delete that empties a leaf frees it (but
a root leaf its owner asks to keep, which stays as an empty leaf), and a root left with
one child is replaced by it. There is no merging of half-empty nodes:
keys of directories are hashes, spread evenly, so leaves stay reasonably full.

    every node: page header (magic GBT2, crc32, owner), then
      16  u8 level (0: a leaf), u8 zero, u16 nkeys, u16 heap, u16 zero
      24  u64 keys[nkeys], ascending
    a leaf (up to 128 keys):
      1048  u16 value offsets[nkeys] (into the page)
      heap: the values, from `heap` up to the end of the page, each u16 length + bytes
    an inner node (up to 254 keys): child i holds the keys k with
          keys[i-1] <= k < keys[i]
      2056  u64 child PFNs[nkeys + 1]
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from guestfs.store.journal import Txn
from guestfs.store.page import HEADER_SIZE, CorruptPage, Kind, Pages
from kho_backend.units import PAGE_SIZE

NODE = struct.Struct("<BBHHH")
KEYS_OFFSET = HEADER_SIZE + 8
LEAF_KEYS = 128
INNER_KEYS = 254
OFFSETS_OFFSET = KEYS_OFFSET + 8 * LEAF_KEYS           # 1048
HEAP_FLOOR = OFFSETS_OFFSET + 2 * LEAF_KEYS            # 1304
CHILDREN_OFFSET = KEYS_OFFSET + 8 * INNER_KEYS         # 2056
LENGTH = struct.Struct("<H")
U64 = struct.Struct("<Q")
#: The largest value a leaf takes (so that any two values fit one leaf).
MAX_VALUE = (PAGE_SIZE - HEAP_FLOOR) // 2 - LENGTH.size
MAX_DEPTH = 16
assert CHILDREN_OFFSET + 8 * (INNER_KEYS + 1) == PAGE_SIZE


@dataclass
class _Node:
    """A node read into Python: small enough to rebuild wholesale on change."""

    pfn: int
    level: int
    keys: list[int]
    values: list[bytes]        # a leaf's
    children: list[int]        # an inner node's


class BTree:
    """Reads and changes the B+trees of one owner (changes go through a `Txn`); a tree
    is its root PFN, 0 when empty."""

    def __init__(self, pages: Pages, owner: int) -> None:
        self.pages = pages
        self.owner = owner

    # --- reading ---------------------------------------------------------------------

    def get(self, root: int, key: int) -> bytes | None:
        """The value of `key`, or None."""
        if not root:
            return None
        leaf = self._leaf_for(root, key)
        view = self._read(leaf)
        keys = _keys(view)
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return _value(view, i)
        return None

    def range(self, root: int, lo: int, hi: int) -> list[tuple[int, bytes]]:
        """(key, value) of the keys in [lo, hi), in order."""
        if not root:
            return []
        view = self._read(self._leaf_for(root, lo))
        keys = _keys(view)
        i = bisect.bisect_left(keys, lo)
        j = bisect.bisect_left(keys, hi, i)
        out = [(keys[k], _value(view, k)) for k in range(i, j)]
        if j == len(keys):              # the range may go on in the next leaf
            bound = self._upper_bound(root, lo)
            if bound is not None and bound < hi:
                out.extend(self.range(root, bound, hi))
        return out

    def after(self, root_of: Callable[[], int], key: int) -> Iterator[tuple[int, bytes]]:
        """(key, value) of every key above `key`, in order. Each leaf is found afresh
        from the tree's current root (`root_of()`), so the tree may change between two
        items: keys added or removed meanwhile are seen or not, but none is returned
        twice, and the walk ends."""
        while root := root_of():
            leaf = self._leaf_for(root, key + 1)
            view = self._read(leaf)
            keys = _keys(view)
            i = bisect.bisect_right(keys, key)
            items = [(keys[j], _value(view, j)) for j in range(i, len(keys))]
            bound = self._upper_bound(root, key + 1)
            for item in items:
                yield item
                key = item[0]
            if bound is None:
                return
            key = max(key, bound - 1)

    def count(self, root: int) -> int:
        """How many keys the tree holds (walks every leaf)."""
        return sum(1 for _ in self.after(lambda: root, -1))

    def nodes(self, root: int) -> Iterator[int]:
        """Every node page (for the full check)."""
        if not root:
            return
        yield root
        view = self._read(root)
        if view[HEADER_SIZE]:
            nkeys = LENGTH.unpack_from(view, HEADER_SIZE + 2)[0]
            for child in struct.unpack_from(f"<{nkeys + 1}Q", view, CHILDREN_OFFSET):
                yield from self.nodes(child)

    # --- changing --------------------------------------------------------------------

    def insert(self, txn: Txn, root: int, key: int, value: bytes) -> int:
        """Add `key` (KeyError if it is there); returns the root afterwards."""
        _check_value(value)
        if not root:
            root = txn.new_page(Kind.BTREE, self.owner)
            self._write(txn, _Node(root, 0, [key], [bytes(value)], []))
            return root
        leaf = self._leaf_for(root, key)
        view = self._read(leaf)
        keys = _keys(view)
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            raise KeyError(key)
        if _insert_in_place(txn.write(leaf, Kind.BTREE), i, key, value):
            return root
        path = self._path(root, key)
        path[-1].keys.insert(i, key)
        path[-1].values.insert(i, bytes(value))
        return self._store(txn, root, path)

    def replace(self, txn: Txn, root: int, key: int, value: bytes) -> int:
        """Change the value of `key` (KeyError if it is absent); returns the root."""
        _check_value(value)
        leaf, i = self._slot(root, key)
        view = txn.write(leaf, Kind.BTREE)
        _delete_in_place(view, i)
        if _insert_in_place(view, i, key, value):
            return root
        path = self._path(root, key)
        path[-1].keys.insert(i, key)
        path[-1].values.insert(i, bytes(value))
        return self._store(txn, root, path)

    def delete(self, txn: Txn, root: int, key: int, *, keep_root: bool = False) -> int:
        """Remove `key` (KeyError if it is absent); returns the root (0: now empty).
        With `keep_root`, a root leaf left empty stays (the root is unchanged): a tree
        that empties and fills again all the time (the orphan list) then allocates and
        frees no page, and its owner's pointer to it never changes."""
        leaf, i = self._slot(root, key)
        view = txn.write(leaf, Kind.BTREE)
        if LENGTH.unpack_from(view, HEADER_SIZE + 2)[0] > 1 or (keep_root and leaf == root):
            _delete_in_place(view, i)
            return root
        path = self._path(root, key)
        del path[-1].keys[i]
        del path[-1].values[i]
        return self._remove_empty(txn, root, path)

    def free_all(self, txn: Txn, root: int) -> None:
        """Free every node of the tree."""
        for pfn in list(self.nodes(root)):
            txn.free(pfn)

    # --- internals: reading nodes -----------------------------------------------------

    def _read(self, pfn: int) -> memoryview:
        return self.pages.read(pfn, Kind.BTREE)

    def _node(self, pfn: int) -> _Node:
        view = self._read(pfn)
        level, _, nkeys, _heap, _ = NODE.unpack_from(view, HEADER_SIZE)
        limit = LEAF_KEYS if level == 0 else INNER_KEYS
        if nkeys > limit or level > MAX_DEPTH:
            raise CorruptPage(pfn, f"a B+tree node of level {level} claims {nkeys} keys")
        keys = list(_keys(view))
        if level == 0:
            return _Node(pfn, 0, keys, [_value(view, i) for i in range(nkeys)], [])
        children = list(struct.unpack_from(f"<{nkeys + 1}Q", view, CHILDREN_OFFSET))
        return _Node(pfn, level, keys, [], children)

    def _slot(self, root: int, key: int) -> tuple[int, int]:
        """(leaf, index) of `key`; KeyError if the tree does not hold it."""
        if not root:
            raise KeyError(key)
        leaf = self._leaf_for(root, key)
        keys = _keys(self._read(leaf))
        i = bisect.bisect_left(keys, key)
        if i >= len(keys) or keys[i] != key:
            raise KeyError(key)
        return leaf, i

    def _leaf_for(self, root: int, key: int) -> int:
        pfn = root
        for _ in range(MAX_DEPTH + 1):
            view = self._read(pfn)
            level, _, nkeys, _heap, _ = NODE.unpack_from(view, HEADER_SIZE)
            if level == 0:
                return pfn
            i = bisect.bisect_right(_keys(view), key)
            pfn = U64.unpack_from(view, CHILDREN_OFFSET + 8 * i)[0]
        raise CorruptPage(root, "a B+tree is deeper than any this filesystem makes")

    def _upper_bound(self, root: int, key: int) -> int | None:
        """The smallest separator above `key` on its path: where the next leaf starts
        (None if `key`'s leaf is the last)."""
        bound = None
        pfn = root
        for _ in range(MAX_DEPTH + 1):
            view = self._read(pfn)
            level = view[HEADER_SIZE]
            if level == 0:
                return bound
            keys = _keys(view)
            i = bisect.bisect_right(keys, key)
            if i < len(keys):
                bound = keys[i]
            pfn = U64.unpack_from(view, CHILDREN_OFFSET + 8 * i)[0]
        raise CorruptPage(root, "a B+tree is deeper than any this filesystem makes")

    def _path(self, root: int, key: int) -> list[_Node]:
        path = [self._node(root)]
        while path[-1].level:
            node = path[-1]
            if len(path) > MAX_DEPTH:
                raise CorruptPage(root, "a B+tree is deeper than any this filesystem makes")
            path.append(self._node(node.children[bisect.bisect_right(node.keys, key)]))
        return path

    # --- internals: writing nodes -----------------------------------------------------

    def _store(self, txn: Txn, root: int, path: list[_Node]) -> int:
        """Write the changed last node of `path`, splitting up the path as needed."""
        node = path[-1]
        depth = len(path) - 1
        while not _fits(node):
            left, sep, right = _split(node)
            right.pfn = txn.new_page(Kind.BTREE, self.owner)
            self._write(txn, left)
            self._write(txn, right)
            if depth == 0:
                new_root = txn.new_page(Kind.BTREE, self.owner)
                self._write(txn, _Node(new_root, node.level + 1, [sep], [],
                                       [left.pfn, right.pfn]))
                return new_root
            depth -= 1
            parent = path[depth]
            i = parent.children.index(node.pfn)
            parent.keys.insert(i, sep)
            parent.children.insert(i + 1, right.pfn)
            node = parent
        self._write(txn, node)
        return root

    def _remove_empty(self, txn: Txn, root: int, path: list[_Node]) -> int:
        """The last node of `path` is empty: free it and unlink it upwards."""
        depth = len(path) - 1
        while True:
            node = path[depth]
            txn.free(node.pfn)
            if depth == 0:
                return 0
            parent = path[depth - 1]
            i = parent.children.index(node.pfn)
            del parent.children[i]
            del parent.keys[max(i - 1, 0):max(i, 1)]
            if parent.children:
                break
            depth -= 1
        if depth - 1 == 0 and len(parent.children) == 1:
            txn.free(parent.pfn)             # a root with one child: the child is the root
            return parent.children[0]
        self._write(txn, parent)
        return root

    def _write(self, txn: Txn, node: _Node) -> None:
        assert _fits(node), "a B+tree node was written that does not fit its page"
        view = txn.write(node.pfn, Kind.BTREE)
        view[HEADER_SIZE:] = bytes(PAGE_SIZE - HEADER_SIZE)
        n = len(node.keys)
        heap = PAGE_SIZE
        if node.level == 0:
            offsets = []
            for value in node.values:
                heap -= LENGTH.size + len(value)
                LENGTH.pack_into(view, heap, len(value))
                view[heap + LENGTH.size:heap + LENGTH.size + len(value)] = value
                offsets.append(heap)
            struct.pack_into(f"<{n}H", view, OFFSETS_OFFSET, *offsets)
        else:
            struct.pack_into(f"<{n + 1}Q", view, CHILDREN_OFFSET, *node.children)
        struct.pack_into(f"<{n}Q", view, KEYS_OFFSET, *node.keys)
        NODE.pack_into(view, HEADER_SIZE, node.level, 0, n, heap, 0)


def _insert_in_place(view: memoryview, i: int, key: int, value: bytes) -> bool:
    """Put (key, value) at index i of a leaf without rewriting it, if the leaf has a
    free key slot and room in its heap; False (nothing changed) if not."""
    _, _, nkeys, heap, _ = NODE.unpack_from(view, HEADER_SIZE)
    need = LENGTH.size + len(value)
    if nkeys >= LEAF_KEYS or heap - need < HEAP_FLOOR:
        return False
    heap -= need
    LENGTH.pack_into(view, heap, len(value))
    view[heap + LENGTH.size:heap + need] = value
    k0, o0 = KEYS_OFFSET + 8 * i, OFFSETS_OFFSET + 2 * i
    view[k0 + 8:KEYS_OFFSET + 8 * (nkeys + 1)] = view[k0:KEYS_OFFSET + 8 * nkeys]
    view[o0 + 2:OFFSETS_OFFSET + 2 * (nkeys + 1)] = view[o0:OFFSETS_OFFSET + 2 * nkeys]
    U64.pack_into(view, k0, key)
    LENGTH.pack_into(view, o0, heap)
    NODE.pack_into(view, HEADER_SIZE, 0, 0, nkeys + 1, heap, 0)
    return True


def _delete_in_place(view: memoryview, i: int) -> None:
    """Drop index i of a leaf (its value's bytes stay in the heap until a rewrite)."""
    _, _, nkeys, heap, _ = NODE.unpack_from(view, HEADER_SIZE)
    k0, o0 = KEYS_OFFSET + 8 * i, OFFSETS_OFFSET + 2 * i
    view[k0:KEYS_OFFSET + 8 * (nkeys - 1)] = view[k0 + 8:KEYS_OFFSET + 8 * nkeys]
    view[o0:OFFSETS_OFFSET + 2 * (nkeys - 1)] = view[o0 + 2:OFFSETS_OFFSET + 2 * nkeys]
    view[KEYS_OFFSET + 8 * (nkeys - 1):KEYS_OFFSET + 8 * nkeys] = bytes(8)
    view[OFFSETS_OFFSET + 2 * (nkeys - 1):OFFSETS_OFFSET + 2 * nkeys] = bytes(2)
    if nkeys == 1:          # an empty leaf (a kept root): its whole heap is free again
        heap = PAGE_SIZE
    NODE.pack_into(view, HEADER_SIZE, 0, 0, nkeys - 1, heap, 0)


def _keys(view: memoryview) -> memoryview:
    nkeys = LENGTH.unpack_from(view, HEADER_SIZE + 2)[0]
    return view[KEYS_OFFSET:KEYS_OFFSET + 8 * nkeys].cast("Q")


def _value(view: memoryview, i: int) -> bytes:
    off = LENGTH.unpack_from(view, OFFSETS_OFFSET + 2 * i)[0]
    if not HEAP_FLOOR <= off <= PAGE_SIZE - LENGTH.size:
        raise CorruptPage(-1, f"a B+tree value offset {off} is outside the heap")
    length = LENGTH.unpack_from(view, off)[0]
    if off + LENGTH.size + length > PAGE_SIZE:
        raise CorruptPage(-1, f"a B+tree value of {length} bytes runs past its page")
    return bytes(view[off + LENGTH.size:off + LENGTH.size + length])


def _check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE:
        raise ValueError(f"a B+tree value of {len(value)} bytes (at most {MAX_VALUE})")


def _leaf_bytes(values: list[bytes]) -> int:
    return sum(LENGTH.size + len(v) for v in values)


def _fits(node: _Node) -> bool:
    if node.level:
        return len(node.keys) <= INNER_KEYS
    return len(node.keys) <= LEAF_KEYS and \
        _leaf_bytes(node.values) <= PAGE_SIZE - HEAP_FLOOR


def _split(node: _Node) -> tuple[_Node, int, _Node]:
    """Cut a node that does not fit in two: (left, separator, right)."""
    if node.level:
        mid = len(node.keys) // 2
        left = _Node(node.pfn, node.level, node.keys[:mid], [], node.children[:mid + 1])
        right = _Node(0, node.level, node.keys[mid + 1:], [], node.children[mid + 1:])
        return left, node.keys[mid], right
    mid = _balanced_cut([LENGTH.size + len(v) for v in node.values])
    left = _Node(node.pfn, 0, node.keys[:mid], node.values[:mid], [])
    right = _Node(0, 0, node.keys[mid:], node.values[mid:], [])
    return left, right.keys[0], right


def _balanced_cut(sizes: list[int]) -> int:
    """Where to cut a leaf's values so that the larger half is as small as it can be
    (values are at most `MAX_VALUE`, so both halves then fit a page)."""
    total = sum(sizes)
    best, best_cut, acc = total, 1, 0
    for cut in range(1, len(sizes)):
        acc += sizes[cut - 1]
        larger = max(acc, total - acc)
        if larger < best and cut <= LEAF_KEYS and len(sizes) - cut <= LEAF_KEYS:
            best, best_cut = larger, cut
    return best_cut
