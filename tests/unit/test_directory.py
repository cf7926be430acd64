"""Directory: names, stable readdir cookies, resuming, export and import."""

from __future__ import annotations

import pytest
from conftest_machine import python_calls
from hypothesis import given, settings
from hypothesis import strategies as st

from guestfs.directory import FIRST_COOKIE, Directory


def listing(d: Directory, after: int = 0) -> list[tuple[int, bytes, int]]:
    return list(d.entries_after(after))


def test_entries_get_cookies_from_3_in_insertion_order() -> None:
    d = Directory()
    assert [d.add(n, i) for i, n in enumerate([b"b", b"a", b"c"], 10)] == [3, 4, 5]
    assert listing(d) == [(3, b"b", 10), (4, b"a", 11), (5, b"c", 12)]
    assert d.lookup(b"a") == 11 and d.lookup(b"zz") is None and len(d) == 3
    with pytest.raises(ValueError):
        d.add(b"a", 99)


def test_cookies_are_never_reused_and_offsets_survive_changes() -> None:
    d = Directory()
    for i in range(10):
        d.add(b"f%d" % i, 100 + i)
    first = listing(d)[:4]                     # a reader stopped after cookie 6
    d.remove(b"f4")                            # the next one goes away
    d.remove(b"f0")                            # one already seen goes away
    assert d.add(b"new", 200) == FIRST_COOKIE + 10
    rest = listing(d, first[-1][0])
    assert [n for _, n, _ in rest] == [b"f5", b"f6", b"f7", b"f8", b"f9", b"new"]


def test_replace_keeps_the_cookie() -> None:
    d = Directory()
    d.add(b"x", 1)
    d.add(b"y", 2)
    assert d.replace(b"x", 7) == 1
    assert listing(d) == [(3, b"x", 7), (4, b"y", 2)]


def test_compaction_keeps_cookies_and_a_running_iteration_valid() -> None:
    d = Directory()
    for i in range(1000):
        d.add(b"n%04d" % i, i + 1)
    it = d.entries_after(0)
    seen = [next(it) for _ in range(10)]
    for i in range(5, 995):                    # enough removals to compact
        d.remove(b"n%04d" % i)
    seen += list(it)
    assert [c for c, _, _ in seen] == list(range(3, 13)) + list(range(998, 1003))
    assert len(d._names) < 100                 # tombstones were squeezed out
    assert d.lookup(b"n0999") == 1000


def test_export_and_import_keep_cookies_and_the_next_cookie() -> None:
    d = Directory()
    for i in range(5):
        d.add(b"e%d" % i, i + 50)
    d.remove(b"e1")
    back = Directory.from_entries(d.export(), d.next_cookie)
    assert back.export() == d.export() and back.next_cookie == d.next_cookie == 8
    assert back.add(b"later", 9) == 8


@pytest.mark.parametrize("entries,next_cookie", [
    ([(b"a", 1, 4), (b"b", 2, 3)], 9),         # cookies out of order
    ([(b"a", 1, 3), (b"a", 2, 4)], 9),         # a name twice
    ([(b"a", 1, 2)], 9),                       # cookie of '..'
    ([(b"a", 1, 5)], 5),                       # next cookie not past the last
])
def test_from_entries_refuses_inconsistent_input(entries: list, next_cookie: int) -> None:
    with pytest.raises(ValueError):
        Directory.from_entries(entries, next_cookie)


def test_resuming_in_a_big_directory_does_not_scan_it() -> None:
    """A resume and a lookup cost the same calls in 2 Ki entries as in 200 Ki."""
    def work(n: int) -> int:
        d = Directory()
        for i in range(n):
            d.add(b"file-%06d" % i, i + 2)

        def resumes() -> None:
            for cookie in range(n - 1000, n):
                next(d.entries_after(cookie))
                d.lookup(b"file-%06d" % (cookie % n))
        return python_calls(resumes)
    assert work(200_000) == work(2_000)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=300))
def test_directory_matches_an_ordered_model(ops: list[tuple[bool, int]]) -> None:
    d = Directory()
    model: dict[bytes, tuple[int, int]] = {}   # name -> (cookie, ino); dicts keep order
    for add, k in ops:
        name = b"%d" % k
        if add and name not in model:
            model[name] = (d.add(name, k + 1), k + 1)
        elif not add and name in model:
            assert d.remove(name) == model.pop(name)[1]
    expected = [(c, n, i) for n, (c, i) in model.items()]
    assert listing(d) == expected
    for cut in range(0, d.next_cookie + 1, 7):
        assert listing(d, cut) == [e for e in expected if e[0] > cut]
