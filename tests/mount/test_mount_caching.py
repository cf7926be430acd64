"""The kernel's caches of entries and attributes, which the adapter lets it keep for
long (`guestfs.fuse_ops.ATTR_TIMEOUT`): whatever the daemon changes, a stat right
afterwards shows it, because every change arrives as a request of this kernel and the
kernel drops what that request may change (atime after a read, readdir or readlink,
times and size after a write, the counts and ctime of the inodes a name change
touches)."""

from __future__ import annotations

import mmap
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

OLD_NS = 1_000_000_000_000_000_000          # 2001: older than any mtime made below


def _age(path: Path) -> None:
    """Make atime not newer than mtime, so that relatime moves it at the next read."""
    os.utime(path, ns=(OLD_NS, OLD_NS + 1))


def test_a_read_moves_atime_and_a_stat_sees_it(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"data")
    os.stat(f)                                 # attributes cached
    _age(f)
    os.stat(f)
    before = time.time_ns()
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)  # a read that surely reaches the daemon
    try:
        buf = mmap.mmap(-1, 4096)
        os.readv(fd, [buf])
    finally:
        os.close(fd)
    assert os.stat(f).st_atime_ns >= before


def test_a_readdir_moves_the_directorys_atime(workdir: Path) -> None:
    d = workdir / "d"
    d.mkdir()
    (d / "x").touch()
    _age(d)
    os.stat(d)
    before = time.time_ns()
    assert os.listdir(d) == ["x"]
    assert os.stat(d).st_atime_ns >= before


def test_a_readlink_and_a_walk_through_a_link_move_its_atime(workdir: Path) -> None:
    (workdir / "target").write_bytes(b"data")
    link = workdir / "link"
    os.symlink("target", link)
    for use in (os.readlink, lambda p: p.read_bytes()):
        os.utime(link, ns=(OLD_NS, OLD_NS + 1), follow_symlinks=False)
        os.lstat(link)                         # attributes cached
        before = time.time_ns()
        use(link)
        assert os.lstat(link).st_atime_ns >= before


def test_writes_show_in_size_blocks_and_times(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"")
    first = os.stat(f)
    with open(f, "r+b") as out:
        out.write(b"x" * 10000)
    st = os.stat(f)
    assert st.st_size == 10000 and st.st_blocks >= 24 and st.st_mtime_ns >= first.st_mtime_ns


def test_a_shared_mapping_written_back_moves_mtime(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"\0" * 8192)
    _age(f)
    os.stat(f)
    before = time.time_ns()
    with open(f, "r+b") as out, mmap.mmap(out.fileno(), 8192) as m:
        m[:5] = b"hello"
        m.flush()
    assert os.stat(f).st_mtime_ns >= before and f.read_bytes()[:5] == b"hello"


def test_name_changes_show_in_every_inode_they_touch(workdir: Path) -> None:
    a, b = workdir / "a", workdir / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    os.link(a, workdir / "a2")
    assert os.stat(a).st_nlink == 2
    fd = os.open(b, os.O_RDONLY)
    try:
        os.stat(b)
        os.rename(a, b)                        # b's inode loses its last name
        assert os.fstat(fd).st_nlink == 0 and os.stat(b).st_nlink == 2
    finally:
        os.close(fd)
    os.unlink(workdir / "a2")
    assert os.stat(b).st_nlink == 1
    sub = workdir / "sub"
    sub.mkdir()
    links = os.stat(workdir).st_nlink
    (sub / "inner").mkdir()
    os.rename(sub / "inner", workdir / "inner")
    assert os.stat(workdir).st_nlink == links + 1 and os.stat(sub).st_nlink == 2


def test_a_name_looked_up_missing_appears_when_made(workdir: Path) -> None:
    f = workdir / "later"
    assert not f.exists()                      # a negative entry, cached
    f.write_bytes(b"here")
    assert f.exists() and f.read_bytes() == b"here"
    os.unlink(f)
    assert not f.exists()


def test_xattrs_and_acls_show_in_ctime_and_mode(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    _age(f)
    first = os.stat(f)
    os.setxattr(f, "user.k", b"v")
    assert os.stat(f).st_ctime_ns > first.st_ctime_ns
    done = subprocess.run(["setfacl", "-m", "g::rwx", os.fspath(f)], capture_output=True,
                          text=True)
    if done.returncode == 127 or "not found" in done.stderr:
        pytest.skip("setfacl is not installed")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o670


def test_o_trunc_shows_an_empty_file(workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"x" * 5000)
    assert os.stat(f).st_size == 5000
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    st = os.stat(f)
    assert st.st_size == 0 and st.st_blocks == 0

