"""Transactions over metadata pages: an undo journal in the pool, and its recovery.

Every change to metadata happens inside a transaction. Before a page is first changed,
its old contents are copied into an undo slot; pages and data blocks allocated are
recorded before they become the pool's; frees wait until the commit. The commit seals
the changed pages' checksums and then flips one aligned 8-byte *state word*; that
store is the commit point. A SIGKILL at any instant therefore leaves one of:

- no transaction, or one that changed nothing yet: nothing to do;
- an ACTIVE transaction: recovery copies the undo slots back and releases what it
  allocated, and the metadata is as before it began;
- a COMMITTING one: it is done; recovery finishes its frees (idempotent).

The state word is the one store no checksum covers, and a bit flipped in it (idle to
active) would undo the last committed transaction without a word. So an ACTIVE
transaction whose every journaled page (but those it frees) already passes its checksum
and differs from its undo copy is taken as sealed, and finished as COMMITTING instead:
a change leaves a page's checksum wrong until the seal (and the commit seals the
pages it allocated before those it journaled), so only a process that died
between the seal and the commit point (an operation never acknowledged, either outcome
allowed) or such a flip leaves that.

The arena is a shared mapping, so every completed store survives the process: only the
program order of the stores matters, never a flush. The byte layout is in
docs/handover-abi.md, "Journal".

    header page (owner 0; its checksum covers the page with the state word taken as zero)
      0   page header: magic GJN2, crc32, owner
      16  u64  state word: seq << 2 | phase (IDLE 0, ACTIVE 1, COMMITTING 2)
      24  u16  version (1), u16 slots, u16 entry pages, u16 zero
      32  u32  slot PFNs[slots], then u32 entry-page PFNs[entry pages]
    entry pages: 256 entries of 16 bytes each, written in order:
      u64 arg (UNDO: the page's PFN; ALLOC, FREE: PFN | order << 56)
      u64 tag (seq << 8 | kind); an entry belongs to the transaction whose seq it carries,
          and the entries of a transaction end at the first that does not
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from guestfs.store.page import CRC_OFFSET, HEADER, Kind, Pages
from kho_backend.checksum import crc32_at, stored_crc32
from kho_backend.units import MAX_ORDER
from kho_backend.units import PAGE_SIZE

log = logging.getLogger(__name__)

VERSION = 1
STATE_OFFSET = 16
GEOMETRY = struct.Struct("<HHHH")
GEOMETRY_OFFSET = 24
PFNS_OFFSET = 32
ENTRY = struct.Struct("<QQ")
ENTRIES_PER_PAGE = PAGE_SIZE // ENTRY.size
ENTRY_SHIFT = 4                             # an entry is 16 bytes
ENTRY_PAGE_SHIFT = 8                        # 256 to a page
ENTRY_SLOT_MASK = ENTRIES_PER_PAGE - 1
assert ENTRY.size == 1 << ENTRY_SHIFT and ENTRIES_PER_PAGE == 1 << ENTRY_PAGE_SHIFT
U64 = struct.Struct("<Q")
ORDER_SHIFT = 56
#: Pages a transaction may change (each needs an undo slot), and its entry pages.
DEFAULT_SLOTS = 64
DEFAULT_ENTRY_PAGES = 8


class Phase(enum.IntEnum):
    """The state word's phase."""

    IDLE = 0
    ACTIVE = 1
    COMMITTING = 2


class EntryKind(enum.IntEnum):
    """What a journal entry records."""

    UNDO = 1
    ALLOC = 2
    FREE = 3


class Pool(Protocol):
    """What the journal needs of the pool the metadata lives in (kho_backend's
    `PreservedPool`)."""

    def alloc(self, order: int = 0, *, intent: Callable[[int], None] | None = None) -> int:
        """A block of 2**order pages; `intent(pfn)` runs before it becomes the pool's."""

    def free(self, pfn: int, order: int = 0) -> None:
        """Give a block of the pool back."""

    def release_if_owned(self, pfn: int, order: int) -> bool:
        """Free the block if it is the pool's (recovery: safe to repeat)."""

    def owns(self, pfn: int, order: int) -> bool:
        """Whether the block of `order` at `pfn` is the pool's."""


class JournalError(Exception):
    """The journal cannot be trusted (its header page is not sound)."""


class TxnTooLarge(Exception):
    """A transaction needs more undo slots or entries than the journal has; it is rolled
    back. Operations that can grow without bound split themselves before this."""


@dataclass(frozen=True)
class Recovery:
    """What recovery found and did (for the log and the tests)."""

    phase: Phase
    seq: int
    undone: int = 0
    released: int = 0
    freed: int = 0


class Journal:
    """The journal of one filesystem: its pages, and the transaction in progress."""

    def __init__(self, pages: Pages, pool: Pool, header_pfn: int, slots: list[int],
                 entry_pages: list[int], seq: int) -> None:
        self.pages = pages
        self.pool = pool
        self.header_pfn = header_pfn
        self.slots = slots
        self.entry_pages = entry_pages
        self.capacity = len(entry_pages) * ENTRIES_PER_PAGE
        self._seq = seq
        self._txn: Txn | None = None
        # Views of the journal's own pages, which never move: every transaction writes
        # them several times.
        arena = pages.arena
        self._header = arena.view(header_pfn)
        self._slot_views = [arena.view(pfn) for pfn in slots]
        self._entry_views = [arena.view(pfn) for pfn in entry_pages]

    # --- creation and opening --------------------------------------------------------

    @classmethod
    def create(cls, pages: Pages, pool: Pool, *, slots: int = DEFAULT_SLOTS,
               entry_pages: int = DEFAULT_ENTRY_PAGES) -> Journal:
        """A new, idle journal (at format, before the filesystem exists anywhere)."""
        header = pool.alloc(0)
        slot_pfns = [pool.alloc(0) for _ in range(slots)]
        entry_pfns = [pool.alloc(0) for _ in range(entry_pages)]
        for pfn in entry_pfns:
            view = pages.arena.view(pfn)
            view[:] = bytes(len(view))
        view = pages.init(header, Kind.JOURNAL, 0)
        GEOMETRY.pack_into(view, GEOMETRY_OFFSET, VERSION, slots, entry_pages, 0)
        struct.pack_into(f"<{slots + entry_pages}I", view, PFNS_OFFSET, *slot_pfns, *entry_pfns)
        U64.pack_into(view, STATE_OFFSET, 0)
        _seal(view)
        return cls(pages, pool, header, slot_pfns, entry_pfns, 0)

    @classmethod
    def open(cls, pages: Pages, pool: Pool, header_pfn: int) -> Journal:
        """The journal whose header is at `header_pfn` (checked; not yet recovered)."""
        view = pages.arena.view(header_pfn)
        magic, stored, _owner = HEADER.unpack_from(view)
        if magic != Kind.JOURNAL:
            raise JournalError(f"page {header_pfn} is not a journal header")
        if stored != _crc(view):
            raise JournalError(f"the journal header (page {header_pfn}) fails its checksum")
        version, nslots, nentry, _ = GEOMETRY.unpack_from(view, GEOMETRY_OFFSET)
        if version != VERSION:
            raise JournalError(f"the journal has version {version}; this guestfs reads "
                               f"version {VERSION}")
        pfns = struct.unpack_from(f"<{nslots + nentry}I", view, PFNS_OFFSET)
        if not nslots or not nentry or not all(pool.owns(p, 0) for p in pfns):
            raise JournalError("the journal header lists pages that are not the pool's")
        seq = U64.unpack_from(view, STATE_OFFSET)[0] >> 2
        return cls(pages, pool, header_pfn, list(pfns[:nslots]), list(pfns[nslots:]), seq)

    def own_pages(self) -> list[int]:
        """Every page of the journal (for the full check)."""
        return [self.header_pfn, *self.slots, *self.entry_pages]

    # --- recovery --------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Finish or undo what a process that died left; afterwards the journal is idle."""
        seq, phase = self._state()
        if phase is Phase.IDLE:
            return Recovery(phase, seq)
        entries = list(self._entries(seq))
        self._check(entries)
        undone = released = freed = 0
        if phase is Phase.ACTIVE and self._sealed(entries):
            log.warning("journal: transaction %d is marked active but every page it "
                        "changed is sealed: finished, not undone", seq)
            phase = Phase.COMMITTING
        if phase is Phase.ACTIVE:
            self._check_undo(entries)
            slot = 0
            for kind, arg in entries:
                if kind is EntryKind.UNDO:
                    self._restore(slot, arg)
                    slot += 1
                    undone += 1
            for kind, arg in entries:
                if kind is EntryKind.ALLOC:
                    released += self._release(arg)
        else:
            for kind, arg in entries:
                if kind is EntryKind.FREE:
                    freed += self._release(arg)
        self._set_state(seq, Phase.IDLE)
        self._seq = seq
        done = Recovery(phase, seq, undone, released, freed)
        log.warning("journal: recovered transaction %d (%s): %d pages restored, %d blocks "
                    "released, %d frees finished", seq, phase.name.lower(), undone,
                    released, freed)
        return done

    def _check(self, entries: list[tuple[EntryKind, int]]) -> None:
        """Refuse entries a sound journal cannot hold, before recovery changes a page:
        more undo records than slots, or an impossible block."""
        undo = [arg for kind, arg in entries if kind is EntryKind.UNDO]
        if len(undo) > len(self.slots):
            raise JournalError(f"the journal holds {len(undo)} undo records for "
                               f"{len(self.slots)} slots")
        for kind, arg in entries:
            pfn, order = _unpack_block(arg)
            if kind is EntryKind.UNDO and not 0 < arg < self.pages.arena.npages:
                raise JournalError(f"the journal would restore page {arg}, which is not "
                                   "in the arena")
            if kind is not EntryKind.UNDO and (order > MAX_ORDER or pfn & ((1 << order) - 1)
                                               or not 0 < pfn < self.pages.arena.npages):
                raise JournalError(f"the journal names an impossible block {pfn} of order "
                                   f"{order}")

    def _check_undo(self, entries: list[tuple[EntryKind, int]]) -> None:
        """Refuse, before an active transaction is undone, an undo record of a page that
        is not a metadata page of the pool or whose slot holds no sealed copy of it. (A
        committing transaction's records are not used: the pages it freed, journaled
        ones among them, are the pool's no more.)"""
        undo = [arg for kind, arg in entries if kind is EntryKind.UNDO]
        own = set(self.own_pages())
        view = self.pages.arena.view
        for slot, pfn in enumerate(undo):
            if pfn in own or not self.pool.owns(pfn, 0):
                raise JournalError(f"the journal would restore page {pfn}, which is not "
                                   "a metadata page of the pool")
            # The slot holds the page as its last commit sealed it: the same kind and
            # owner as the page now (a change never rewrites a page's header), and whole.
            old, page = view(self.slots[slot]), view(pfn)
            if (old[:4] != page[:4] or old[8:16] != page[8:16]
                    or stored_crc32(old, CRC_OFFSET) != crc32_at(old, CRC_OFFSET)):
                raise JournalError(f"the journal would restore page {pfn} from slot {slot}, "
                                   "which holds no sealed copy of it")

    def _sealed(self, entries: list[tuple[EntryKind, int]]) -> bool:
        """Whether every page the transaction journaled, but those it frees, passes its
        checksum and differs from its undo copy, of the same kind and owner (see the
        module docstring); False if there is no such page."""
        freed = {_unpack_block(arg)[0] for kind, arg in entries if kind is EntryKind.FREE}
        view = self.pages.arena.view
        checked = slot = 0
        for kind, arg in entries:
            if kind is not EntryKind.UNDO:
                continue
            page, old = view(arg), view(self.slots[slot])
            slot += 1
            if arg in freed:
                continue
            if (stored_crc32(page, CRC_OFFSET) != crc32_at(page, CRC_OFFSET) or page == old
                    or page[:4] != old[:4] or page[8:16] != old[8:16]):
                return False
            checked += 1
        return checked > 0

    def _restore(self, slot: int, pfn: int) -> None:
        self.pages.arena.view(pfn)[:] = self.pages.arena.view(self.slots[slot])
        self.pages.forget(pfn)

    def _release(self, arg: int) -> int:
        pfn, order = _unpack_block(arg)
        self.pages.forget(pfn)
        return int(self.pool.release_if_owned(pfn, order))

    # --- transactions ----------------------------------------------------------------

    def transaction(self, on_rollback: Callable[[], None] | None = None) -> Scope:
        """A transaction, as ``with journal.transaction() as txn:``: committed when the
        block ends, rolled back if it raises (then `on_rollback` runs)."""
        return Scope(self, on_rollback)

    def begin(self, on_rollback: Callable[[], None] | None = None) -> Txn:
        """Open a transaction (`Scope` ends it with `end`); `on_rollback` runs if it is
        rolled back."""
        if self._txn is not None:
            raise RuntimeError("a transaction is already open")
        txn = self._txn = Txn(self, self._seq + 1)
        if on_rollback is not None:
            txn.on_rollback.append(on_rollback)
        return txn

    def end(self, txn: Txn, *, failed: bool) -> None:
        """Commit `txn`, or roll it back if its block `failed`."""
        try:
            if failed:
                txn.rollback()
            else:
                txn.commit()
        finally:
            self._txn = None
            if txn.activated:
                self._seq = txn.seq

    @property
    def busy(self) -> bool:
        """A transaction is open."""
        return self._txn is not None

    # --- the state word and the entries ------------------------------------------------

    def _state(self) -> tuple[int, Phase]:
        word = U64.unpack_from(self._header, STATE_OFFSET)[0]
        try:
            return word >> 2, Phase(word & 3)
        except ValueError:
            raise JournalError(f"the journal's state word {word:#x} has no phase") from None

    def _set_state(self, seq: int, phase: Phase) -> None:
        U64.pack_into(self._header, STATE_OFFSET, seq << 2 | phase)

    def _write_entry(self, index: int, seq: int, kind: EntryKind, arg: int) -> None:
        view = self._entry_views[index >> ENTRY_PAGE_SHIFT]
        at = (index & ENTRY_SLOT_MASK) << ENTRY_SHIFT
        pack = U64.pack_into
        pack(view, at, arg)                 # the argument first, the tag last:
        pack(view, at + 8, seq << 8 | kind)  # a tagged entry is a whole one

    def _entries(self, seq: int) -> Iterator[tuple[EntryKind, int]]:
        for index in range(self.capacity):
            page, slot = divmod(index, ENTRIES_PER_PAGE)
            arg, tag = ENTRY.unpack_from(self.pages.arena.view(self.entry_pages[page]),
                                         slot * ENTRY.size)
            if tag >> 8 != seq:
                return
            try:
                yield EntryKind(tag & 0xFF), arg
            except ValueError:
                raise JournalError(f"journal entry {index} has an unknown kind") from None


class Scope:
    """The block of one transaction (`Journal.transaction`). A class rather than a
    generator-based context manager: every operation of the filesystem enters one."""

    __slots__ = ("journal", "on_rollback", "txn")

    def __init__(self, journal: Journal, on_rollback: Callable[[], None] | None) -> None:
        self.journal = journal
        self.on_rollback = on_rollback

    def __enter__(self) -> Txn:
        self.txn = self.journal.begin(self.on_rollback)
        return self.txn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self.journal.end(self.txn, failed=exc_type is not None)


class Txn:
    """One transaction (see `Journal.transaction`). Every metadata change of the
    filesystem goes through one, so its bookkeeping is kept to a few set and dict
    operations per page (slotted; the journal's own pages and geometry looked up once)."""

    __slots__ = ("journal", "pages", "seq", "activated", "_undo", "_touched", "_dirty",
                 "_allocated", "_frees", "_entries", "_done", "on_rollback")

    def __init__(self, journal: Journal, seq: int) -> None:
        self.journal = journal
        self.pages = journal.pages
        self.seq = seq
        self.activated = False
        self._undo: dict[int, int] = {}         # journaled page -> its slot
        #: Pages journaled or allocated in this txn: changing them again needs no undo.
        self._touched: set[int] = set()
        self._dirty: set[int] = set()           # pages to seal at commit
        self._allocated: list[tuple[int, int]] = []
        self._frees: list[tuple[int, int]] = []
        self._entries = 0
        self._done = False
        #: Called after a rollback, so that caches drop what they read in this txn.
        self.on_rollback: list[Callable[[], None]] = []

    # --- changing pages --------------------------------------------------------------

    def write(self, pfn: int, kind: Kind) -> memoryview:
        """The page, checked, for changing: its old contents are journaled first."""
        view = self.pages.read(pfn, kind)
        if pfn not in self._touched:
            self._journal_page(pfn, view)
        self._dirty.add(pfn)
        return view

    def new_page(self, kind: Kind, owner: int) -> int:
        """A new zeroed metadata page of `kind` (released again if the txn rolls back)."""
        pfn = self.alloc(0)
        self._touched.add(pfn)
        self.pages.init(pfn, kind, owner)
        self._dirty.add(pfn)
        return pfn

    def alloc(self, order: int = 0) -> int:
        """A data block (contents undefined), recorded before it becomes the pool's."""
        self._reserve_entries(1)

        def record(pfn: int) -> None:
            self._add_entry(EntryKind.ALLOC, _pack_block(pfn, order))
        pfn = self.journal.pool.alloc(order, intent=record)
        self._allocated.append((pfn, order))
        return pfn

    def free(self, pfn: int, order: int = 0) -> None:
        """Free a block when the transaction commits (until then it may still be read,
        and a rollback keeps it)."""
        self._reserve_entries(1)
        self._add_entry(EntryKind.FREE, _pack_block(pfn, order))
        self._frees.append((pfn, order))
        self._dirty.discard(pfn)

    def room(self) -> int:
        """Entries (allocations and frees) the transaction can still record."""
        return self.journal.capacity - self._entries

    def affords(self, pages: int, entries: int) -> bool:
        """Whether the transaction can still change `pages` more pages and record
        `entries` more entries: bulk work stops short of the journal's limits."""
        return (len(self.journal.slots) - len(self._undo) >= pages
                and self.room() >= entries)

    # --- ending --------------------------------------------------------------------

    def commit(self) -> None:
        """Seal the changed pages, then the commit point; then the frees. The pages the
        transaction allocated are sealed before those it journaled: recovery finishes
        an active transaction whose journaled pages are all sealed (see the module
        docstring), and its new pages must be whole by then."""
        self._end()
        if not self.activated:
            return
        seal, undo = self.pages.seal, self._undo
        journaled = []
        for pfn in self._dirty:
            if pfn in undo:
                journaled.append(pfn)
            else:
                seal(pfn)
        for pfn in journaled:
            seal(pfn)
        journal = self.journal
        if not self._frees:
            journal._set_state(self.seq, Phase.IDLE)
            return
        journal._set_state(self.seq, Phase.COMMITTING)
        for pfn, order in self._frees:
            self.pages.forget(pfn)
            journal.pool.free(pfn, order)
        journal._set_state(self.seq, Phase.IDLE)

    def rollback(self) -> None:
        """Put every journaled page back and release what was allocated."""
        self._end()
        if self.activated:
            arena = self.pages.arena
            for pfn, slot in self._undo.items():
                arena.view(pfn)[:] = self.journal._slot_views[slot]
            for pfn, order in reversed(self._allocated):
                self.pages.forget(pfn)
                self.journal.pool.free(pfn, order)
            self.journal._set_state(self.seq, Phase.IDLE)
        for callback in self.on_rollback:
            callback()

    def _end(self) -> None:
        if self._done:
            raise RuntimeError("the transaction has ended already")
        self._done = True

    # --- internals -------------------------------------------------------------------

    def _activate(self) -> None:
        if not self.activated:
            self.journal._set_state(self.seq, Phase.ACTIVE)
            self.activated = True

    def _journal_page(self, pfn: int, view: memoryview) -> None:
        journal = self.journal
        slot = len(self._undo)
        if slot >= len(journal.slots):
            raise TxnTooLarge(f"a transaction changes more than {slot} metadata pages")
        self._reserve_entries(1)
        self._activate()
        journal._slot_views[slot][:] = view
        journal._write_entry(self._entries, self.seq, EntryKind.UNDO, pfn)
        self._entries += 1
        self._undo[pfn] = slot
        self._touched.add(pfn)

    def _reserve_entries(self, n: int) -> None:
        if self._entries + n > self.journal.capacity:
            raise TxnTooLarge(f"a transaction records more than {self.journal.capacity} "
                              "allocations and frees")

    def _add_entry(self, kind: EntryKind, arg: int) -> None:
        self._activate()
        self.journal._write_entry(self._entries, self.seq, kind, arg)
        self._entries += 1


def _pack_block(pfn: int, order: int) -> int:
    return pfn | order << ORDER_SHIFT


def _unpack_block(arg: int) -> tuple[int, int]:
    return arg & ((1 << ORDER_SHIFT) - 1), arg >> ORDER_SHIFT


def _crc(view: memoryview) -> int:
    page = bytearray(view)
    U64.pack_into(page, STATE_OFFSET, 0)
    return crc32_at(page, CRC_OFFSET)


def _seal(view: memoryview) -> None:
    struct.pack_into("<I", view, CRC_OFFSET, _crc(view))
