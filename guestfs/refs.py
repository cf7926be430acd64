"""The kernel's references to the inodes of one mount: lookup counts and open counts.

The kernel holds a lookup reference on every inode in its inode cache, so after a walk
of the tree it holds one on every inode: a Python object per inode would make the
daemon's memory grow with the tree. Lookup counts therefore live in blocks of
`BLOCK_INOS` consecutive inode numbers, one unsigned 64-bit count each (the kernel's own
counter is 64-bit). Inode numbers are handed out in order and never reused, so inodes
made together share blocks: a tree the kernel holds whole costs about 13 bytes per
inode. A block goes as soon as none of its inodes is held, so the numbers of inodes long
deleted cost nothing; the dearest case, one held inode per block, is about 400 bytes.

Open counts are a plain dict: few files are open at once, next to the inodes the kernel
merely caches.

The table belongs to the kernel's mount, not to the filesystem in the arena: a
`Filesystem` that replaces another in the same process over the same mount (an
in-process re-boot) adopts its table (`Filesystem.adopt_kernel_refs`).
"""

from __future__ import annotations

from array import array

#: Inode numbers per block of lookup counts.
BLOCK_INOS = 32
#: The last slot of a block counts its non-zero slots, so that an empty block is freed
#: without a scan.
_LIVE = BLOCK_INOS
_ZERO_BLOCK = array("Q", bytes(8 * (BLOCK_INOS + 1)))


class KernelRefs:
    """Lookup and open counts per inode of one kernel mount (see the module docstring)."""

    __slots__ = ("_blocks", "_opens")

    def __init__(self) -> None:
        self._blocks: dict[int, array | memoryview] = {}
        self._opens: dict[int, int] = {}

    def lookups(self, ino: int) -> int:
        """The kernel's lookup count of `ino`."""
        block = self._blocks.get(ino // BLOCK_INOS)
        return 0 if block is None else block[ino % BLOCK_INOS]

    def opens(self, ino: int) -> int:
        """How many opens of `ino` are not released yet."""
        return self._opens.get(ino, 0)

    def held(self, ino: int) -> bool:
        """Whether the kernel holds `ino` at all (a lookup or an open)."""
        return ino in self._opens or self.lookups(ino) > 0

    def add_lookups(self, ino: int, n: int) -> None:
        """The kernel took `n` more lookup references to `ino`."""
        key, slot = divmod(ino, BLOCK_INOS)
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = array("Q", _ZERO_BLOCK)
        if not block[slot]:
            block[_LIVE] += 1
        block[slot] += n

    def drop_lookups(self, ino: int, n: int) -> None:
        """The kernel dropped `n` lookup references to `ino` (never below zero)."""
        key, slot = divmod(ino, BLOCK_INOS)
        block = self._blocks.get(key)
        if block is None or not block[slot]:
            return
        block[slot] = max(block[slot] - n, 0)
        if not block[slot]:
            block[_LIVE] -= 1
            if not block[_LIVE]:
                del self._blocks[key]

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

    def raw_blocks(self) -> tuple[list[int], bytes]:
        """The block keys (inode number // `BLOCK_INOS`) and the blocks themselves, raw
        and in the same order: per block `BLOCK_INOS` u64 counts, then its live count."""
        return list(self._blocks), b"".join(self._blocks.values())

    def open_counts(self) -> dict[int, int]:
        """Open counts per inode with files open."""
        return dict(self._opens)

    @classmethod
    def restored(cls, keys: list[int], raw: bytes, opens: dict[int, int]) -> KernelRefs:
        """A table from what `raw_blocks` and `open_counts` returned (checked by the
        caller: a live count that disagrees with its block would leak it). The blocks
        are views into one copy of `raw` (they index like the `array` blocks made later),
        so adopting a whole tree's counts costs no Python object per block but a view."""
        refs = cls()
        slots = memoryview(bytearray(raw)).cast("Q")
        step = BLOCK_INOS + 1
        refs._blocks = {key: slots[i * step:(i + 1) * step] for i, key in enumerate(keys)}
        refs._opens = dict(opens)
        return refs

    def clear(self) -> None:
        """Forget every reference: the mount ended."""
        self._blocks.clear()
        self._opens.clear()
