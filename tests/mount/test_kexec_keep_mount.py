"""`guestfs kexec` keeps the mount: the next kernel boots in the daemon's process and takes
the FUSE connection over, so clients never see it go (no --force is needed).

What must hold: open descriptors (files, O_DIRECT files, directories) keep working, a
request made during the blackout waits and then completes, a file unlinked while open
survives until its last close (the kept connection still holds it), and a next kernel
that fails to boot in the process loses nothing: the daemon execs the next image
instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import threading
import time
from collections.abc import Callable

import pytest
from test_kexec_mount import kexec, snapshot, write_sample

from conftest import Mount, MountFactory

pytestmark = pytest.mark.fuse


def test_open_files_and_directories_keep_working_across_kexec(mount_factory: MountFactory) -> None:
    m = mount_factory()
    (m / "dir").mkdir()
    for name in ("a", "b", "c"):
        (m / "dir" / name).write_text(name)
    block = random.Random(5).randbytes(4096)
    with open(m / "log", "w+b", buffering=0) as log:
        log.write(b"before\n")
        direct = os.open(m / "log", os.O_RDWR | os.O_DIRECT)
        folder = os.open(m / "dir", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(log.fileno(), fcntl.LOCK_EX)      # the kernel holds it: it stays
        try:
            result = json.loads(kexec(m, "--json").stdout)       # no --force
            assert result["pid"] == m.pid and result["generation"] == 1
            log.write(b"after\n")                       # the same file handle, new kernel
            os.pwrite(direct, block, 4096)              # O_DIRECT: reaches the daemon
            assert os.pread(direct, 4096, 4096) == block
            assert sorted(os.listdir(folder)) == ["a", "b", "c"]
            with pytest.raises(BlockingIOError):
                fcntl.flock(direct, fcntl.LOCK_EX | fcntl.LOCK_NB)
            log.seek(0)
            assert log.read(13) == b"before\nafter\n"
            os.fsync(log.fileno())
        finally:
            os.close(direct)
            os.close(folder)
    assert (m / "log").read_bytes()[:13] == b"before\nafter\n"
    assert m.fsck() == []


class Client(threading.Thread):
    """Requests the kernel never answers from its caches (listxattr, appends), in a loop,
    each timed; any error is kept."""

    def __init__(self, path: os.PathLike) -> None:
        super().__init__(daemon=True)
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND)
        self.stop = threading.Event()
        self.longest = 0.0
        self.errors: list[OSError] = []
        self.done = 0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                os.listxattr(self.fd)
                os.write(self.fd, b"%d\n" % self.done)
            except OSError as e:
                self.errors.append(e)
                return
            self.longest = max(self.longest, time.monotonic() - t0)
            self.done += 1

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        os.close(self.fd)


def test_a_request_during_the_blackout_waits_and_completes(mount_factory: MountFactory) -> None:
    m = mount_factory()
    (m / "counter").write_bytes(b"")
    client = Client(m / "counter")
    client.start()
    overlapped = False
    try:
        for _attempt in range(5):       # until a request was made while requests were held
            client.longest = 0.0
            blackout = json.loads(kexec(m, "--json").stdout)
            held_ms = blackout["blackout_ms"] - blackout["phases"]["quiesce"]
            if client.longest * 1e3 >= held_ms / 2:
                overlapped = True
                break
    finally:
        client.finish()
    assert client.errors == [], "a client of a kept mount must never see an error"
    assert overlapped, "no request was made during any of the blackouts"
    lines = (m / "counter").read_text().splitlines()
    assert lines == [str(i) for i in range(client.done)], "every acknowledged append is there"


def test_a_file_unlinked_while_open_survives_the_kexec_and_goes_at_its_close(
        mount_factory: MountFactory) -> None:
    m = mount_factory()
    data = random.Random(6).randbytes(3 << 20)
    before = m.status()
    with open(m / "gone", "w+b", buffering=0) as f:
        f.write(data)
        os.unlink(m / "gone")
        kexec(m)
        # Reopened through the kept descriptor: an OPEN of the orphan in the new kernel,
        # read past the page cache.
        again = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY)
        try:
            os.posix_fadvise(again, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(again, len(data), 0) == data
        finally:
            os.close(again)
        f.write(b"more")
        held = m.status()
        assert held["inodes"]["used"] == before["inodes"]["used"] + 1
        assert held["arena"]["used_pages"] > before["arena"]["used_pages"]
    deadline = time.monotonic() + 10        # the kernel sends RELEASE after the close
    while m.status()["inodes"]["used"] != before["inodes"]["used"]:
        assert time.monotonic() < deadline, "the orphan was not freed at its last close"
        time.sleep(0.05)
    # Every page of the file is free again; the orphan list made its leaf, which stays.
    assert m.status()["arena"]["used_pages"] == before["arena"]["used_pages"] + 1
    assert m.fsck() == []


def test_a_failed_boot_in_the_process_loses_nothing_and_execs_instead(
        faulty_mount: Callable[[str], Mount]) -> None:
    m = faulty_mount("boot")
    write_sample(m)
    before = snapshot(m)
    held = os.open(m / "dir/text", os.O_RDONLY)     # the fallback drops the mount under it
    try:
        done = kexec(m)
        assert "could not boot in the daemon's process" in done.stderr
        with pytest.raises(OSError):
            os.listxattr(held)          # never answered from a kernel cache
    finally:
        with contextlib.suppress(OSError):
            os.close(held)              # its flush fails on the dropped connection
    assert snapshot(m) == before
    status = m.status()
    assert status["pid"] == m.pid and status["generation"] == 1
    assert m.fsck() == []
    kexec(m)                        # the exec'd kernel keeps the mount on the next one
    assert snapshot(m) == before
