"""Directory contents: name -> inode number, with stable readdir cookies.

A readdir offset (cookie) must stay valid while entries come and go, and resuming from
it must not cost a scan of the directory. Entries are kept in cookie order in parallel
append-only sequences (names, cookies, inode numbers); a removed entry leaves a
tombstone (its name set to None) so that positions do not move, and resuming is a
binary search over the cookies. Tombstones are squeezed out once they outnumber the
live entries, which keeps the cost amortised O(1) per removal.

Cookies: 1 is ``.``, 2 is ``..`` (both answered by the filesystem, not stored here),
entries get 3, 4, ... in the order they were added, and a cookie is never reused while
the directory lives (the next cookie is handed over across kexec with the entries).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

DOT_COOKIE = 1
DOTDOT_COOKIE = 2
FIRST_COOKIE = 3

# Compaction waits for this many tombstones, so small directories never churn.
_MIN_DEAD_TO_COMPACT = 32


class Directory:
    """The entries of one directory (without ``.`` and ``..``)."""

    __slots__ = ("_cookies", "_dead", "_epoch", "_index", "_inos", "_names", "_next_cookie")

    def __init__(self) -> None:
        self._index: dict[bytes, int] = {}        # name -> cookie
        self._names: list[bytes | None] = []      # cookie order; None marks a removed entry
        self._cookies = array("Q")                # ascending
        self._inos = array("Q")
        self._dead = 0
        self._next_cookie = FIRST_COOKIE
        self._epoch = 0                           # bumped when positions move (compaction)

    # --- queries ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: bytes) -> bool:
        return name in self._index

    @property
    def next_cookie(self) -> int:
        """The cookie the next added entry will get."""
        return self._next_cookie

    def names(self) -> Iterator[bytes]:
        """The names of the entries, in no particular order."""
        return iter(self._index)

    def lookup(self, name: bytes) -> int | None:
        """The inode number `name` refers to, or None."""
        cookie = self._index.get(name)
        if cookie is None:
            return None
        return self._inos[self._position(cookie)]

    def entries_after(self, after: int, before: int | None = None
                      ) -> Iterator[tuple[int, bytes, int]]:
        """(cookie, name, ino) of the entries with a cookie above `after` and below
        `before` (None: no bound), in cookie order.

        Safe to interleave with changes to the directory: entries removed before they
        are reached are not seen. A walk that passes `before` = `next_cookie` as it was
        when the walk began never sees an entry added since, so it ends even while
        entries are renamed away and back (each such rename adds a new cookie).
        """
        epoch = self._epoch
        i = bisect_right(self._cookies, after)
        while True:
            if epoch != self._epoch:
                epoch = self._epoch
                i = bisect_right(self._cookies, after)
            if i >= len(self._names):
                return
            name = self._names[i]
            cookie, ino = self._cookies[i], self._inos[i]
            if before is not None and cookie >= before:
                return
            i += 1
            if name is not None:
                after = cookie
                yield cookie, name, ino

    def export(self) -> list[tuple[bytes, int, int]]:
        """Every entry as (name, ino, cookie), in cookie order: what a handover keeps."""
        return [(name, ino, cookie)
                for name, cookie, ino in zip(self._names, self._cookies, self._inos, strict=True)
                if name is not None]

    # --- changes ---------------------------------------------------------------

    def add(self, name: bytes, ino: int) -> int:
        """Add a new entry and return its cookie; ValueError if `name` is taken."""
        if name in self._index:
            raise ValueError(f"entry {name!r} exists")
        cookie = self._next_cookie
        self._next_cookie += 1
        self._append(name, ino, cookie)
        return cookie

    def remove(self, name: bytes) -> int:
        """Remove an entry and return the inode number it referred to; KeyError if absent."""
        i = self._position(self._index.pop(name))
        self._names[i] = None
        self._dead += 1
        ino = self._inos[i]
        if self._dead >= _MIN_DEAD_TO_COMPACT and self._dead > len(self._index):
            self._compact()
        return ino

    def replace(self, name: bytes, ino: int) -> int:
        """Point an existing entry at another inode, keeping its cookie; returns the old ino.

        A rename over an existing name uses this, so the name keeps its place in an
        ongoing readdir.
        """
        i = self._position(self._index[name])
        old = self._inos[i]
        self._inos[i] = ino
        return old

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[bytes, int, int]],
                     next_cookie: int) -> Directory:
        """Rebuild a directory from (name, ino, cookie) triples, as `export` gave them.

        ValueError if the cookies are not strictly ascending, not below `next_cookie`,
        below `FIRST_COOKIE`, or if a name repeats.
        """
        d = cls()
        last = FIRST_COOKIE - 1
        for name, ino, cookie in entries:
            if cookie <= last or name in d._index:
                raise ValueError(f"directory entry {name!r}: cookie {cookie} out of order "
                                 "or name repeated")
            d._append(name, ino, cookie)
            last = cookie
        if next_cookie <= last:
            raise ValueError(f"next cookie {next_cookie} is not above the last entry's {last}")
        d._next_cookie = next_cookie
        return d

    # --- internals -------------------------------------------------------------

    def _append(self, name: bytes, ino: int, cookie: int) -> None:
        self._index[name] = cookie
        self._names.append(name)
        self._cookies.append(cookie)
        self._inos.append(ino)

    def _position(self, cookie: int) -> int:
        i = bisect_left(self._cookies, cookie)
        assert self._cookies[i] == cookie, "directory index out of step"
        return i

    def _compact(self) -> None:
        live = [i for i, name in enumerate(self._names) if name is not None]
        self._names = [self._names[i] for i in live]
        self._cookies = array("Q", (self._cookies[i] for i in live))
        self._inos = array("Q", (self._inos[i] for i in live))
        self._dead = 0
        self._epoch += 1
