"""The metadata store's structures without the filesystem: journal, radix table,
B+tree, inode records, blobs, each against a plain Python model, on a real booted
machine's arena."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Iterator

import pytest
from conftest_machine import BootKernel, boot_kernel, examples, machine_env, unique_name  # noqa: F401
from helpers.fake_pool import FakePool
from hypothesis import given, settings
from hypothesis import strategies as st

from guestfs.inode import Inode
from guestfs.store import blob
from guestfs.store.btree import MAX_VALUE, BTree
from guestfs.store.journal import STATE_OFFSET, Journal, JournalError, Phase, TxnTooLarge
from guestfs.store.page import CorruptPage, Kind, Pages
from guestfs.store.radix import FANOUT, Radix, RadixRoot
from guestfs.store.records import decode, encode
from kho_backend.units import PAGE_SIZE

MiB = 1 << 20


class Store:
    """Pages, a pool and a journal over a fresh machine."""

    def __init__(self, boot: BootKernel) -> None:
        self.kernel = boot(unique_name("store"), memory=32 * MiB)
        self.pool = FakePool(self.kernel.buddy)
        self.pages = Pages(self.kernel.arena)
        self.journal = Journal.create(self.pages, self.pool, slots=16, entry_pages=1)
        self.baseline = self.pool.nr_pages


@pytest.fixture
def store(boot_kernel: BootKernel) -> Store:
    return Store(boot_kernel)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One machine for the property tests (hypothesis runs many examples on it)."""
    import os

    from kho_backend.boot import boot
    folder = tmp_path_factory.mktemp("store")
    kernels = []

    def make(name: str, **kw: object):
        kernel = boot(name, machine_dir=folder, **kw)
        kernels.append(kernel)
        return kernel
    os.environ.setdefault("GUESTFS_MACHINE_DIR", os.fspath(folder))
    yield Store(make)
    for kernel in kernels:
        kernel.shutdown()


# --- the journal ------------------------------------------------------------------------


def test_a_commit_seals_the_pages_and_a_rollback_restores_them(store: Store) -> None:
    with store.journal.transaction() as txn:
        pfn = txn.new_page(Kind.BLOB, 7)
    before = bytes(store.kernel.arena.view(pfn))
    with pytest.raises(RuntimeError), store.journal.transaction() as txn:
        txn.write(pfn, Kind.BLOB)[100:104] = b"junk"
        data = txn.alloc(0)
        raise RuntimeError("the operation failed half-way")
    assert bytes(store.kernel.arena.view(pfn)) == before
    assert not store.pool.owns(data, 0), "a rolled-back allocation was kept"
    with store.journal.transaction() as txn:
        txn.write(pfn, Kind.BLOB)[100:104] = b"kept"
    assert Pages(store.kernel.arena).read(pfn, Kind.BLOB)[100:104] == b"kept"


def test_frees_wait_for_the_commit(store: Store) -> None:
    with store.journal.transaction() as txn:
        pfn = txn.new_page(Kind.BLOB, 1)
    with pytest.raises(RuntimeError), store.journal.transaction() as txn:
        txn.free(pfn)
        assert store.pool.owns(pfn, 0)
        raise RuntimeError
    assert store.pool.owns(pfn, 0)
    with store.journal.transaction() as txn:
        txn.free(pfn)
    assert not store.pool.owns(pfn, 0)
    assert store.pool.nr_pages == store.baseline


def test_a_transaction_too_large_is_refused_and_rolled_back(store: Store) -> None:
    with store.journal.transaction() as txn:
        pfns = [txn.new_page(Kind.BLOB, 1) for _ in range(20)]
    with pytest.raises(TxnTooLarge), store.journal.transaction() as txn:
        for pfn in pfns:
            txn.write(pfn, Kind.BLOB)[50] = 1
    assert all(store.kernel.arena.view(pfn)[50] == 0 for pfn in pfns)


def test_a_page_that_fails_its_checksum_is_not_trusted(store: Store) -> None:
    with store.journal.transaction() as txn:
        pfn = txn.new_page(Kind.BLOB, 1)
    store.kernel.arena.view(pfn)[2000] ^= 0xFF
    with pytest.raises(CorruptPage, match=f"page {pfn} is corrupt: its blob checksum"):
        Pages(store.kernel.arena).read(pfn, Kind.BLOB)
    with pytest.raises(CorruptPage, match="not a radix"):
        Pages(store.kernel.arena).read(pfn, Kind.RADIX)


class RecordingPool(FakePool):
    """Answers recovery's release_if_owned as the pool stood at the instant of a crash."""

    def __init__(self, pool: FakePool, owned: dict[int, int]) -> None:
        super().__init__(pool.buddy)
        self.owned = dict(owned)
        self.released: list[int] = []

    def release_if_owned(self, pfn: int, order: int) -> bool:
        if self.owned.get(pfn) != order:
            return False
        del self.owned[pfn]
        self.released.append(pfn)
        return True


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4])
def test_recovery_undoes_a_transaction_cut_short(store: Store, steps: int) -> None:
    """A process dies `steps` changes into a transaction: recovery leaves the pages as
    they were before it and releases what it allocated."""
    with store.journal.transaction() as txn:
        a, b = txn.new_page(Kind.BLOB, 1), txn.new_page(Kind.BLOB, 2)
    arena = store.kernel.arena
    before = {p: bytes(arena.view(p)) for p in (a, b)}
    crash: tuple[bytes, dict[int, int]] | None = None

    def snapshot() -> None:
        nonlocal crash
        crash = bytes(arena.view(0, arena.npages)), dict(store.pool.owned)
    with pytest.raises(RuntimeError), store.journal.transaction() as txn:
        changes = [lambda: txn.write(a, Kind.BLOB).__setitem__(slice(16, 20), b"AAAA"),
                   lambda: txn.alloc(0),
                   lambda: txn.write(b, Kind.BLOB).__setitem__(slice(16, 20), b"BBBB"),
                   lambda: txn.free(a)]
        for change in changes[:steps]:
            change()
        snapshot()
        raise RuntimeError("SIGKILL")
    assert crash is not None
    image, owned = crash
    arena.view(0, arena.npages)[:] = image                  # the arena as the process left it
    pool = RecordingPool(store.pool, owned)
    journal = Journal.open(Pages(arena), pool, store.journal.header_pfn)
    done = journal.recover()
    assert done.phase is (Phase.ACTIVE if steps else Phase.IDLE)
    assert {p: bytes(arena.view(p)) for p in (a, b)} == before
    assert len(pool.released) == (steps >= 2)
    assert journal.recover().phase is Phase.IDLE


def test_recovery_finishes_the_frees_of_a_committed_transaction(store: Store) -> None:
    with store.journal.transaction() as txn:
        pfn = txn.new_page(Kind.BLOB, 1)
    owned = dict(store.pool.owned)
    arena = store.kernel.arena
    real_free = store.pool.free
    image = None

    def die_before_freeing(p: int, order: int = 0) -> None:
        nonlocal image
        image = bytes(arena.view(0, arena.npages))
        raise RuntimeError("SIGKILL")
    store.pool.free = die_before_freeing
    with pytest.raises(RuntimeError), store.journal.transaction() as txn:
        txn.free(pfn)
    store.pool.free = real_free
    arena.view(0, arena.npages)[:] = image
    pool = RecordingPool(store.pool, owned)
    done = Journal.open(Pages(arena), pool, store.journal.header_pfn).recover()
    assert done.phase is Phase.COMMITTING and pool.released == [pfn]


def test_a_committing_transaction_that_freed_a_page_it_changed_is_finished(
        store: Store) -> None:
    """A truncate changes a page array, then frees it with the data pages: a process
    that died while those frees were done left an undo record of a page the pool no
    longer owns. The records of a committing transaction are not used; recovery must
    finish its frees, not refuse the journal (the mount would never work again)."""
    with store.journal.transaction() as txn:
        array, data = txn.new_page(Kind.PAGE_ARRAY, 7), txn.alloc(0)
    owned = dict(store.pool.owned)
    arena, journal = store.kernel.arena, store.journal
    real_free = store.pool.free
    image = None

    def die_at_the_second_free(pfn: int, order: int = 0) -> None:
        nonlocal image
        if pfn == array:
            real_free(pfn, order)
            owned.pop(pfn, None)
            return
        image = bytes(arena.view(0, arena.npages))
        raise RuntimeError("SIGKILL")
    store.pool.free = die_at_the_second_free
    with pytest.raises(RuntimeError), journal.transaction() as txn:
        txn.write(array, Kind.PAGE_ARRAY)[16:20] = b"\0\0\0\0"
        txn.free(array)
        txn.free(data)
    store.pool.free = real_free
    assert image is not None
    arena.view(0, arena.npages)[:] = image
    pool = RecordingPool(store.pool, owned)
    done = Journal.open(Pages(arena), pool, journal.header_pfn).recover()
    assert done.phase is Phase.COMMITTING and pool.released == [data]


@pytest.mark.parametrize("cut", ["flipped", "died-after-the-seal"])
def test_a_sealed_transaction_marked_active_is_finished_not_undone(store: Store,
                                                                   cut: str) -> None:
    """The state word is the one store no checksum covers: a bit flipped from idle to
    active must not undo the last committed (acknowledged) transaction; a process that
    died between the seal and the commit point may have it either way, and gets it
    finished (its frees done)."""
    with store.journal.transaction() as txn:
        a, gone = txn.new_page(Kind.BLOB, 1), txn.new_page(Kind.BLOB, 2)
    owned = dict(store.pool.owned)
    arena, journal = store.kernel.arena, store.journal
    image = None
    real_set_state = journal._set_state

    def die_at_the_commit_point(seq: int, phase: Phase) -> None:
        nonlocal image
        if phase is not Phase.ACTIVE:
            image = bytearray(arena.view(0, arena.npages))
            raise RuntimeError("SIGKILL")
        real_set_state(seq, phase)
    if cut == "died-after-the-seal":
        journal._set_state = die_at_the_commit_point
    with contextlib.suppress(RuntimeError), journal.transaction() as txn:
        txn.write(a, Kind.BLOB)[16:20] = b"AAAA"
        txn.free(gone)
    journal._set_state = real_set_state
    if image is None:                       # committed: flip the phase to active
        image = bytearray(arena.view(0, arena.npages))
        state = journal.header_pfn * PAGE_SIZE + STATE_OFFSET
        image[state] |= Phase.ACTIVE
    arena.view(0, arena.npages)[:] = image
    committed = bytes(arena.view(a))
    pool = RecordingPool(store.pool, owned)
    done = Journal.open(Pages(arena), pool, journal.header_pfn).recover()
    assert done.phase is Phase.COMMITTING and done.undone == 0
    assert bytes(arena.view(a)) == committed and bytes(arena.view(a))[16:20] == b"AAAA"
    assert pool.released == [gone]


class ImageArena:
    """A copy of an arena, for recovering an instant's image while the machine goes on."""

    def __init__(self, image: bytearray) -> None:
        self._buf = memoryview(image)
        self.npages = len(image) // PAGE_SIZE

    def view(self, pfn: int, npages: int = 1) -> memoryview:
        return self._buf[pfn * PAGE_SIZE:(pfn + npages) * PAGE_SIZE]


def test_a_kill_after_the_journaled_pages_are_sealed_keeps_no_unsealed_page(
        store: Store) -> None:
    """The commit seals its pages one by one, and recovery finishes an active
    transaction once every page it journaled is sealed. A kill at that first instant
    (the last journaled page just sealed) of a B+tree split must find the split's new
    leaf sealed too: the names the split moved there were acknowledged long before, and
    a finished transaction must not leave them on a page that fails its checksum."""
    tree, root, acked = BTree(store.pages, 1), 0, set()
    for key in range(0, 40_000, 40):                # a tree of two levels
        with store.journal.transaction() as txn:
            root = tree.insert(txn, root, key, b"v" * 50)
        acked.add(key)
    arena, journal = store.kernel.arena, store.journal
    real_seal = store.pages.seal
    sealed: set[int] = set()
    undo: set[int] = set()
    instant: tuple[bytearray, dict[int, int]] | None = None

    def seal(pfn: int) -> None:
        nonlocal instant
        real_seal(pfn)
        sealed.add(pfn)
        if instant is None and undo <= sealed:      # the last journaled page: a kill here
            instant = bytearray(arena.view(0, arena.npages)), dict(store.pool.owned)
    splits = 0
    store.pages.seal = seal                         # type: ignore[method-assign]
    try:
        for key in range(1, 40_000, 40):
            sealed.clear()
            instant = None
            with journal.transaction() as txn:
                root = tree.insert(txn, root, key, b"w" * 50)
                undo = set(txn._undo)
                split = bool(txn._dirty - undo)
            if split:
                assert instant is not None
                splits += 1
                image, owned = instant
                pages = Pages(ImageArena(image))    # type: ignore[arg-type]
                done = Journal.open(pages, RecordingPool(store.pool, owned),
                                    journal.header_pfn).recover()
                try:
                    kept = {k for k, _ in BTree(pages, 1).after(lambda: root, -1)}
                except CorruptPage as e:
                    pytest.fail(f"recovery took split {splits} as "
                                f"{done.phase.name.lower()} and left acknowledged names "
                                f"on a page that fails its checksum: {e}")
                assert acked <= kept
            acked.add(key)
            if splits == 12:
                break
    finally:
        del store.pages.seal
    assert splits >= 5


@pytest.mark.parametrize("target,why", [
    ("outside", "not a metadata page of the pool"),
    ("journal", "not a metadata page of the pool"),
    ("data", "holds no sealed copy of it"),
    ("other-metadata", "holds no sealed copy of it"),
])
def test_recovery_refuses_a_journal_that_names_foreign_pages(store: Store, target: str,
                                                             why: str) -> None:
    """A torn or hostile journal must not make recovery overwrite pages it does not own:
    it is refused before any page changes."""
    with store.journal.transaction() as txn:
        a, other = txn.new_page(Kind.BLOB, 1), txn.new_page(Kind.BTREE, 2)
        data = txn.alloc(0)                     # a page of file data: the pool's too
        arena = store.kernel.arena
        arena.view(data)[:] = bytes(range(256)) * 16
    image = None
    with pytest.raises(RuntimeError), store.journal.transaction() as txn:
        txn.write(a, Kind.BLOB)[16:20] = b"AAAA"
        image = bytearray(arena.view(0, arena.npages))
        raise RuntimeError("SIGKILL")
    journal = store.journal
    bad = {"journal": journal.slots[0], "data": data, "other-metadata": other}.get(target)
    if bad is None:
        bad = store.pool.buddy.alloc(0)
    entry = journal.entry_pages[0] * PAGE_SIZE          # the first entry: UNDO of `a`
    image[entry:entry + 8] = bad.to_bytes(8, "little")
    arena.view(0, arena.npages)[:] = image
    before = bytes(arena.view(0, arena.npages))
    with pytest.raises(JournalError, match=why):
        Journal.open(Pages(arena), store.pool, journal.header_pfn).recover()
    assert bytes(arena.view(0, arena.npages)) == before


# --- the radix table ------------------------------------------------------------------------

KEYS = st.one_of(st.integers(0, 3 * FANOUT), st.integers(0, 1 << 40), st.integers(0, 1 << 62))


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.tuples(KEYS, st.integers(0, 1 << 40)), max_size=40))
def test_radix_matches_a_dict(shared: Store, ops: list[tuple[int, int]]) -> None:
    radix, table, model = Radix(shared.pages, 5), RadixRoot(), {}
    for key, value in ops:
        with shared.journal.transaction() as txn:
            radix.set(txn, table, key, value)
        if value:
            model[key] = value
        else:
            model.pop(key, None)
        assert radix.get(table, key) == value
    assert list(radix.items(table)) == sorted(model.items())
    if model:
        middle = sorted(model)[len(model) // 2]
        assert list(radix.items(table, middle)) == sorted(
            (k, v) for k, v in model.items() if k >= middle)
    for key in model:
        with shared.journal.transaction() as txn:
            radix.set(txn, table, key, 0)
    assert table.root == 0 and list(radix.items(table)) == []
    assert shared.pool.nr_pages == shared.baseline, "emptied nodes were not freed"


# --- the B+tree -----------------------------------------------------------------------------

VALUES = st.one_of(st.binary(max_size=40), st.binary(min_size=MAX_VALUE - 20,
                                                     max_size=MAX_VALUE))


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "put", "put", "delete"]),
                          st.integers(0, 600), VALUES), max_size=300))
def test_btree_matches_a_dict(shared: Store, ops: list[tuple[str, int, bytes]]) -> None:
    tree, root, model = BTree(shared.pages, 9), 0, {}
    for op, key, value in ops:
        with shared.journal.transaction() as txn:
            if op == "put" and key in model:
                root = tree.replace(txn, root, key, value)
                model[key] = value
            elif op == "put":
                root = tree.insert(txn, root, key, value)
                model[key] = value
            elif key in model:
                root = tree.delete(txn, root, key)
                del model[key]
            else:
                with pytest.raises(KeyError):
                    tree.delete(txn, root, key)
    assert list(tree.after(lambda: root, -1)) == sorted(model.items())
    for key in range(0, 601, 37):
        assert tree.get(root, key) == model.get(key)
        assert tree.range(root, key, key + 50) == sorted(
            (k, v) for k, v in model.items() if key <= k < key + 50)
    assert tree.count(root) == len(model)
    with shared.journal.transaction() as txn:
        tree.free_all(txn, root)
    assert shared.pool.nr_pages == shared.baseline


def test_btree_deletes_free_the_pages(store: Store) -> None:
    tree, root = BTree(store.pages, 1), 0
    for key in range(3000):
        with store.journal.transaction() as txn:
            root = tree.insert(txn, root, key * 7919 % 100_003, b"v" * 50)
    assert len(list(tree.nodes(root))) > 10
    for key in range(3000):
        with store.journal.transaction() as txn:
            root = tree.delete(txn, root, key * 7919 % 100_003)
    assert root == 0 and store.pool.nr_pages == store.baseline


def test_btree_walk_sees_each_key_once_while_the_tree_changes(store: Store) -> None:
    tree = BTree(store.pages, 1)
    root = 0
    for key in range(0, 4000, 2):
        with store.journal.transaction() as txn:
            root = tree.insert(txn, root, key, b"x" * 30)
    seen = []
    for key, _ in tree.after(lambda: root, -1):
        seen.append(key)
        with store.journal.transaction() as txn:       # splits and frees under the walk
            root = tree.insert(txn, root, key + 1, b"y" * 30)
            if key + 2 < 4000:
                root = tree.delete(txn, root, key + 2)
    assert seen == sorted(set(seen)) and 0 in seen


# --- inode records and blobs ----------------------------------------------------------------

TIME = st.integers(-(1 << 63) * 10**9, ((1 << 63) - 1) * 10**9 + 999_999_999)


@settings(max_examples=examples(200), deadline=None)
@given(st.sampled_from([stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFIFO]),
       TIME, TIME, TIME, st.integers(0, (1 << 63) - 1), st.binary(min_size=1, max_size=80),
       st.lists(st.integers(1, (1 << 32) - 1), max_size=6))
def test_records_round_trip(kind: int, a: int, m: int, c: int, size: int, target: bytes,
                            pfns: list[int]) -> None:
    inode = Inode(ino=77, mode=kind | 0o4751, uid=(1 << 32) - 1, gid=3, nlink=65000,
                  atime_ns=a, mtime_ns=m, ctime_ns=c, generation=5, size=size, xattr=99)
    if kind == stat.S_IFREG:
        inode.inline, inode.npages = tuple(pfns), len(pfns)
    elif kind == stat.S_IFDIR:
        inode.tree, inode.entries, inode.parent = 1234, 56, 8
    elif kind == stat.S_IFLNK:
        inode.size = len(target)
        if len(target) <= 40:
            inode.target = target
        else:
            inode.target_blob = 4321
    else:
        inode.rdev = 0x1234
    assert repr(decode(encode(inode), 77, 5)) == repr(inode)


def test_a_record_for_another_inode_is_refused() -> None:
    inode = Inode(ino=3, mode=stat.S_IFREG, uid=0, gid=0, nlink=1, atime_ns=0, mtime_ns=0,
                  ctime_ns=0)
    with pytest.raises(CorruptPage, match="says it is inode 3"):
        decode(encode(inode), 4, 0)
    assert decode(bytes(128), 4, 0) is None


@pytest.mark.parametrize("size", [0, 1, 4072, 4073, 100_000])
def test_blobs_round_trip_and_free(store: Store, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"t" * (size % 256)
    with store.journal.transaction() as txn:
        first = blob.write(txn, data, 3)
    assert blob.read(store.pages, first) == data
    with store.journal.transaction() as txn:
        blob.free(txn, store.pages, first)
    assert store.pool.nr_pages == store.baseline
