"""KHO, the outgoing side: what this kernel hands to the next one.

Subsystems preserve pages and folios (``preserve_folio``, ``preserve_pages``, or
``preserve_pfns`` in bulk), add their sub-FDTs (``add_subtree``), and register as
participants (the kernel's KHO notifiers) so that ``finalize`` asks them to serialize.
``finalize`` then writes the preserved-memory map (``khoser_mem_chunk`` pages) and the
root FDT ``compatible = "kho-v1"``; ``abort`` undoes it.  After finalize every change
is refused with KhoBusy, the kernel's ``-EBUSY``.  The layouts are in
docs/handover-abi.md.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np

from .arena import Arena
from .errors import HandoverError, KhoBusy, MachineError
from .fdt import FdtNode, FdtReader, build, u32
from .kho_mem import KhoMemTrack, kho_mem_serialize
from .memmap import Memmap
from .page_alloc import PageAllocator
from .units import MAX_ORDER, PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

KHO_COMPATIBLE = "kho-v1"
PROP_MEM_MAP = "preserved-memory-map"
PROP_FDT = "fdt"
PROP_FDT_SIZE = "fdt-size"
PROP_FDT_CRC = "fdt-crc32"
# Devicetree node names: 1 to 31 characters of this set.
_NODE_NAME = re.compile(r"[A-Za-z0-9,._+-]{1,31}")


class KhoError(MachineError, ValueError):
    """KHO refuses a preserve, unpreserve or subtree call (the kernel's ``-EINVAL``)."""


class KhoParticipant(Protocol):
    """A subsystem that hands state over (the kernel's KHO notifier)."""

    name: str

    def kho_finalize(self, kho: KHO) -> None:
        """Serialize, preserve, add_subtree.  Raising makes finalize fail and abort."""

    def kho_abort(self, kho: KHO) -> None:
        """Undo what kho_finalize did; also called after a kho_finalize that raised."""


class KhoState(Enum):
    IDLE = "idle"               # preserving allowed
    FINALIZING = "finalizing"   # participants running (or aborting): still allowed
    FINALIZED = "finalized"     # handover written; everything refused with KhoBusy


@dataclass(frozen=True, slots=True)
class Subtree:
    """A sub-FDT copied into preserved pages: a folio of ``order`` at ``pfn``."""

    name: str
    pfn: int
    order: int
    size: int
    crc32: int

    @property
    def phys(self) -> int:
        return self.pfn << PAGE_SHIFT


@dataclass
class _Handover:
    """What finalize allocated for the handover itself (freed again by abort)."""

    fdt_pfn: int = -1
    fdt_order: int = 0
    fdt_size: int = 0
    map_phys: int = 0
    chunk_pfns: list[int] = field(default_factory=list)
    added: list[str] = field(default_factory=list)   # subtrees added during finalize


def _order_for(npages: int) -> int:
    return max(0, (npages - 1).bit_length())


def split_natural(pfn: int, npages: int) -> Iterator[tuple[int, int]]:
    """(pfn, order) pieces of [pfn, pfn + npages), largest naturally aligned first.

    The same split as the kernel's ``kho_preserve_pages()`` and ``kho_restore_pages()``.
    """
    end = pfn + npages
    while pfn < end:
        align = (pfn & -pfn).bit_length() - 1 if pfn else MAX_ORDER
        order = min(align, (end - pfn).bit_length() - 1, MAX_ORDER)
        yield pfn, order
        pfn += 1 << order


class KHO:
    """The outgoing handover of one kernel (``kernel.kho``): over its arena, with the
    buddy allocator for the handover's own pages, the memmap to check that a preserved
    page is allocated, and the scratch areas, where nothing may be preserved."""

    def __init__(self, arena: Arena, buddy: PageAllocator, memmap: Memmap,
                 scratch: Sequence[tuple[int, int]]) -> None:
        self.arena = arena
        self.buddy = buddy
        self.memmap = memmap
        self.scratch = list(scratch)
        self.track = KhoMemTrack(self.arena.npages)
        self.participants: list[KhoParticipant] = []
        self.subtrees: dict[str, Subtree] = {}
        self.state = KhoState.IDLE
        #: ns of the last finalize: "serialize" (participants), "finalize" (map + FDT).
        self.timings: dict[str, int] = {}
        self._out: _Handover | None = None
        self._scratch_by_order: dict[int, np.ndarray] = {}

    @property
    def finalized(self) -> bool:
        return self.state is KhoState.FINALIZED

    @property
    def fdt(self) -> tuple[int, int] | None:
        """(phys, size) of the root FDT while finalized, else None."""
        if not self.finalized or self._out is None:
            return None
        return self._out.fdt_pfn << PAGE_SHIFT, self._out.fdt_size

    def register(self, p: KhoParticipant) -> None:
        """Add a participant; finalize calls them in registration order."""
        if any(q.name == p.name for q in self.participants):
            raise KhoError(f"a KHO participant named {p.name!r} is already registered")
        self.participants.append(p)

    def unregister(self, p: KhoParticipant) -> None:
        """Remove a participant (not while a finalize is under way or done)."""
        if self.state is not KhoState.IDLE:
            raise KhoBusy(f"KHO is {self.state.value}: cannot unregister {p.name!r}")
        self.participants.remove(p)

    # -- preserve / unpreserve ---------------------------------------------------------

    def preserve_folio(self, pfn: int, order: int) -> None:
        """Preserve the folio of ``order`` at ``pfn`` (the kernel's kho_preserve_folio)."""
        self.preserve_pfns(np.array([pfn], np.int64), order)

    def preserve_pages(self, pfn: int, n: int) -> None:
        """Preserve ``n`` pages from ``pfn``, as the largest naturally aligned folios."""
        pieces = list(split_natural(pfn, n))
        for head, order in pieces:
            self._check_preservable(np.array([head], np.int64), order)
        for head, order in pieces:
            self.track.set(np.array([head], np.int64), order)

    def preserve_pfns(self, pfns: np.ndarray, order: int) -> None:
        """Preserve many folios of one order at once; all or none.

        Refused (KhoError) for a misaligned pfn, one outside the arena, in scratch, not
        allocated, or overlapping memory already preserved; KhoBusy after finalize.
        """
        pfns = np.asarray(pfns, np.int64).ravel()
        self._check_preservable(pfns, order)
        self.track.set(pfns, order)

    def unpreserve_folio(self, pfn: int, order: int) -> None:
        self.unpreserve_pfns(np.array([pfn], np.int64), order)

    def unpreserve_pages(self, pfn: int, n: int) -> None:
        """Undo ``preserve_pages(pfn, n)``."""
        pieces = list(split_natural(pfn, n))
        for head, order in pieces:
            self._check_preserved(np.array([head], np.int64), order)
        for head, order in pieces:
            self.track.clear(np.array([head], np.int64), order)

    def unpreserve_pfns(self, pfns: np.ndarray, order: int) -> None:
        """Undo ``preserve_pfns``; each pfn must be preserved at exactly ``order``."""
        pfns = np.asarray(pfns, np.int64).ravel()
        self._check_preserved(pfns, order)
        self.track.clear(pfns, order)

    def is_preserved(self, pfn: int, order: int) -> bool:
        return bool(self.track.is_set(np.array([pfn], np.int64), order)[0])

    def _check_mutable(self, what: str) -> None:
        if self.state is KhoState.FINALIZED:
            raise KhoBusy(f"KHO is finalized: cannot {what} (abort the kexec first)")

    def _check_order(self, order: int) -> None:
        if not 0 <= order <= MAX_ORDER:
            raise KhoError(f"order {order} is not valid; orders go from 0 to {MAX_ORDER}")

    def _check_preservable(self, pfns: np.ndarray, order: int) -> None:
        self._check_mutable(f"preserve order-{order} folios")
        self._check_order(order)
        self._refuse(pfns, pfns & ((1 << order) - 1) != 0,
                     f"is not aligned to its order ({order})", order)
        self._refuse(pfns, (pfns < 0) | (pfns + (1 << order) > self.arena.npages),
                     f"is outside the arena ({self.arena.npages} pages)", order)
        self._refuse(pfns, self._in_scratch(pfns, order),
                     "lies in a scratch area, which takes only movable memory", order)
        self._refuse(pfns, ~self._allocated(pfns, order),
                     "is not allocated memory", order)
        self._refuse_duplicates(pfns, order)
        self._refuse(pfns, self.track.overlapping(pfns, order),
                     "overlaps memory that is already preserved", order)

    def _check_preserved(self, pfns: np.ndarray, order: int) -> None:
        self._check_mutable(f"unpreserve order-{order} folios")
        self._check_order(order)
        self._refuse(pfns, (pfns < 0) | (pfns + (1 << order) > self.arena.npages),
                     f"is outside the arena ({self.arena.npages} pages)", order)
        self._refuse(pfns, ~self.track.is_set(pfns, order),
                     f"is not preserved as an order-{order} folio", order)

    @staticmethod
    def _refuse(pfns: np.ndarray, bad: np.ndarray, why: str, order: int) -> None:
        hit = np.flatnonzero(bad)
        if len(hit):
            more = f" (and {len(hit) - 1} more)" if len(hit) > 1 else ""
            raise KhoError(f"cannot preserve/unpreserve the order-{order} folio at pfn "
                           f"{int(pfns[hit[0]])}: it {why}{more}")

    @staticmethod
    def _refuse_duplicates(pfns: np.ndarray, order: int) -> None:
        ordered = pfns if bool((np.diff(pfns) > 0).all()) else np.sort(pfns)
        dup = np.flatnonzero(np.diff(ordered) == 0)
        if len(dup):
            raise KhoError(f"the order-{order} folio at pfn {int(ordered[dup[0]])} is "
                           "listed twice")

    def _in_scratch(self, pfns: np.ndarray, order: int) -> np.ndarray:
        by_order = self._scratch_by_order.get(order)
        if by_order is None:
            mask = np.zeros(self.arena.npages, bool)
            for start, n in self.scratch:
                mask[start:start + n] = True
            whole = self.arena.npages >> order << order
            by_order = mask[:whole].reshape(-1, 1 << order).any(axis=1)
            self._scratch_by_order[order] = by_order
        return by_order[np.clip(pfns >> order, 0, max(len(by_order) - 1, 0))]

    def _allocated(self, pfns: np.ndarray, order: int) -> np.ndarray:
        pages = (pfns[:, None] + np.arange(1 << order)).ravel()
        ok = self.memmap.allocated_mask(np.clip(pages, 0, self.arena.npages - 1))
        return ok.reshape(len(pfns), 1 << order).all(axis=1)

    # -- subtrees ----------------------------------------------------------------------

    def add_subtree(self, name: str, fdt: bytes) -> int:
        """Copy the FDT blob ``fdt`` into new preserved pages; return their phys.

        The root FDT gets a node ``name`` whose ``fdt`` property holds that address (the
        kernel's kho_add_subtree).  The caller keeps its own copy; the next kernel reads
        it with ``kho_in.retrieve_subtree(name)``.
        """
        self._check_mutable(f"add the subtree {name!r}")
        self._check_subtree(name, fdt)
        order = _order_for(-(-len(fdt) // PAGE_SIZE))
        pfn = self.buddy.alloc(order)
        try:
            view = self.arena.view(pfn, 1 << order)
            view[:len(fdt)] = fdt
            view[len(fdt):] = bytes(len(view) - len(fdt))
            self.preserve_folio(pfn, order)
        except BaseException:
            self.buddy.free(pfn, order)
            raise
        self.subtrees[name] = Subtree(name, pfn, order, len(fdt), zlib.crc32(fdt))
        if self.state is KhoState.FINALIZING and self._out is not None:
            self._out.added.append(name)
        return pfn << PAGE_SHIFT

    def _check_subtree(self, name: str, fdt: bytes) -> None:
        if not _NODE_NAME.fullmatch(name):
            raise KhoError(f"{name!r} cannot name a KHO subtree: use 1 to 31 letters, "
                           "digits or ,._+-")
        if name in self.subtrees:
            raise KhoError(f"the KHO subtree {name!r} already exists")
        try:
            FdtReader(fdt, f"the subtree {name!r}")
        except HandoverError as e:
            raise KhoError(f"refusing to add a subtree that is not an FDT: {e}") from None

    def remove_subtree(self, name: str) -> None:
        """Drop a subtree added by ``add_subtree``: unpreserve and free its pages."""
        self._check_mutable(f"remove the subtree {name!r}")
        sub = self.subtrees.pop(name, None)
        if sub is None:
            raise KhoError(f"there is no KHO subtree {name!r}")
        self.unpreserve_folio(sub.pfn, sub.order)
        self.buddy.free(sub.pfn, sub.order)

    def update_subtree(self, name: str, fdt: bytes) -> None:
        """Rewrite a subtree in place after finalize (it must fit its pages).

        For records that change until the exec (kexec-metadata's phase timings): the
        pages stay the same, the root FDT's ``fdt-size`` and ``fdt-crc32`` are updated.
        """
        sub = self.subtrees.get(name)
        if sub is None or not self.finalized:
            raise KhoError(f"cannot update the KHO subtree {name!r}: it does not exist "
                           "or KHO is not finalized")
        view = self.arena.view(sub.pfn, 1 << sub.order)
        if len(fdt) > len(view):
            raise KhoError(f"the new {name!r} subtree ({len(fdt)} bytes) does not fit its "
                           f"{len(view)} bytes")
        view[:len(fdt)] = fdt
        view[len(fdt):] = bytes(len(view) - len(fdt))
        self.subtrees[name] = Subtree(name, sub.pfn, sub.order, len(fdt), zlib.crc32(fdt))
        self._write_root_fdt()

    # -- finalize / abort -------------------------------------------------------------

    def finalize(self) -> tuple[int, int]:
        """Serialize every participant, then write the memory map and the root FDT.

        Any failure aborts everything done so far and re-raises.  Returns (phys, size)
        of the root FDT.
        """
        if self.state is not KhoState.IDLE:
            raise KhoBusy(f"KHO is {self.state.value}: cannot finalize again")
        self.state = KhoState.FINALIZING
        self._out = _Handover()
        self.timings = {}
        started: list[KhoParticipant] = []
        t0 = time.perf_counter_ns()
        try:
            for p in self.participants:
                started.append(p)
                p.kho_finalize(self)
            t1 = time.perf_counter_ns()
            self.timings["serialize"] = t1 - t0
            self._write_handover()
            self.timings["finalize"] = time.perf_counter_ns() - t1
        except BaseException:
            log.warning("KHO finalize failed; aborting", exc_info=True)
            self._undo(started)
            raise
        self.state = KhoState.FINALIZED
        log.info("KHO finalized: %d pages preserved, %d subtrees, map of %d chunks",
                 self.track.nr_pages(), len(self.subtrees), len(self._out.chunk_pfns))
        return self._out.fdt_pfn << PAGE_SHIFT, self._out.fdt_size

    def abort(self) -> None:
        """Undo finalize: participants' kho_abort, free the map, root FDT and subtrees
        added during finalize.  Back to IDLE, where preserving works again."""
        if self.state is not KhoState.FINALIZED:
            raise KhoError(f"KHO is {self.state.value}, not finalized: nothing to abort")
        self.state = KhoState.FINALIZING
        self._undo(list(self.participants))

    def _undo(self, started: list[KhoParticipant]) -> None:
        """Undo a (partial) finalize; every step runs even if an earlier one fails."""
        out = self._out or _Handover()
        errors: list[BaseException] = []
        self._free_handover(out, errors)
        for p in reversed(started):
            try:
                p.kho_abort(self)
            except Exception as e:  # one participant must not stop the others' abort
                log.exception("KHO participant %r failed to abort", p.name)
                errors.append(e)
        for name in out.added:
            if name in self.subtrees:
                self.remove_subtree(name)
        self._out = None
        self.state = KhoState.IDLE
        if errors:
            raise errors[0]

    def _free_handover(self, out: _Handover, errors: list[BaseException]) -> None:
        try:
            for pfn in out.chunk_pfns:
                self._drop_page(pfn, 0)
            out.chunk_pfns.clear()
            if out.fdt_pfn >= 0:
                self._drop_page(out.fdt_pfn, out.fdt_order)
                out.fdt_pfn = -1
        except Exception as e:
            log.exception("KHO abort could not free the handover's pages")
            errors.append(e)

    def _drop_page(self, pfn: int, order: int) -> None:
        self.unpreserve_folio(pfn, order)
        self.buddy.free(pfn, order)

    def _alloc_preserved(self, order: int) -> int:
        pfn = self.buddy.alloc(order)
        try:
            self.preserve_folio(pfn, order)
        except BaseException:
            self.buddy.free(pfn, order)
            raise
        return pfn

    def _write_handover(self) -> None:
        """Allocate and preserve the root FDT and the chunks, then write both.

        The pages are preserved before the map is serialized so that they appear in the
        map they hold; values in the root FDT are fixed-width, so its size is known
        before the chunk addresses are.
        """
        out = self._out
        assert out is not None
        out.fdt_size = len(self._root_fdt())
        out.fdt_order = _order_for(-(-out.fdt_size // PAGE_SIZE))
        out.fdt_pfn = self._alloc_preserved(out.fdt_order)
        # Each chunk page may add a block to the order-0 map: grow until they fit.
        while len(out.chunk_pfns) < (need := self.track.chunks_needed()):
            for _ in range(need - len(out.chunk_pfns)):
                out.chunk_pfns.append(self._alloc_preserved(0))
        out.map_phys = kho_mem_serialize(self.arena, self.track, out.chunk_pfns)
        self._write_root_fdt()

    def _root_fdt(self) -> bytes:
        out = self._out
        root = FdtNode("", {"compatible": KHO_COMPATIBLE,
                            PROP_MEM_MAP: out.map_phys if out else 0})
        for sub in self.subtrees.values():
            root.child(sub.name, **{PROP_FDT: sub.phys, PROP_FDT_SIZE: sub.size,
                                    PROP_FDT_CRC: u32(sub.crc32)})
        return build(root, sealed=True)

    def _write_root_fdt(self) -> None:
        out = self._out
        assert out is not None
        blob = self._root_fdt()
        view = self.arena.view(out.fdt_pfn, 1 << out.fdt_order)
        if len(blob) != out.fdt_size:
            raise KhoError(f"the KHO root FDT changed size ({out.fdt_size} -> {len(blob)})")
        view[:len(blob)] = blob
        view[len(blob):] = bytes(len(view) - len(blob))
