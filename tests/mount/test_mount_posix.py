"""POSIX behaviour through a real mount: Python os calls, readdir under change,
permissions as other users, a full arena, killed clients and a failing handler."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import RAISE_IN_HANDLER, Mount, MountFactory, pid_alive

pytestmark = pytest.mark.fuse

NOBODY = 65534
MiB = 1 << 20


def as_nobody(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "--", *argv],
                          capture_output=True, text=True, timeout=30, cwd=cwd)


# --- plain os calls ----------------------------------------------------------------------


def test_files_dirs_links_and_attributes(workdir: Path) -> None:
    d = workdir / "d"
    d.mkdir(mode=0o750)
    f = d / "f"
    f.write_bytes(b"hello world")
    assert f.read_bytes() == b"hello world"
    assert stat.S_IMODE(d.stat().st_mode) == 0o750 & ~_umask()

    os.chmod(f, 0o640)
    os.utime(f, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = f.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)

    os.symlink("f", d / "s")
    assert os.readlink(d / "s") == "f" and (d / "s").read_bytes() == b"hello world"
    os.link(f, d / "h")
    assert f.stat().st_nlink == 2 and (d / "h").stat().st_ino == st.st_ino

    os.rename(d / "h", workdir / "moved")
    assert not (d / "h").exists() and (workdir / "moved").read_bytes() == b"hello world"
    assert sorted(os.listdir(d)) == ["f", "s"]

    os.unlink(workdir / "moved")
    assert f.stat().st_nlink == 1
    with pytest.raises(OSError) as e:
        os.rmdir(d)
    assert e.value.errno == errno.ENOTEMPTY


def test_truncate_append_and_holes(workdir: Path) -> None:
    f = workdir / "sparse"
    with open(f, "wb") as out:
        out.seek(3 * MiB)
        out.write(b"tail")
    data = f.read_bytes()
    assert len(data) == 3 * MiB + 4 and data[:3 * MiB] == bytes(3 * MiB)
    assert f.stat().st_blocks * 512 < MiB  # holes take no pages

    os.truncate(f, 10)
    assert f.read_bytes() == bytes(10)
    with open(f, "ab") as out:
        out.write(b"appended")
    assert f.read_bytes() == bytes(10) + b"appended"
    with open(f, "wb"):  # O_TRUNC
        pass
    assert f.stat().st_size == 0


def test_rename_noreplace_and_exchange(workdir: Path) -> None:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    at_fdcwd, noreplace, exchange = -100, 1, 2
    (workdir / "a").write_text("A")
    (workdir / "b").write_text("B")

    def rename(src: str, dst: str, flags: int) -> int:
        ret = renameat2(at_fdcwd, os.fsencode(workdir / src), at_fdcwd,
                        os.fsencode(workdir / dst), flags)
        return 0 if ret == 0 else ctypes.get_errno()

    assert rename("a", "b", noreplace) == errno.EEXIST
    assert rename("a", "b", exchange) == 0
    assert (workdir / "a").read_text() == "B" and (workdir / "b").read_text() == "A"


def test_special_files(workdir: Path) -> None:
    os.mkfifo(workdir / "fifo")
    assert stat.S_ISFIFO((workdir / "fifo").stat().st_mode)
    os.mknod(workdir / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = (workdir / "null").stat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_error_answers(workdir: Path) -> None:
    cases = [
        (lambda: os.mkdir(workdir / ("x" * 256)), errno.ENAMETOOLONG),
        (lambda: os.listdir(workdir / "missing"), errno.ENOENT),
        (lambda: os.getxattr(workdir, "user.none"), errno.ENODATA),
    ]
    for action, expected in cases:
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == expected


def test_unlink_while_open_keeps_data(workdir: Path) -> None:
    payload = os.urandom(MiB)
    f = workdir / "doomed"
    with open(f, "w+b") as fd:
        fd.write(payload)
        fd.flush()
        os.unlink(f)
        assert not f.exists()
        assert os.fstat(fd.fileno()).st_nlink == 0
        fd.seek(0)
        assert fd.read() == payload
        fd.write(b"more")
    assert not f.exists()


def test_readdir_while_deleting_has_no_duplicates(workdir: Path) -> None:
    names = [f"entry-{i:05d}-{'x' * 40}" for i in range(2000)]
    for name in names:
        (workdir / name).touch()
    deleted: set[str] = set()
    seen: list[str] = []
    with os.scandir(workdir) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n % 7 == 0:  # delete some seen entries and some not yet seen
                for victim in (names[n // 2], names[-1 - n // 3]):
                    if victim not in deleted:
                        (workdir / victim).unlink()
                        deleted.add(victim)
    assert len(seen) == len(set(seen)), "readdir returned an entry twice"
    missing = set(names) - deleted - set(seen)
    assert not missing, f"readdir skipped entries that were never deleted: {sorted(missing)[:5]}"


def test_statfs_figures_are_plausible(shared_mount: Mount) -> None:
    st = os.statvfs(shared_mount.mountpoint)
    assert st.f_bsize == 4096 and st.f_frsize == 4096 and st.f_namemax == 255
    assert 0 < st.f_bfree <= st.f_blocks and st.f_bavail <= st.f_bfree
    assert st.f_blocks * st.f_frsize <= 512 * MiB  # the arena's size bounds it
    assert 0 < st.f_ffree <= st.f_files

    f = shared_mount / "statfs-probe"
    with open(f, "wb") as out:
        out.write(os.urandom(8 * MiB))
        out.flush()
        os.fsync(out.fileno())
    used = st.f_bfree - os.statvfs(shared_mount.mountpoint).f_bfree
    f.unlink()
    assert used >= 8 * MiB // 4096


def test_df_shows_fuse_guestfs(shared_mount: Mount) -> None:
    out = subprocess.run(["df", "-T", os.fspath(shared_mount.mountpoint)],
                         capture_output=True, text=True, check=True).stdout
    assert "fuse.guestfs" in out and f"guestfs-{shared_mount.machine}" in out


# --- other users -------------------------------------------------------------------------


def test_other_users_are_kept_out_without_allow_other(shared_mount: Mount) -> None:
    proc = as_nobody("ls", os.fspath(shared_mount.mountpoint))
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_permissions_as_another_uid(mount_factory: MountFactory) -> None:
    m = mount_factory(options="allow_other")
    os.chmod(m.mountpoint, 0o755)
    secret = m / "secret"
    secret.write_text("root only")
    os.chmod(secret, 0o600)
    assert as_nobody("cat", os.fspath(secret)).returncode != 0
    os.chmod(secret, 0o644)
    assert as_nobody("cat", os.fspath(secret)).stdout == "root only"

    sticky = m / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "roots").write_text("x")
    assert as_nobody("touch", os.fspath(sticky / "mine")).returncode == 0
    assert (sticky / "mine").stat().st_uid == NOBODY
    assert (sticky / "mine").stat().st_gid == NOBODY
    denied = as_nobody("rm", "-f", os.fspath(sticky / "roots"))
    assert denied.returncode != 0 and "Operation not permitted" in denied.stderr
    assert as_nobody("rm", os.fspath(sticky / "mine")).returncode == 0
    assert as_nobody("mkdir", os.fspath(m / "nope")).returncode != 0


# --- resilience --------------------------------------------------------------------------


def test_full_arena_gives_enospc_and_space_back(mount_factory: MountFactory) -> None:
    m = mount_factory(memory="64M")
    free_at_start = os.statvfs(m.mountpoint).f_bfree
    chunk = os.urandom(MiB)
    written: list[Path] = []
    hit_enospc = False
    for i in range(200):
        path = m / f"fill-{i}"
        try:
            with open(path, "wb") as out:  # close reports a failed writeback too
                out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            hit_enospc = True
            path.unlink(missing_ok=True)
            break
        written.append(path)
    assert hit_enospc, "200 MiB went into a 64 MiB arena"
    assert len(written) >= 16, "far less space than the arena suggests"

    assert m.fsck() == []
    digest = hashlib.sha256(chunk).digest()
    for path in written:  # everything acknowledged is intact
        assert hashlib.sha256(path.read_bytes()).digest() == digest
    for path in written:
        path.unlink()
    # The pages go when the kernel's FORGET of each unlinked inode arrives, just after.
    deadline = time.monotonic() + 5
    while os.statvfs(m.mountpoint).f_bfree < free_at_start - 16:  # a little metadata may stay
        assert time.monotonic() < deadline, "deleting files did not give the space back"
        time.sleep(0.05)
    (m / "after").write_bytes(chunk)
    assert (m / "after").read_bytes() == chunk
    assert m.fsck() == []


def test_the_daemon_frees_removed_files_between_requests(shared_mount: Mount,
                                                        workdir: Path) -> None:
    """Small removed files wait to be freed together; the daemon frees them within a
    moment, with no request asking (the status counts them as used until then)."""
    used = shared_mount.status()["inodes"]["used"]
    for i in range(20):
        (workdir / f"small-{i}").write_bytes(b"s" * 4096)
    assert shared_mount.status()["inodes"]["used"] == used + 20
    for i in range(20):
        (workdir / f"small-{i}").unlink()
    deadline = time.monotonic() + 10
    while (status := shared_mount.status()["inodes"])["used"] != used:
        assert time.monotonic() < deadline, f"removed files not freed: {status}"
        time.sleep(0.05)
    assert status["waiting_to_be_freed"] == 0 and shared_mount.fsck() == []


def test_killed_client_does_not_take_the_mount_down(shared_mount: Mount, workdir: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "block = os.urandom(1 << 16)\n"
        "while True:\n"
        "    os.write(fd, block)\n"
        "    os.fsync(fd)\n"), os.fspath(workdir / "victim")])
    deadline = time.monotonic() + 10
    while not (workdir / "victim").exists() or (workdir / "victim").stat().st_size < MiB:
        assert time.monotonic() < deadline, "the writer never got going"
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)

    assert pid_alive(shared_mount.pid)
    (workdir / "survivor").write_bytes(b"still here")
    assert (workdir / "survivor").read_bytes() == b"still here"
    assert (workdir / "victim").stat().st_size > 0
    (workdir / "victim").unlink()
    assert shared_mount.fsck() == []


def test_handler_exception_answers_eio_and_mount_stays(
        faulty_mount: Callable[[str], Mount]) -> None:
    m = faulty_mount(RAISE_IN_HANDLER)
    with pytest.raises(OSError) as e:
        os.setxattr(m.mountpoint, "user.raise", b"1")
    assert e.value.errno == errno.EIO
    assert pid_alive(m.pid)
    (m / "after-eio").write_text("fine")
    assert (m / "after-eio").read_text() == "fine"


# --- helpers -----------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

