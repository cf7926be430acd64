"""KHO, the outgoing side: what this kernel hands to the next one (stateless KHO).

Subsystems preserve pages and folios (``preserve_folio``, ``preserve_pages``, or
``preserve_pfns`` in bulk), add their sub-FDTs (``add_subtree``), ask for memory that is
preserved from allocation (``create_pool``), and register as participants (the kernel's
KHO notifiers) so that ``finalize`` asks them for their last state.

Nothing is serialized at a kexec. The preserved-memory map is a radix tree kept current
in the arena (``kho_radix``); the root FDT (``compatible = "kho-v3"``) is written at boot
and rewritten, copy on write, whenever a subtree or a pool comes or goes, and the
machine header always says where the live one is. ``finalize`` runs the participants and
writes the root once more; a kernel that dies without handing over leaves a live root
that the next boot takes up (a crash boot). After finalize, preserving and changing
subtrees or pools is refused with KhoBusy (the kernel's ``-EBUSY``) until ``abort``;
pools keep allocating and freeing. The layouts are in docs/handover-abi.md.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

import numpy as np

from .arena import Arena
from .errors import HandoverError, KhoBusy, KhoError
from .fdt import FdtNode, FdtReader, build, u32
from .header import MachineHeader
from .kho_pool import PreservedPool
from .kho_radix import RadixMap, RadixTree
from .memmap import Memmap, blocks_mask, has_duplicates
from .page_alloc import PageAllocator
from .units import MAX_ORDER, PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

KHO_COMPATIBLE = "kho-v3"
PROP_MEM_MAP = "preserved-memory-map"
PROP_DATA = "preserved-data"
PROP_BLOB_SIZE = "blob-size"
PROP_BLOB_CRC = "blob-crc32"
#: The root node that lists the pools, one child each.
POOLS_NODE = "pools"
POOL_COMPATIBLE = "kho-pool-v1"
# Devicetree node names: 1 to 31 characters of this set.
_NODE_NAME = re.compile(r"[A-Za-z0-9,._+-]{1,31}")

__all__ = ["KHO", "KhoError", "KhoParticipant", "KhoState", "Subtree", "split_natural"]


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
    FINALIZED = "finalized"     # handover written; preserving refused with KhoBusy


@dataclass(frozen=True, slots=True)
class Folio:
    """A folio of ``order`` at ``pfn`` holding a blob of ``size`` bytes."""

    pfn: int
    order: int
    size: int = 0

    @property
    def phys(self) -> int:
        return self.pfn << PAGE_SHIFT


@dataclass(frozen=True, slots=True)
class Subtree:
    """A sub-FDT copied into a preserved folio of ``order`` at ``pfn``; ``spare`` is the
    second folio that ``update_subtree`` writes into (-1 until the first update)."""

    name: str
    pfn: int
    order: int
    size: int
    crc32: int
    spare: int = -1

    @property
    def phys(self) -> int:
        return self.pfn << PAGE_SHIFT


def _order_for(nbytes: int) -> int:
    """The order of the smallest folio holding ``nbytes`` (at least one page)."""
    return max(0, (-(-nbytes // PAGE_SIZE) - 1).bit_length())


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
    buddy allocator for its own pages, the memmap to check that a preserved page is
    allocated, the scratch areas (where nothing may be preserved), and the machine
    header, where it publishes its live root.

    It allocates nothing until it is needed, so that a boot that fails before
    ``finish_boot`` (which calls :meth:`go_live`) writes nothing outside scratch.
    """

    def __init__(self, arena: Arena, buddy: PageAllocator, memmap: Memmap,
                 scratch: Sequence[tuple[int, int]], header: MachineHeader) -> None:
        self.arena = arena
        self.buddy = buddy
        self.memmap = memmap
        self.scratch = list(scratch)
        self.header = header
        #: The global preserved-memory map (the kernel's ``kho_out`` radix tree); its
        #: root page is allocated with the first block or the first root FDT.
        self.track = RadixTree(arena, buddy)
        self.pools: dict[str, PreservedPool] = {}
        self.participants: list[KhoParticipant] = []
        self.subtrees: dict[str, Subtree] = {}
        self.state = KhoState.IDLE
        #: ns of the last finalize: "serialize" (participants), "finalize" (root FDT).
        self.timings: dict[str, int] = {}
        self._root: Folio | None = None
        self._spare_root: Folio | None = None    # after finalize: the root's other folio
        self._poison: int | None = None          # set once kexec poisoned memory
        self._added: list[str] = []              # subtrees added during finalize

    @property
    def finalized(self) -> bool:
        return self.state is KhoState.FINALIZED

    @property
    def fdt(self) -> tuple[int, int] | None:
        """(phys, size) of the root FDT while finalized, else None."""
        return self.live_root if self.finalized else None

    @property
    def live_root(self) -> tuple[int, int] | None:
        """(phys, size) of the live root FDT; None before :meth:`go_live`."""
        return None if self._root is None else (self._root.phys, self._root.size)

    def go_live(self) -> None:
        """Write and publish the root FDT, if no call has yet (the end of boot)."""
        if self._root is None:
            self._write_root()

    def register(self, p: KhoParticipant) -> None:
        """Add a participant; finalize calls them in registration order."""
        if any(q.name == p.name for q in self.participants):
            raise KhoError(f"A KHO participant named {p.name!r} is already registered.")
        self.participants.append(p)

    def unregister(self, p: KhoParticipant) -> None:
        """Remove a participant (not while a finalize is under way or done)."""
        if self.state is not KhoState.IDLE:
            raise KhoBusy(f"KHO is {self.state.value}: it cannot unregister {p.name!r}.")
        self.participants.remove(p)

    # -- preserve / unpreserve ---------------------------------------------------------

    def preserve_folio(self, pfn: int, order: int) -> None:
        """Preserve the folio of ``order`` at ``pfn`` (the kernel's kho_preserve_folio)."""
        self._check_preservable(np.array([pfn], np.int64), order)
        self.track.set(pfn, order)

    def preserve_pages(self, pfn: int, n: int) -> None:
        """Preserve ``n`` pages from ``pfn``, as the largest naturally aligned folios."""
        pieces = list(split_natural(pfn, n))
        for head, order in pieces:
            self._check_preservable(np.array([head], np.int64), order)
        for head, order in pieces:
            self.track.set(head, order)

    def preserve_pfns(self, pfns: np.ndarray, order: int) -> None:
        """Preserve many folios of one order at once; all or none.

        Refused (KhoError) for a misaligned pfn, one outside the arena, in scratch, not
        allocated, or overlapping memory already preserved (here or in a pool); KhoBusy
        after finalize.
        """
        pfns = np.asarray(pfns, np.int64).ravel()
        self._check_preservable(pfns, order)
        self.track.set_many(pfns, order)

    def unpreserve_folio(self, pfn: int, order: int) -> None:
        """Undo ``preserve_folio``."""
        self._check_preserved(np.array([pfn], np.int64), order)
        self.track.clear(pfn, order)

    def unpreserve_pages(self, pfn: int, n: int) -> None:
        """Undo ``preserve_pages(pfn, n)``."""
        pieces = list(split_natural(pfn, n))
        for head, order in pieces:
            self._check_preserved(np.array([head], np.int64), order)
        for head, order in pieces:
            self.track.clear(head, order)

    def unpreserve_pfns(self, pfns: np.ndarray, order: int) -> None:
        """Undo ``preserve_pfns``; each pfn must be preserved at exactly ``order``."""
        pfns = np.asarray(pfns, np.int64).ravel()
        self._check_preserved(pfns, order)
        self.track.clear_many(pfns, order)

    def is_preserved(self, pfn: int, order: int) -> bool:
        """Is the folio of ``order`` at ``pfn`` in the global map (at exactly that order)?"""
        return (0 <= order <= MAX_ORDER and 0 <= pfn < self.arena.npages
                and self.track.contains(pfn, order))

    def _check_mutable(self, what: str) -> None:
        if self.state is KhoState.FINALIZED:
            raise KhoBusy(f"KHO is finalized: it cannot {what} (abort the kexec first).")

    def _check_order(self, order: int) -> None:
        if not 0 <= order <= MAX_ORDER:
            raise KhoError(f"KHO refuses order {order}: orders go from 0 to {MAX_ORDER}.")

    def _check_preservable(self, pfns: np.ndarray, order: int) -> None:
        self._check_mutable(f"preserve order-{order} folios")
        self.check_adoptable(pfns, order)

    def check_adoptable(self, pfns: np.ndarray, order: int) -> None:
        """KhoError unless the folios of ``order`` at ``pfns`` may become preserved (in
        the global map or a pool): aligned, inside the arena, not in scratch, allocated,
        listed once, and not overlapping memory preserved already anywhere."""
        self._check_order(order)
        self._refuse(pfns, pfns & ((1 << order) - 1) != 0,
                     f"is not aligned to its order ({order})", order)
        self._refuse(pfns, (pfns < 0) | (pfns + (1 << order) > self.arena.npages),
                     f"is outside the arena ({self.arena.npages} pages)", order)
        self._refuse(pfns, self._in_scratch(pfns, order),
                     "lies in a scratch area, which takes only movable memory", order)
        self._refuse(pfns, ~self._allocated(pfns, order), "is not allocated memory", order)
        self._refuse_duplicates(pfns, order)
        self._refuse(pfns, self._preserved_anywhere(pfns, order),
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
            raise KhoError(f"KHO cannot preserve or unpreserve the order-{order} folio at "
                           f"pfn {int(pfns[hit[0]])}: it {why}{more}.")

    @staticmethod
    def _refuse_duplicates(pfns: np.ndarray, order: int) -> None:
        # By a sort: a count per folio slot would cost a pass over the whole arena,
        # however few folios are preserved.
        if not has_duplicates(pfns):
            return
        ordered = np.sort(pfns)
        twice = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise KhoError(f"The order-{order} folio at pfn {twice} is listed twice.")

    def _preserved_anywhere(self, pfns: np.ndarray, order: int) -> np.ndarray:
        hit = self.track.overlapping(pfns, order)
        for pool in self.pools.values():
            hit |= pool.tree.overlapping(pfns, order)
        return hit

    def _in_scratch(self, pfns: np.ndarray, order: int) -> np.ndarray:
        # The scratch areas do not overlap, so a folio meets one exactly when the last
        # area that starts before the folio's end reaches past its start: a search in
        # the few areas, not a mask of the whole arena.
        if not self.scratch:
            return np.zeros(len(pfns), bool)
        areas = np.array(sorted(self.scratch), np.int64)
        last = np.searchsorted(areas[:, 0], pfns + (1 << order), side="left") - 1
        return (last >= 0) & (pfns < areas[np.maximum(last, 0)].sum(axis=1))

    def _allocated(self, pfns: np.ndarray, order: int) -> np.ndarray:
        pages = (pfns[:, None] + np.arange(1 << order)).ravel()
        ok = self.memmap.allocated_mask(np.clip(pages, 0, self.arena.npages - 1))
        return ok.reshape(len(pfns), 1 << order).all(axis=1)

    # -- subtrees ----------------------------------------------------------------------

    def add_subtree(self, name: str, fdt: bytes) -> int:
        """Copy the FDT blob ``fdt`` into a new preserved folio; return its phys.

        The root FDT, rewritten now, gets a node ``name`` whose ``preserved-data``
        property holds that address (the kernel's kho_add_subtree).  The caller keeps
        its own copy; the next kernel reads it with ``kho_in.retrieve_subtree(name)``.
        """
        self._check_mutable(f"add the subtree {name!r}")
        self._check_subtree(name, fdt)
        folio = self._new_blob(fdt)
        self.subtrees[name] = Subtree(name, folio.pfn, folio.order, len(fdt), zlib.crc32(fdt))

        def undo() -> None:
            del self.subtrees[name]
            self._drop_blob(folio.pfn, folio.order)
        self._publish(undo)
        if self.state is KhoState.FINALIZING:
            self._added.append(name)
        return folio.phys

    def _check_subtree(self, name: str, fdt: bytes) -> None:
        if not _NODE_NAME.fullmatch(name) or name == POOLS_NODE:
            raise KhoError(f"{name!r} cannot name a KHO subtree: use 1 to 31 letters, "
                           f"digits or ,._+- (and not {POOLS_NODE!r}, the node of the pools).")
        if name in self.subtrees:
            raise KhoError(f"The KHO subtree {name!r} already exists.")
        try:
            FdtReader(fdt, f"the subtree {name!r}")
        except HandoverError as e:
            raise KhoError(f"KHO is refusing to add a subtree that is not an FDT: {e}") from None

    def remove_subtree(self, name: str) -> None:
        """Drop a subtree added by ``add_subtree``: the root without it is published,
        then its pages are unpreserved and freed."""
        self._check_mutable(f"remove the subtree {name!r}")
        sub = self.subtrees.pop(name, None)
        if sub is None:
            raise KhoError(f"There is no KHO subtree {name!r}.")
        self._publish(lambda: self.subtrees.__setitem__(name, sub))
        self._drop_blob(sub.pfn, sub.order)
        if sub.spare >= 0:
            self._drop_blob(sub.spare, sub.order)

    def update_subtree(self, name: str, fdt: bytes) -> None:
        """Rewrite a subtree after finalize (it must fit its folio), copy on write.

        For records that change until the exec (kexec-metadata's phase timings): the
        blob goes into the subtree's second folio (allocated and preserved by the first
        update, reused after), the root pointing at it is published, and the first
        folio becomes the second. So the handover is whole at every instant, and no
        update after the first allocates a page (kexec updates after poisoning).
        """
        sub = self.subtrees.get(name)
        if sub is None or not self.finalized:
            raise KhoError(f"KHO cannot update the subtree {name!r}: it does not exist "
                           "or KHO is not finalized.")
        if len(fdt) > PAGE_SIZE << sub.order:
            raise KhoError(f"The new {name!r} subtree ({len(fdt)} bytes) does not fit its "
                           f"{PAGE_SIZE << sub.order} bytes.")
        spare = sub.spare if sub.spare >= 0 else self._new_blob(b"", sub.order).pfn
        _write_blob(self.arena, Folio(spare, sub.order), fdt)
        self.subtrees[name] = replace(sub, pfn=spare, size=len(fdt), crc32=zlib.crc32(fdt),
                                      spare=sub.pfn)
        self._publish(lambda: self.subtrees.__setitem__(name, replace(sub, spare=spare)))

    def _new_blob(self, data: bytes, order: int | None = None) -> Folio:
        """A new folio holding ``data`` (zero after it), preserved in the global map."""
        order = _order_for(len(data)) if order is None else order
        pfn = self.buddy.alloc(order)
        try:
            folio = Folio(pfn, order, len(data))
            _write_blob(self.arena, folio, data)
            self.track.set(pfn, order)
        except BaseException:
            self.buddy.free(pfn, order)
            raise
        return folio

    def _drop_blob(self, pfn: int, order: int) -> None:
        self.track.clear(pfn, order)
        self.buddy.free(pfn, order)

    # -- pools -------------------------------------------------------------------------

    def create_pool(self, name: str) -> PreservedPool:
        """A new pool of preserved memory named ``name`` (1 to 31 characters, as a
        subtree's; one pool per name): its blocks are preserved from allocation and it
        is in the root FDT from now on. KhoError for a bad or taken name, KhoBusy after
        finalize, OutOfMemory if its tree has no page."""
        self.check_pool_name(name)
        pool = self._register_pool(name, RadixTree.create(self.arena, self.buddy))

        def undo() -> None:
            del self.pools[name]
            self.buddy.free(pool.tree.root_pfn, 0)
        self._publish(undo)
        return pool

    def adopt_pool(self, name: str, found: RadixMap) -> PreservedPool:
        """Register a pool handed over by the previous kernel, whose tree ``found`` was
        validated and whose blocks and tree pages are this kernel's already: the same
        tree goes on (``kho_in.restore_pool`` calls this)."""
        self.check_pool_name(name)
        pool = self._register_pool(name, RadixTree.adopt(self.arena, self.buddy, found))
        self._publish(lambda: self.pools.pop(name))
        return pool

    def check_pool_name(self, name: str) -> None:
        """KhoError unless a pool named ``name`` may be added now (KhoBusy after finalize)."""
        self._check_mutable(f"add the pool {name!r}")
        if not _NODE_NAME.fullmatch(name):
            raise KhoError(f"{name!r} cannot name a pool: use 1 to 31 letters, digits or "
                           ",._+-.")
        if name in self.pools:
            raise KhoError(f"The pool {name!r} already exists.")

    def _register_pool(self, name: str, tree: RadixTree) -> PreservedPool:
        pool = PreservedPool(name, self.arena, self.buddy, tree, self.check_adoptable)
        self.pools[name] = pool
        return pool

    def remove_pool(self, name: str) -> None:
        """Drop a pool with everything in it: the root without it is published, then
        its blocks and tree pages go back to the buddy allocator."""
        self._check_mutable(f"remove the pool {name!r}")
        pool = self.pools.pop(name, None)
        if pool is None:
            raise KhoError(f"There is no pool {name!r}.")
        self._publish(lambda: self.pools.__setitem__(name, pool))
        pool.release_all()

    # -- what is handed over -----------------------------------------------------------

    def handed_over_mask(self) -> np.ndarray:
        """Bool per arena page: what the next kernel is handed (a block of the global
        map or of a pool, a node of those maps, the live root FDT); poison spares it."""
        blocks = []
        for tree in [self.track, *(pool.tree for pool in self.pools.values())]:
            blocks += [*tree.blocks(), (tree.node_pfns(), 0)]
        if self._root is not None:
            blocks.append((np.array([self._root.pfn]), self._root.order))
        return blocks_mask(self.arena.npages, blocks)

    @property
    def own_pages(self) -> int:
        """Pages KHO holds for itself: its maps' nodes and the root FDT folios."""
        folios = [f for f in (self._root, self._spare_root) if f is not None]
        return (sum(1 << f.order for f in folios) + self.track.nr_nodes
                + sum(pool.tree.nr_nodes for pool in self.pools.values()))

    def poisoned(self, byte: int) -> None:
        """Kexec has overwritten unpreserved memory with ``byte``: from now on, a root
        folio KHO stops using is overwritten with it too, so that the next kernel finds
        poison wherever it was handed nothing."""
        self._poison = byte

    # -- finalize / abort -------------------------------------------------------------

    def finalize(self) -> tuple[int, int]:
        """Run every participant, then write the root FDT once more.

        Any failure aborts everything done so far and re-raises.  Returns (phys, size)
        of the root FDT.
        """
        if self.state is not KhoState.IDLE:
            raise KhoBusy(f"KHO is {self.state.value}: it cannot finalize again.")
        self.state = KhoState.FINALIZING
        self._added = []
        self.timings = {}
        started: list[KhoParticipant] = []
        t0 = time.perf_counter_ns()
        try:
            for p in self.participants:
                started.append(p)
                p.kho_finalize(self)
            t1 = time.perf_counter_ns()
            self.timings["serialize"] = t1 - t0
            self._write_root()
            self.timings["finalize"] = time.perf_counter_ns() - t1
        except BaseException:
            log.warning("KHO finalize failed; aborting", exc_info=True)
            self._undo(started)
            raise
        self.state = KhoState.FINALIZED
        log.info("KHO finalized: %d pages preserved, %d subtrees, %d pools, map of %d nodes",
                 self.track.nr_pages(), len(self.subtrees), len(self.pools),
                 self.track.nr_nodes)
        assert self._root is not None
        return self._root.phys, self._root.size

    def abort(self) -> None:
        """Undo finalize: participants' kho_abort, drop the subtrees added during
        finalize and the root's second folio.  Back to IDLE, where preserving works
        again; the live root says what it said before finalize."""
        if self.state is not KhoState.FINALIZED:
            raise KhoError(f"KHO is {self.state.value}, not finalized: there is nothing to abort.")
        self.state = KhoState.FINALIZING
        self._undo(list(self.participants))

    def _undo(self, started: list[KhoParticipant]) -> None:
        """Undo a (partial) finalize; every step runs even if an earlier one fails."""
        errors: list[BaseException] = []
        for p in reversed(started):
            try:
                p.kho_abort(self)
            except Exception as e:  # one participant must not stop the others' abort
                log.exception("KHO participant %r failed to abort", p.name)
                errors.append(e)
        for name in self._added:
            if name in self.subtrees:
                self.remove_subtree(name)
        if self._spare_root is not None:
            self.buddy.free(self._spare_root.pfn, self._spare_root.order)
            self._spare_root = None
        self._added = []
        self.state = KhoState.IDLE
        if errors:
            raise errors[0]

    # -- the root FDT ------------------------------------------------------------------

    def _publish(self, undo: Callable[[], object]) -> None:
        """Write and publish the root FDT after a change of the subtrees or pools; if
        that fails, ``undo`` takes the change back and the error goes on."""
        try:
            self._write_root()
        except BaseException:
            undo()
            raise

    def _write_root(self) -> None:
        """Write the root FDT into a folio nobody reads, publish it in the machine
        header, then let the old one go: freed, or after finalize kept as the folio
        the next rewrite uses (no page is allocated after the first)."""
        self.track.ensure_root()
        blob = self._root_blob()
        old, spare = self._root, self._spare_root
        if self.finalized and spare is not None and len(blob) <= PAGE_SIZE << spare.order:
            new, self._spare_root = Folio(spare.pfn, spare.order, len(blob)), None
        else:
            order = _order_for(len(blob))
            new = Folio(self.buddy.alloc(order), order, len(blob))
        _write_blob(self.arena, new, blob)
        self._root = new
        self.header.set_live_root(new.phys, new.size, handover=self.finalized)
        self.header.write(self.arena)
        if old is None:
            return
        if not self.finalized:
            self.buddy.free(old.pfn, old.order)
            return
        if self._spare_root is not None:            # too small for this root: replaced
            self.buddy.free(self._spare_root.pfn, self._spare_root.order)
        if self._poison is not None:
            self.arena.view(old.pfn, 1 << old.order)[:] = bytes([self._poison]) * (PAGE_SIZE << old.order)
        self._spare_root = old

    def _root_blob(self) -> bytes:
        root = FdtNode("", {"compatible": KHO_COMPATIBLE, PROP_MEM_MAP: self.track.root_phys})
        if self.pools:
            pools = root.child(POOLS_NODE)
            for pool in self.pools.values():
                pools.child(pool.name, **{"compatible": POOL_COMPATIBLE,
                                          PROP_MEM_MAP: pool.tree.root_phys})
        for sub in self.subtrees.values():
            root.child(sub.name, **{PROP_DATA: sub.phys, PROP_BLOB_SIZE: sub.size,
                                    PROP_BLOB_CRC: u32(sub.crc32)})
        return build(root, sealed=True)


def _write_blob(arena: Arena, folio: Folio, data: bytes) -> None:
    view = arena.view(folio.pfn, 1 << folio.order)
    view[:len(data)] = data
    view[len(data):] = bytes(len(view) - len(data))
