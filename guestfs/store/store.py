"""`MetaStore`: the filesystem's metadata in the arena, and a bounded cache over it.

The filesystem core (`guestfs.filesystem`) does every change inside `transaction()`,
reads inodes with `get` and writes them back with `put`. The store owns the pages
(checked on first read), the journal, the superblock, the inode table, the directories,
the page maps, the blobs and the orphan list; decoded inodes are kept in an LRU cache of
`CACHE_INODES` entries, dropped whole when a transaction rolls back.

Counters. The inode count and the next inode number change with every create and every
free, and journaling the superblock for them would add a page to each of those
transactions. They are kept in memory instead, as ext4 keeps its free-inode counts
(recomputed at mount when the filesystem was not cleanly unmounted): the first change
after the superblock was written exact sets its COUNTS_STALE flag (and reserves
`INO_RESERVE` inode numbers ahead), later ones write it only when the reservation runs
out, `flush_counters` (a clean handover) writes exact figures and clears the flag, and
`open` recounts the inodes when it finds the flag set (a crash, or a kernel that ended
without handing over).

Room. Metadata may take every free page but the last `SLACK_PAGES` (kept for the KHO
root FDT and kexec-metadata of the next handover); file data also leaves the headroom
(1/256 of the arena, at least 16 pages) to metadata, so that a full arena still takes a
mkdir, a rename or an unlink. Below the headroom, `REMOVAL_RESERVE` pages above the
slack are left to a transaction that only takes things away (an unlink, an rmdir, a
removexattr, a truncate, a free): removing a name the kernel still holds puts its inode
on the orphan list, which may need a page, so an arena filled by metadata (long symlink
targets, xattrs, names) can still be emptied.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np

from guestfs.inode import Inode
from guestfs.store import blob
from guestfs.store.btree import BTree
from guestfs.store.directory import Directories
from guestfs.store.journal import Journal, JournalError, Pool, Recovery, Scope, Txn
from guestfs.store.page import CorruptPage, Kind, Pages
from guestfs.store.pagemap import PageMaps
from guestfs.store.records import INLINE_TARGET, InodeTable
from guestfs.store.superblock import Superblock, journal_of
from kho_backend.arena import Arena
from kho_backend.errors import OutOfMemory

log = logging.getLogger(__name__)

CACHE_INODES = 1 << 15
#: Decoded xattrs kept for the inodes read last (`MetaStore.xattrs`): an inode may hold
#: up to 1 MiB of them, which every getxattr would otherwise read, check and decode
#: again (the kernel asks for security.capability before every write), and at most
#: this many bytes of them in all (the inode read last is kept whatever its size).
CACHE_XATTR_INODES = 16
CACHE_XATTR_BYTES = 4 << 20
#: Inode numbers reserved at once (see `MetaStore.new_ino`): a crash skips at most this
#: many, and the superblock is written once per this many creates.
INO_RESERVE = 1024
SLACK_PAGES = 16
#: Pages above the slack that only a transaction that frees may take (see the module
#: docstring): an orphan-list insertion takes at most its B+tree's height plus one.
REMOVAL_RESERVE = 16
HEADROOM_SHARE = 256
MIN_HEADROOM_PAGES = 16
#: An orphan whose value is this is freed; any other value is a pending truncate size.
ORPHAN_FREE = (1 << 64) - 1
ORPHAN_VALUE_SIZE = 8


class RoomPool:
    """The pool as the journal sees it: allocations stop `floor` pages short of empty,
    and `reserve` pages more unless the transaction only frees (`freeing`)."""

    def __init__(self, pool: Pool, floor: int, reserve: int = REMOVAL_RESERVE) -> None:
        self.pool = pool
        self.floor = floor
        self.reserve = reserve
        #: Set for the transaction under way when it only takes things away.
        self.freeing = False

    def alloc(self, order: int = 0, *, intent: Callable[[int], None] | None = None) -> int:
        floor = self.floor if self.freeing else self.floor + self.reserve
        if self.pool.free_pages() - (1 << order) < floor:
            raise OutOfMemory(f"the arena keeps its last {floor} free pages for the next "
                              "handover" + ("" if self.freeing else " and for removals"))
        return self.pool.alloc(order, intent=intent)

    def free(self, pfn: int, order: int = 0) -> None:
        self.pool.free(pfn, order)

    def release_if_owned(self, pfn: int, order: int) -> bool:
        return self.pool.release_if_owned(pfn, order)

    def owns(self, pfn: int, order: int) -> bool:
        return self.pool.owns(pfn, order)

    def free_pages(self) -> int:
        return self.pool.free_pages()

    @property
    def nr_pages(self) -> int:
        return self.pool.nr_pages

    def blocks(self) -> Iterator[tuple[np.ndarray, int]]:
        return self.pool.blocks()


@dataclass(frozen=True)
class Opened:
    """What opening a store found: the journal's recovery."""

    recovery: Recovery


class MetaStore:
    """The metadata of one filesystem (see the module docstring)."""

    def __init__(self, arena: Arena, pool: Pool, sb_pfn: int, sb: Superblock,
                 journal: Journal, pages: Pages) -> None:
        self.arena = arena
        self.pool = pool
        self.pages = pages
        self.sb_pfn = sb_pfn
        self.sb = sb
        self.journal = journal
        self.headroom = max(arena.npages // HEADROOM_SHARE, MIN_HEADROOM_PAGES)
        self.itable = InodeTable(pages, sb.itable, sb.ino_generation)
        self.dirs = Directories(pages, sb.hash_key)
        self.maps = PageMaps(pages, self.data_room)
        self._orphans = BTree(pages, 0)
        #: Decoded inodes by number, least recently used first (read-only to callers:
        #: the filesystem looks an inode up here first, without a call).
        self.inodes: OrderedDict[int, Inode] = OrderedDict()
        #: Decoded xattrs by inode number: (first page of the blob they came from, its
        #: size in bytes, name -> value), least recently used first; an entry is good
        #: while the inode's `xattr` names that page (a change writes a new blob and
        #: drops the entry; a rollback drops them all).
        self._xattr_cache: OrderedDict[int, tuple[int, int, dict[bytes, bytes]]] = OrderedDict()
        self._xattr_bytes = 0
        #: The live counters when the open transaction began (what a rollback restores:
        #: the superblock read back holds what its page says, which may be stale).
        self._counts = (sb.next_ino, sb.inode_count)
        #: False after a recount that could not read the whole inode table: the count
        #: is then an estimate, and the superblock keeps its COUNTS_STALE flag.
        self.count_exact = True

    # --- making and opening --------------------------------------------------------

    @classmethod
    def format(cls, arena: Arena, pool: Pool, sb: Superblock, root: Inode) -> MetaStore:
        """A new filesystem in `pool`: journal, superblock and the root directory."""
        pages = Pages(arena)
        room = RoomPool(pool, SLACK_PAGES)
        journal = Journal.create(pages, room)
        sb.journal = journal.header_pfn
        sb.inode_count = 1                      # the root, put below
        sb_pfn = room.alloc(0)
        sb.pack_into(pages.init(sb_pfn, Kind.SUPERBLOCK, 0))
        pages.seal(sb_pfn)
        store = cls(arena, room, sb_pfn, sb, journal, pages)
        with store.transaction() as txn:
            store.put(txn, root)
        return store

    @classmethod
    def open(cls, arena: Arena, pool: Pool, sb_pfn: int) -> tuple[MetaStore, Opened]:
        """The filesystem whose superblock is at `sb_pfn`: the journal is recovered
        first (a process that died mid-transaction left it), then the superblock is
        checked. CorruptPage or JournalError if they cannot be trusted."""
        pages = Pages(arena)
        room = RoomPool(pool, SLACK_PAGES)
        journal_pfn = journal_of(arena.view(sb_pfn))       # checked after recovery
        if not pool.owns(journal_pfn, 0):
            raise JournalError(f"the superblock names page {journal_pfn} as the journal, "
                               "which is not the pool's")
        journal = Journal.open(pages, room, journal_pfn)
        recovery = journal.recover()
        sb = Superblock.read(pages, sb_pfn)
        if sb.journal != journal_pfn:
            raise CorruptPage(sb_pfn, "the superblock names another journal")
        store = cls(arena, room, sb_pfn, sb, journal, pages)
        if sb.counts_stale:
            store._recount()
        return store, Opened(recovery)

    def _recount(self) -> None:
        """The inode count, from the inode table (the superblock's is stale: the last
        kernel did not hand over). Its next inode number is the last reservation, above
        every number given out, and stays. A record page that fails its checks counts
        as full, and a table whose nodes cannot be walked leaves the superblock's
        count (both logged; the full check reports the page): the mount goes on, only
        the inodes of that page answer EIO, and the count stays flagged as inexact, so
        that no handover writes it as exact and the next mount counts again."""
        sb = self.sb
        try:
            counted, exact = self.itable.count()
        except CorruptPage as e:
            counted, exact = sb.inode_count, False
            log.error("the inode table cannot be walked, so the inode count stays at the "
                      "superblock's %d: %s", counted, e)
        else:
            if not exact:
                log.error("a record page of the inode table fails its checks: counted as "
                          "full, so the inode count %d is an upper bound", counted)
        counted = min(max(counted, 1), sb.max_inodes)
        if exact:
            log.info("inode count recounted: %d (the superblock said %d)", counted,
                     sb.inode_count)
        sb.inode_count = counted
        self._counts = (sb.next_ino, counted)
        self.count_exact = exact

    # --- transactions --------------------------------------------------------------

    def transaction(self) -> Scope:
        """A transaction over the metadata, as ``with store.transaction() as txn:``:
        committed when the block ends, rolled back (caches dropped, superblock re-read)
        if it raises."""
        self._counts = (self.sb.next_ino, self.sb.inode_count)
        self.pool.freeing = False
        return self.journal.transaction(self._forget_all)

    def begin(self, *, frees: bool = False) -> Txn:
        """Open a transaction, to be ended by `end` (what `transaction` does, for a
        caller that wraps it in its own context manager: one layer less per request).
        One that `frees` (takes things away only) may use the removal reserve."""
        sb = self.sb
        self._counts = (sb.next_ino, sb.inode_count)
        self.pool.freeing = frees
        return self.journal.begin(self._forget_all)

    def end(self, txn: Txn, *, failed: bool) -> None:
        """Commit `txn`, or roll it back (and drop the caches) if its block `failed`."""
        try:
            self.journal.end(txn, failed=failed)
        finally:
            self.pool.freeing = False

    def _forget_all(self) -> None:
        # Every cache first: if reading the superblock back raises, none may keep what
        # the rolled-back transaction put there.
        self.inodes.clear()
        self.forget_xattrs()
        self.itable.forget_pages()
        self.dirs.forget_names()
        self.sb = Superblock.read(self.pages, self.sb_pfn)
        self.sb.next_ino, self.sb.inode_count = self._counts
        self.itable.table = self.sb.itable
        self.dirs.hash_key = self.sb.hash_key

    def save_superblock(self, txn: Txn) -> None:
        """Write the superblock's fields (counters, roots) in this transaction."""
        self.sb.pack_into(txn.write(self.sb_pfn, Kind.SUPERBLOCK))

    # --- inodes ----------------------------------------------------------------------

    def get(self, ino: int) -> Inode | None:
        """Inode `ino`, or None if there is none (CorruptPage if its record cannot be
        trusted)."""
        inode = self.inodes.get(ino)
        if inode is not None:
            self.inodes.move_to_end(ino)
            return inode
        if not 0 < ino < self.sb.next_ino:
            return None
        inode = self.itable.get(ino)
        if inode is not None:
            self._remember(inode)
        return inode

    def put(self, txn: Txn, inode: Inode) -> None:
        """Write `inode`'s record (and keep it in the cache)."""
        table = self.sb.itable
        root, height = table.root, table.height
        self.itable.put(txn, inode)
        if table.root != root or table.height != height:
            self.save_superblock(txn)
        self._remember(inode)

    def refresh(self, inode: Inode) -> None:
        """Make `inode` (an object a caller holds) what the arena says again, after a
        transaction that changed it rolled back; it is cached again."""
        fresh = self.itable.get(inode.ino)
        if fresh is None:
            self.inodes.pop(inode.ino, None)
            return
        for name in Inode.__slots__:
            setattr(inode, name, getattr(fresh, name))
        self._remember(inode)

    def new_ino(self, txn: Txn) -> int:
        """A new inode number, counted in use (the superblock is written only when its
        reservation of numbers runs out, or its counters were exact: see the module
        docstring)."""
        sb = self.sb
        ino = sb.allocate_ino()
        sb.inode_count += 1
        if not sb.counts_stale or sb.next_ino > sb.ino_reserved:
            sb.ino_reserved = sb.next_ino + INO_RESERVE
            self._counters_changed(txn)
        return ino

    def remove(self, txn: Txn, ino: int) -> None:
        """Free inode `ino`'s record (the caller freed what it owned)."""
        self.itable.remove(txn, ino)
        self.sb.inode_count = max(self.sb.inode_count - 1, 1)   # the root always is
        if not self.sb.counts_stale:
            self._counters_changed(txn)
        self.inodes.pop(ino, None)

    def _counters_changed(self, txn: Txn) -> None:
        """Write the superblock, flagged: its counters may go stale from now on."""
        sb = self.sb
        if not sb.counts_stale:
            sb.counts_stale = True
            sb.ino_reserved = max(sb.ino_reserved, sb.next_ino)
        self.save_superblock(txn)

    def flush_counters(self) -> None:
        """Write the exact counters and clear the flag (a clean handover: the next mount
        then need not recount). Nothing to do when they are exact already, nor when the
        count is an estimate (see `count_exact`): the flag stays for the next mount."""
        if self.sb.counts_stale and self.count_exact:
            with self.transaction() as txn:
                self.sb.counts_stale = False
                self.save_superblock(txn)

    def forget_inode(self, ino: int) -> None:
        """Drop `ino` from the caches (it is read from its record, and its xattrs from
        their pages, again when asked for)."""
        self.inodes.pop(ino, None)
        self._drop_xattrs(ino)

    def cached(self) -> int:
        """Inodes in the cache."""
        return len(self.inodes)

    def _remember(self, inode: Inode) -> None:
        cache = self.inodes
        ino = inode.ino
        if cache.get(ino) is inode:
            cache.move_to_end(ino)
            return
        cache[ino] = inode
        cache.move_to_end(ino)
        while len(cache) > CACHE_INODES:
            cache.popitem(last=False)

    # --- xattrs and symlink targets ---------------------------------------------------

    def xattrs(self, inode: Inode) -> dict[bytes, bytes]:
        """The inode's extended attributes (a dict of the caller's own)."""
        if not inode.xattr:
            return {}
        cached = self._xattr_cache.get(inode.ino)
        if cached is not None and cached[0] == inode.xattr:
            self._xattr_cache.move_to_end(inode.ino)
            return dict(cached[2])
        raw = blob.read(self.pages, inode.xattr)
        pairs = msgpack.unpackb(raw, raw=True)
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(v, bytes) for v in p)
                for p in pairs):
            raise CorruptPage(inode.xattr, f"the xattrs of inode {inode.ino} are malformed")
        xattrs = dict(pairs)
        self._cache_xattrs(inode.ino, inode.xattr, len(raw), xattrs)
        return dict(xattrs)

    def forget_xattrs(self) -> None:
        """Drop every decoded xattr blob (a full check decodes each one again)."""
        self._xattr_cache.clear()
        self._xattr_bytes = 0

    def _cache_xattrs(self, ino: int, pfn: int, size: int, xattrs: dict[bytes, bytes]) -> None:
        self._drop_xattrs(ino)
        cache = self._xattr_cache
        cache[ino] = (pfn, size, xattrs)
        self._xattr_bytes += size
        while len(cache) > 1 and (len(cache) > CACHE_XATTR_INODES
                                  or self._xattr_bytes > CACHE_XATTR_BYTES):
            _pfn, dropped, _ = cache.popitem(last=False)[1]
            self._xattr_bytes -= dropped

    def _drop_xattrs(self, ino: int) -> None:
        dropped = self._xattr_cache.pop(ino, None)
        if dropped is not None:
            self._xattr_bytes -= dropped[1]

    def xattrs_span_pages(self, inode: Inode, n: int) -> bool:
        """Whether the inode's extended attributes take more than `n` pages."""
        return bool(inode.xattr) and blob.spans_pages(self.pages, inode.xattr, n)

    def set_xattrs(self, txn: Txn, inode: Inode, xattrs: dict[bytes, bytes]) -> None:
        """Replace the inode's extended attributes (the caller writes its record). They
        are cached as written: a rollback drops the cache."""
        self._drop_xattrs(inode.ino)
        old, new = inode.xattr, 0
        if xattrs:
            packed = msgpack.packb(sorted(xattrs.items()), use_bin_type=True)
            new = blob.write(txn, packed, inode.ino)
            self._cache_xattrs(inode.ino, new, len(packed), dict(xattrs))
        inode.xattr = new
        if old:
            blob.free(txn, self.pages, old)

    def target(self, inode: Inode) -> bytes:
        """A symlink's target."""
        if inode.target is not None:
            return inode.target
        target = blob.read(self.pages, inode.target_blob)
        if len(target) != inode.size:
            raise CorruptPage(inode.target_blob, f"symlink {inode.ino}'s target has "
                                                 f"{len(target)} bytes, not {inode.size}")
        return target

    def set_target(self, txn: Txn, inode: Inode, target: bytes) -> None:
        """Store a new symlink's target: in its record when it fits, else in a blob."""
        inode.size = len(target)
        if len(target) <= INLINE_TARGET:
            inode.target = target
        else:
            inode.target, inode.target_blob = None, blob.write(txn, target, inode.ino)

    def free_owned(self, txn: Txn, inode: Inode) -> None:
        """Free what an inode owns besides its data pages: xattrs, target, directory."""
        if inode.xattr:
            self._drop_xattrs(inode.ino)
            blob.free(txn, self.pages, inode.xattr)
            inode.xattr = 0
        if inode.target_blob:
            blob.free(txn, self.pages, inode.target_blob)
            inode.target_blob = 0
        if inode.tree:
            self.dirs.free(txn, inode)

    # --- the orphan list -----------------------------------------------------------------

    def add_orphan(self, txn: Txn, ino: int, value: int = ORPHAN_FREE) -> None:
        """Note that inode `ino` must be freed (or truncated to `value`) even if this
        process dies first."""
        payload = value.to_bytes(ORPHAN_VALUE_SIZE, "little")
        try:        # an insert refuses a present key before it changes anything
            root = self._orphans.insert(txn, self.sb.orphans, ino, payload)
        except KeyError:
            root = self._orphans.replace(txn, self.sb.orphans, ino, payload)
        self._set_orphans_root(txn, root)

    def remove_orphan(self, txn: Txn, ino: int) -> None:
        """The work noted for `ino` is done. The list's last leaf stays when it empties:
        every unlink of a file still looked up adds an orphan that its forget removes,
        and the superblock then need not change for either."""
        try:        # a delete refuses an absent key before it changes anything
            root = self._orphans.delete(txn, self.sb.orphans, ino, keep_root=True)
        except KeyError:
            return
        self._set_orphans_root(txn, root)

    def _set_orphans_root(self, txn: Txn, root: int) -> None:
        if root != self.sb.orphans:     # else the superblock need not be journaled
            self.sb.orphans = root
            self.save_superblock(txn)

    def orphans(self) -> list[tuple[int, int]]:
        """(ino, value) of every orphan."""
        return [(ino, int.from_bytes(value, "little"))
                for ino, value in self._orphans.after(lambda: self.sb.orphans, -1)]

    def orphan_pages(self) -> Iterator[int]:
        """The orphan list's pages (for the full check)."""
        return self._orphans.nodes(self.sb.orphans)

    # --- room ---------------------------------------------------------------------------

    def free_pages(self) -> int:
        """Pages an allocation could still get (the slack and headroom included)."""
        return self.pool.free_pages()

    def data_room(self, npages: int) -> bool:
        """May file data take `npages` more pages?"""
        return self.pool.free_pages() - npages >= SLACK_PAGES + REMOVAL_RESERVE + self.headroom

    def data_floor(self) -> int:
        """Free pages file data leaves alone."""
        return SLACK_PAGES + REMOVAL_RESERVE + self.headroom
