"""The arena: one file that stands for the machine's physical memory.

The file is ``mmap``ed ``MAP_SHARED``, so what one "kernel" (process) writes is what the
next one finds, exactly as RAM outlives a kernel across kexec. It is created sparse
(``ftruncate``), so untouched pages cost nothing in ``/dev/shm``. A page frame number
(PFN) is ``offset // PAGE_SIZE``; a physical address is a byte offset into the file.

NUMA: the arena is split into ``nodes`` equal nodes. Node boundaries are rounded down to
a multiple of the largest buddy block (``MAX_ORDER_PAGES``), so a buddy block never
straddles two nodes; the last node takes the remainder.

Views are ``memoryview`` slices of the mapping (and a numpy array over all of it): no
copy is ever made. This class knows nothing about the header, locking or machines; see
:mod:`kho_backend.machine` for those.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import ArenaError
from .units import MAX_ORDER_PAGES, PAGE_SHIFT, PAGE_SIZE, format_size

log = logging.getLogger(__name__)

#: Most NUMA nodes a machine can have (bounded by the scratch table in the header).
MAX_NODES = 64
#: madvise(2) advice that populates page tables for writing (Python names it from 3.12 on).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: Smallest node: one block of the largest order (4 MiB).
MIN_NODE_PAGES = MAX_ORDER_PAGES


class PhysMemory(Protocol):
    """What the handover readers need of an arena (``Arena`` has it; so do the read-only
    view of ``guestfs kho dump`` and the tests' bytearrays)."""

    npages: int

    def view(self, pfn: int, npages: int = 1) -> memoryview: ...


def node_starts(npages: int, nodes: int) -> list[int]:
    """First PFN of every node, plus ``npages`` at the end (``nodes + 1`` entries)."""
    starts = [(npages * n // nodes) // MAX_ORDER_PAGES * MAX_ORDER_PAGES for n in range(nodes)]
    return starts + [npages]


def check_geometry(size: int, nodes: int) -> None:
    """Raise ArenaError unless ``size`` bytes split into ``nodes`` usable nodes."""
    if not 1 <= nodes <= MAX_NODES:
        raise ArenaError(f"A machine has 1 to {MAX_NODES} NUMA nodes, not {nodes}.")
    if size % PAGE_SIZE:
        raise ArenaError(
            f"The arena size {size} is not a multiple of the page size ({PAGE_SIZE})."
        )
    minimum = nodes * MIN_NODE_PAGES * PAGE_SIZE
    if size < minimum:
        raise ArenaError(
            f"An arena of {format_size(size)} is too small for {nodes} node(s); "
            f"it needs at least {format_size(minimum)} ({format_size(MIN_NODE_PAGES * PAGE_SIZE)} "
            "per node)."
        )


@dataclass
class _Kept:
    """A mapping an arena left for the next kernel booted in this process."""

    dev: int
    ino: int
    size: int
    mm: mmap.mmap


#: At most one, taken by the next Arena of the same file in this process; any other
#: Arena unmaps it first, and destroy_machine drops it.
_kept: _Kept | None = None


def drop_kept_mapping() -> None:
    """Unmap the mapping an arena kept for a next kernel, if any."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        try:
            kept.mm.close()
        except BufferError:     # views of it still referenced: unmapped when they go
            pass


def _mapping(fd: int, size: int) -> mmap.mmap:
    """The kept mapping if it is of this very file and size, else a new one."""
    global _kept
    st = os.fstat(fd)
    kept = _kept
    if kept is not None and (kept.dev, kept.ino, kept.size) == (st.st_dev, st.st_ino, size):
        _kept = None
        return kept.mm
    drop_kept_mapping()
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


class Arena:
    """The mapped arena file. Build it with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, fd: int, nodes: int = 1) -> None:
        """Map the already-open file ``fd`` (read-write); the Arena owns ``fd`` from now on."""
        self.path = Path(path)
        self.fd = fd
        self.size = os.fstat(fd).st_size
        check_geometry(self.size, nodes)
        self.npages = self.size >> PAGE_SHIFT
        self.nodes = nodes
        self._starts = node_starts(self.npages, nodes)
        self._mm = _mapping(fd, self.size)
        self._mv = memoryview(self._mm)
        self._array = np.frombuffer(self._mm, dtype=np.uint8)
        self.closed = False

    @classmethod
    def create(cls, path: Path, size: int, nodes: int = 1) -> Arena:
        """Create a new sparse arena file (mode 0600); ArenaError if it already exists."""
        check_geometry(size, nodes)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
        except OSError as e:
            raise ArenaError(f"Cannot create the arena {path}: {e.strerror}.") from e
        try:
            os.ftruncate(fd, size)
            return cls(path, fd, nodes)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise

    @classmethod
    def open(cls, path: Path, nodes: int = 1) -> Arena:
        """Map an existing arena file read-write (no header check; see machine.py)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise ArenaError(f"Cannot open the arena {path}: {e.strerror}.") from e
        try:
            return cls(path, fd, nodes)
        except BaseException:
            os.close(fd)
            raise

    # -- views -------------------------------------------------------------------

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        """Writable view of ``npages`` pages starting at ``pfn`` (no copy)."""
        if pfn < 0 or npages < 0 or pfn + npages > self.npages:
            raise ArenaError(
                f"Pages [{pfn}, {pfn + npages}) lie outside the arena of {self.npages} pages."
            )
        return self._mv[pfn << PAGE_SHIFT : (pfn + npages) << PAGE_SHIFT]

    def prefault(self, pfn: int, npages: int) -> None:
        """Map ``npages`` pages from ``pfn`` into this process for writing in one call
        (``MADV_POPULATE_WRITE``, Linux 5.14): half the cost of taking a page fault on
        each first store. A kernel without it just leaves them to fault."""
        try:
            self._mm.madvise(_MADV_POPULATE_WRITE, pfn << PAGE_SHIFT, npages << PAGE_SHIFT)
        except OSError:
            pass

    def phys_view(self, phys: int, length: int) -> memoryview:
        """Writable view of ``length`` bytes at physical address ``phys`` (bounds-checked)."""
        if phys < 0 or length < 0 or phys + length > self.size:
            raise ArenaError(
                f"The physical range [{phys:#x}, {phys + length:#x}) lies outside the "
                f"arena of {self.size:#x} bytes."
            )
        return self._mv[phys : phys + length]

    def array(self) -> np.ndarray:
        """The whole arena as a writable numpy ``uint8`` array (no copy), for bulk work."""
        return self._array

    # -- NUMA layout -----------------------------------------------------------------

    def node_of(self, pfn: int) -> int:
        """Node that holds ``pfn``."""
        if not 0 <= pfn < self.npages:
            raise ArenaError(f"PFN {pfn} lies outside the arena of {self.npages} pages.")
        node = 0
        while pfn >= self._starts[node + 1]:
            node += 1
        return node

    def nodes_of(self, pfns: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`node_of` (no bounds check)."""
        return np.searchsorted(np.asarray(self._starts[1:-1]), pfns, side="right")

    def node_range(self, node: int) -> tuple[int, int]:
        """``[start_pfn, end_pfn)`` of ``node``."""
        if not 0 <= node < self.nodes:
            raise ArenaError(f"Node {node} does not exist; this machine has {self.nodes} node(s).")
        return self._starts[node], self._starts[node + 1]

    def node_ranges(self) -> list[tuple[int, int]]:
        """``[start_pfn, end_pfn)`` of every node, in order."""
        return [self.node_range(n) for n in range(self.nodes)]

    # -- life cycle --------------------------------------------------------------------

    def flush(self) -> None:
        """msync the mapping (cheap on tmpfs; matters if the arena is on a real disk)."""
        if not self.closed:
            self._mm.flush()

    def close(self, *, keep_mapping: bool = False) -> None:
        """Unmap and close; also drops any flock held on the file (the machine lock).

        ``keep_mapping``: leave the mapping to the next Arena of this file in this
        process (a kexec whose next kernel boots in the same process): its page tables
        are the emulator's, not the machine's, like the direct map a real kernel sets up
        with huge pages at boot, so the next kernel does not page-fault on every page it
        touches first. Anything else mapped next unmaps it.

        The lock is dropped explicitly because the mapping may outlive this call: while
        numpy arrays or memoryviews made from the arena are still referenced, Python
        cannot unmap it, and the mapping keeps the open file (and so an flock) alive.
        The mapping then goes away with the last such reference.
        """
        if self.closed:
            return
        self.closed = True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        del self._array
        self._mv.release()
        if keep_mapping:
            global _kept
            drop_kept_mapping()
            st = os.fstat(self.fd)
            _kept = _Kept(st.st_dev, st.st_ino, self.size, self._mm)
            os.close(self.fd)
            return
        try:
            self._mm.close()
        except BufferError:
            log.debug("arena %s: views still referenced; unmapping when they go", self.path)
        os.close(self.fd)

    def detached(self) -> str | None:
        """Why the arena's path no longer leads to this mapped file (deleted, replaced
        or truncated while in use), or None. A handover written then reaches no next
        kernel: it boots from the path."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError as e:
            return f"the arena {self.path} was deleted" if e.errno == errno.ENOENT else \
                f"the arena {self.path} cannot be reached: {e.strerror}"
        own = os.fstat(self.fd)
        if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino):
            return f"the arena {self.path} was replaced by another file"
        if own.st_size < self.size:
            return f"the arena {self.path} was truncated to {own.st_size} bytes"
        return None

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Arena({str(self.path)!r}, {format_size(self.size)}, nodes={self.nodes})"
