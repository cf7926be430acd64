"""Directories (guestfs.store.directory): cookies derived from names, stable while a
name exists and given back when it returns; names that share a hash; resuming a walk
from any cookie; against a dict model."""

from __future__ import annotations

import errno

import pytest
from conftest_machine import BootKernel, boot_kernel, examples, machine_env, new_fs, unique_name  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestfs.errors import FsError
from guestfs.filesystem import Ctx, Filesystem
from guestfs.inode import ROOT_INO
from guestfs.store.directory import FIRST_COOKIE, INDEX_BITS, Directories

ROOT = Ctx(uid=0, gid=0)


@pytest.fixture
def fs(boot_kernel: BootKernel) -> Filesystem:
    return new_fs(boot_kernel(unique_name("dir"), memory=32 << 20))


def cookies(fs: Filesystem, ino: int = ROOT_INO) -> dict[bytes, int]:
    return {name: cookie for cookie, name, _ in fs.readdir(ino, 2)}


def test_cookies_come_from_the_names_and_stay(fs: Filesystem) -> None:
    for name in (b"a", b"b", b"c"):
        fs.create(ROOT_INO, name, 0o644, ROOT)
    first = cookies(fs)
    assert all(c >= FIRST_COOKIE for c in first.values())
    assert first[b"a"] == fs.store.dirs.base_cookie(b"a")
    fs.unlink(ROOT_INO, b"b", ROOT)
    fs.create(ROOT_INO, b"d", 0o644, ROOT)
    fs.create(ROOT_INO, b"b", 0o644, ROOT)            # back: the same cookie
    assert {k: v for k, v in cookies(fs).items() if k != b"d"} == first


def test_another_filesystem_hashes_names_differently(boot_kernel: BootKernel) -> None:
    a = new_fs(boot_kernel(unique_name("dir"), memory=32 << 20))
    b = new_fs(boot_kernel(unique_name("dir"), memory=32 << 20))
    assert a.store.dirs.base_cookie(b"name") != b.store.dirs.base_cookie(b"name")


def test_names_that_share_a_hash_get_the_next_index(fs: Filesystem,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Directories, "base_cookie", lambda self, name: 1000 << INDEX_BITS)
    names = [b"n%d" % i for i in range(1 << INDEX_BITS)]
    for name in names:
        fs.create(ROOT_INO, name, 0o644, ROOT)
    assert sorted(cookies(fs).values()) == list(range(1000 << INDEX_BITS,
                                                      (1000 << INDEX_BITS) + len(names)))
    assert all(fs.lookup(ROOT_INO, name).ino for name in names)
    with pytest.raises(FsError) as full:
        fs.create(ROOT_INO, b"one-too-many", 0o644, ROOT)
    assert full.value.errno == errno.ENOSPC
    fs.unlink(ROOT_INO, b"n3", ROOT)
    fs.create(ROOT_INO, b"one-too-many", 0o644, ROOT)
    assert cookies(fs)[b"one-too-many"] == (1000 << INDEX_BITS) + 3
    assert fs.check() == []


@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 400)), max_size=200))
def test_directory_matches_a_dict(fs: Filesystem, ops: list[tuple[bool, int]]) -> None:
    d = fs.mkdir(ROOT_INO, b"model", 0o755, ROOT)
    model: dict[bytes, int] = {}
    for add, n in ops:
        name = b"entry-%d" % n
        if add and name not in model:
            model[name] = fs.create(d.ino, name, 0o644, ROOT).ino
        elif not add and name in model:
            fs.unlink(d.ino, name, ROOT)
            del model[name]
    listing = list(fs.readdir(d.ino, 2))
    assert {name: inode.ino for _, name, inode in listing} == model
    assert [c for c, _, _ in listing] == sorted(c for c, _, _ in listing)
    for i in range(0, len(listing), 7):                 # resume from any cookie
        assert [(c, n) for c, n, _ in fs.readdir(d.ino, listing[i][0])] == \
            [(c, n) for c, n, _ in listing[i + 1:]]
    assert fs.get(d.ino).entries == len(model)
    for name in list(model):
        fs.unlink(d.ino, name, ROOT)
    fs.rmdir(ROOT_INO, b"model", ROOT)


# --- remembered lookups ------------------------------------------------------------------


def test_remembered_lookups_follow_every_change(fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o40755, ROOT)
    with pytest.raises(FsError):
        fs.lookup(d.ino, b"x")                      # remembered as absent
    x = fs.create(d.ino, b"x", 0o644, ROOT)
    assert fs.lookup(d.ino, b"x") is x
    y = fs.create(d.ino, b"y", 0o644, ROOT)
    fs.rename(d.ino, b"y", d.ino, b"x", 0, ROOT)     # replaces x
    assert fs.lookup(d.ino, b"x") is y
    fs.rename(d.ino, b"x", ROOT_INO, b"moved", 0, ROOT)
    with pytest.raises(FsError):
        fs.lookup(d.ino, b"x")
    assert fs.lookup(ROOT_INO, b"moved") is y
    fs.unlink(ROOT_INO, b"moved", ROOT)
    with pytest.raises(FsError):
        fs.lookup(ROOT_INO, b"moved")


def test_a_rolled_back_change_forgets_what_it_entered(fs: Filesystem) -> None:
    store = fs.store
    root = fs.get(ROOT_INO)
    with pytest.raises(RuntimeError), store.transaction() as txn:
        store.dirs.add(txn, root, b"ghost", 99, 0o100644)
        assert store.dirs.lookup(root, b"ghost") is not None
        raise RuntimeError("the rest of the change failed")
    store.refresh(root)
    assert store.dirs.lookup(root, b"ghost") is None
    with pytest.raises(FsError):
        fs.lookup(ROOT_INO, b"ghost")
