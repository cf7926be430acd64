"""The full check of a filesystem in the arena (`guestfs fsck`, `Filesystem.check`).

A mount reads only what it needs and checks each page the first time it reads it; this
reads everything: every record, directory, page map, blob and the orphan list, checks
each structure and the links between them (names, link counts, parents, sizes), and
accounts for every page the pool holds: each belongs to exactly one structure, and
every page a structure uses is the pool's. It changes nothing.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Iterator

import numpy as np

from guestfs.inode import ROOT_INO, Inode
from guestfs.store import blob
from guestfs.store.page import CorruptPage
from guestfs.store.store import ORPHAN_FREE, MetaStore


def check(store: MetaStore) -> list[str]:
    """Every problem found, as sentences; empty when the filesystem is sound."""
    return _Check(store).run()


class _Check:
    def __init__(self, store: MetaStore) -> None:
        self.store = store
        self.problems: list[str] = []
        self.inodes: dict[int, Inode] = {}
        self.blocks: list[tuple[int, int, str]] = []      # (pfn, order, what)

    def run(self) -> list[str]:
        self.store.pages.forget_all()
        self.store.forget_xattrs()
        self._structures()
        if ROOT_INO not in self.inodes or not self.inodes[ROOT_INO].is_dir:
            self.problem("the root directory is missing")
            return self.problems
        refs, subdirs = self._directories()
        orphans = self._orphans()
        for inode in self.inodes.values():
            self._inode(inode, refs.get(inode.ino, 0), subdirs.get(inode.ino, 0), orphans)
        self._pages()
        return self.problems

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def own(self, pfns: Iterator[int] | list[int], what: str, order: int = 0) -> None:
        self.blocks.extend((pfn, order, what) for pfn in pfns)

    # --- what the store itself holds ---------------------------------------------------

    def _structures(self) -> None:
        store = self.store
        self.own([store.sb_pfn], "the superblock")
        self.own(store.journal.own_pages(), "the journal")
        try:
            self.own(list(store.itable.pages_used()), "the inode table")
            self.own(list(store.orphan_pages()), "the orphan list")
            inos = list(store.itable.inos(lambda e: self.problem(str(e))))
        except CorruptPage as e:
            self.problem(str(e))
            return
        for ino in inos:
            try:
                inode = store.itable.get(ino)
            except CorruptPage as e:
                self.problem(str(e))
                continue
            if inode is not None:
                self.inodes[ino] = inode
        if len(self.inodes) != store.sb.inode_count:
            self.problem(f"the superblock counts {store.sb.inode_count} inodes; the inode "
                         f"table holds {len(self.inodes)}")
        late = [ino for ino in self.inodes if ino >= store.sb.next_ino]
        if late:
            self.problem(f"inode {late[0]} is not below the next inode number "
                         f"{store.sb.next_ino}")

    def _orphans(self) -> set[int]:
        try:
            listed = self.store.orphans()
        except CorruptPage as e:
            self.problem(str(e))
            return set()
        for ino, value in listed:
            if ino not in self.inodes:
                self.problem(f"the orphan list names inode {ino}, which does not exist")
            elif value != ORPHAN_FREE and value < self.inodes[ino].size:
                self.problem(f"the orphan list truncates inode {ino} to {value}, below its "
                             f"size {self.inodes[ino].size}")
        return {ino for ino, _ in listed}

    # --- directories -------------------------------------------------------------------

    def _directories(self) -> tuple[Counter, Counter]:
        refs: Counter = Counter()
        subdirs: Counter = Counter()
        dirs = self.store.dirs
        for d in [i for i in self.inodes.values() if i.is_dir]:
            count = 0
            try:
                self.own(list(dirs.nodes(d)), f"directory {d.ino}")
                for cookie, name, ino, ftype in dirs.entries(d):
                    count += 1
                    self._entry(d, cookie, name, ino, ftype, refs, subdirs)
            except CorruptPage as e:
                self.problem(f"directory {d.ino}: {e}")
                continue
            if count != d.entries:
                self.problem(f"directory {d.ino} counts {d.entries} entries but holds {count}")
        return refs, subdirs

    def _entry(self, d: Inode, cookie: int, name: bytes, ino: int, ftype: int,
               refs: Counter, subdirs: Counter) -> None:
        child = self.inodes.get(ino)
        base = self.store.dirs.base_cookie(name)
        if not base <= cookie < base + 16:
            self.problem(f"entry {name!r} in {d.ino} is filed under the wrong cookie")
        if child is None:
            self.problem(f"entry {name!r} in {d.ino} names missing inode {ino}")
            return
        if ftype != stat.S_IFMT(child.mode) >> 12:
            self.problem(f"entry {name!r} in {d.ino} has the type of another file")
        refs[ino] += 1
        if child.is_dir:
            subdirs[d.ino] += 1
            if child.parent != d.ino:
                self.problem(f"directory {ino} is in {d.ino} but its '..' is {child.parent}")

    # --- each inode ---------------------------------------------------------------------

    def _inode(self, inode: Inode, refs: int, subdirs: int, orphans: set[int]) -> None:
        ino = inode.ino
        if inode.is_dir:
            expected = 2 + subdirs if ino == ROOT_INO or refs == 1 else 0
            if refs > 1 or (ino == ROOT_INO and refs):
                self.problem(f"directory {ino} has {refs} names")
        else:
            expected = refs
        if inode.nlink != expected:
            self.problem(f"inode {ino} has nlink {inode.nlink}, expected {expected}")
        if not expected and ino not in orphans:
            self.problem(f"inode {ino} is unreachable and not on the orphan list")
        try:
            self._owned(inode)
        except CorruptPage as e:
            self.problem(f"inode {ino}: {e}")

    def _owned(self, inode: Inode) -> None:
        store = self.store
        if inode.xattr:
            self.own(list(blob.chain_pages(store.pages, inode.xattr)), f"inode {inode.ino}'s xattrs")
            store.xattrs(inode)
        if inode.is_symlink:
            if inode.target_blob:
                self.own(list(blob.chain_pages(store.pages, inode.target_blob)),
                         f"symlink {inode.ino}'s target")
            store.target(inode)
        if inode.is_reg:
            self.own(list(store.maps.meta_pages(inode)), f"inode {inode.ino}'s page map")
            held = 0
            for pfn, order in store.maps.blocks(inode):
                self.blocks.append((pfn, order, f"inode {inode.ino}'s data"))
                held += 1 << order
            if held != inode.npages:
                self.problem(f"inode {inode.ino} counts {inode.npages} pages but maps {held}")

    # --- every page once, and only the pool's --------------------------------------------

    def _pages(self) -> None:
        npages = self.store.arena.npages
        used = np.zeros(npages + 1, dtype=np.int64)     # a difference array of coverage
        for pfn, order, what in self.blocks:
            if not (0 < pfn and pfn + (1 << order) <= npages):
                self.problem(f"{what} uses page {pfn}, outside the arena")
                continue
            used[pfn] += 1
            used[pfn + (1 << order)] -= 1
        coverage = np.cumsum(used[:-1])
        twice = np.flatnonzero(coverage > 1)
        if len(twice):
            self.problem(f"page {int(twice[0])} is used twice ({len(twice)} pages in all)")
        held = np.zeros(npages + 1, dtype=np.int64)
        for heads, order in self.store.pool.blocks():
            np.add.at(held, heads, 1)
            np.add.at(held, heads + (1 << order), -1)
        pool = np.cumsum(held[:-1]) > 0
        leaked = np.flatnonzero(pool & (coverage == 0))
        if len(leaked):
            self.problem(f"{len(leaked)} pages of the pool belong to nothing (the first is "
                         f"page {int(leaked[0])}): leaked")
        foreign = np.flatnonzero(~pool & (coverage > 0))
        if len(foreign):
            pfn = int(foreign[0])
            owner = next(w for p, o, w in self.blocks if p <= pfn < p + (1 << o))
            self.problem(f"{owner} uses page {pfn}, which is not the pool's "
                         f"({len(foreign)} pages in all)")
