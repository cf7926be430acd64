"""The FUSE adapter without a mount: errors become errnos, the gate admits and holds
requests, lookups are counted. The handlers are called directly inside trio."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from guestfs import connection
from guestfs.errors import FsError
from guestfs.fuse_ops import (ATTR_TIMEOUT, ENTRY_TIMEOUT, ROOT_INO, AdapterConfig,
                              Operations, RequestGate, Traffic, entry_attributes)
from guestfs.refs import KernelRefs


@dataclass
class FakeInode:
    ino: int
    mode: int = stat.S_IFREG | 0o644
    generation: int = 7
    uid: int = 1000
    gid: int = 100
    nlink: int = 1
    size: int = 5000
    rdev: int = 0
    atime_ns: int = 1_000_000_001
    mtime_ns: int = 2_000_000_002
    ctime_ns: int = 3_000_000_003
    blocks: int = 0


@dataclass
class FakeFs:
    """Answers from a script: `fail` maps a call name to the exception it raises."""

    fail: dict[str, BaseException] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def find(self, parent: int, name: bytes) -> FakeInode | None:
        self._call("find", parent, name)
        return None if name == b"absent" else FakeInode(ino=42)

    def get(self, ino: int) -> FakeInode:
        self._call("get", ino)
        return FakeInode(ino=ino, blocks=16)

    def setattr(self, ino: int, ctx: Any, **changes: Any) -> FakeInode:
        self._call("setattr", ino, changes)
        return FakeInode(ino=ino)

    def open(self, ino: int, flags: int) -> None:
        self._call("open", ino, flags)

    def write(self, ino: int, off: int, data: bytes) -> int:
        self._call("write", ino, off, data)
        return len(data)

    def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._call("setxattr", ino, name, value)

    def opendir(self, ino: int) -> None:
        self._call("opendir", ino)

    def readdir(self, ino: int, after: int) -> Iterator[tuple[int, bytes, FakeInode]]:
        self._call("readdir", ino, after)
        names = [b".", b"..", b"a", b"b", b"c"]
        for cookie, name in enumerate(names, start=1):
            if after < cookie:
                yield cookie, name, FakeInode(ino=100 + cookie)

    def ref(self, ino: int, n: int = 1) -> None:
        self.refs[ino] = self.refs.get(ino, 0) + n

    def forget(self, ino: int, n: int) -> None:
        self.refs[ino] -= n

    def references(self, ino: int) -> tuple[int, int]:
        return self.refs.get(ino, 0), 0


class FakeCtx:
    uid, gid, pid, umask = 1000, 100, 4242, 0o022


def call(ops: Operations, handler: str, *args: Any) -> Any:
    async def run() -> Any:
        return await getattr(ops, handler)(*args)
    return trio.run(run)


def open_file(ops: Operations, ino: int) -> int:
    """A file handle of `ino`, as the kernel gets it from OPEN."""
    return call(ops, "open", ino, os.O_RDWR, FakeCtx()).fh


def test_fs_error_becomes_its_errno() -> None:
    ops = Operations(FakeFs(fail={"get": FsError(errno.ENOTDIR)}))
    with pytest.raises(pyfuse3.FUSEError) as info:
        call(ops, "getattr", 5, FakeCtx())
    assert info.value.errno == errno.ENOTDIR


def test_unexpected_exception_is_logged_and_answered_eio(caplog: pytest.LogCaptureFixture) -> None:
    ops = Operations(FakeFs(fail={"write": ZeroDivisionError("boom")}))
    fh = open_file(ops, 5)
    with caplog.at_level(logging.ERROR, logger="guestfs.fuse_ops"):
        with pytest.raises(pyfuse3.FUSEError) as info:
            call(ops, "write", fh, 0, b"data")
    assert info.value.errno == errno.EIO
    assert "ZeroDivisionError" in caplog.text and "Traceback" in caplog.text
    assert ops.gate.in_flight == 0


def test_forget_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    # pyfuse3 awaits forget outside any try: an exception there would end the mount.
    fs = FakeFs()
    ops = Operations(fs)
    with caplog.at_level(logging.ERROR, logger="guestfs.fuse_ops"):
        call(ops, "forget", [(999, 1)])  # FakeFs.forget of an unknown inode: KeyError
    assert "KeyError" in caplog.text and ops.gate.in_flight == 0


def test_a_direct_write_drops_cached_pages_until_the_kernel_evicts_the_inode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[int] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only: dropped.append(ino))
    fs = FakeFs()
    ops = Operations(fs)
    buffered = open_file(ops, 5)
    direct = call(ops, "open", 5, os.O_RDWR | os.O_DIRECT, FakeCtx()).fh
    call(ops, "write", buffered, 0, b"x")
    call(ops, "write", direct, 0, b"y")
    assert dropped == [5]
    call(ops, "write", buffered, 0, b"x")
    fs.refs[5] = 1
    call(ops, "forget", [(5, 1)])            # evicted: its page cache went with it
    call(ops, "write", direct, 0, b"y")
    assert dropped == [5]


def test_cache_hints_handed_over_at_a_kexec_still_drop_pages(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter of the next kernel adopts the handed-over opens and cache hints
    (through the connection's payload): a direct write through a kept handle drops the
    pages a buffered write cached before the kexec, and only those."""
    dropped: list[int] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only: dropped.append(ino))
    ops = Operations(FakeFs())
    call(ops, "write", open_file(ops, 5), 0, b"x")  # buffered: the kernel may cache it
    direct = call(ops, "open", 6, os.O_RDWR | os.O_DIRECT, FakeCtx()).fh
    handles, next_fh, cached = ops.open_handles()
    state = connection.capture(connection.ConnectionId(1, 2), KernelRefs(), handles,
                               next_fh, cached)
    _, kept_handles, kept_cached = connection.decode(connection.encode(state))
    kept = dataclasses.replace(state, handles=kept_handles, cached=kept_cached)
    again = Operations(FakeFs())
    again.adopt(again.fs, kept.handle_rows(), kept.next_fh, kept.cached)
    call(again, "write", direct, 0, b"y")           # inode 6: never cached
    assert dropped == []
    call(again, "write", call(again, "open", 5, os.O_RDWR | os.O_DIRECT, FakeCtx()).fh,
         0, b"y")
    assert dropped == [5] and call(again, "open", 7, 0, FakeCtx()).fh == next_fh + 1


def test_read_only_refuses_changes() -> None:
    ops = Operations(FakeFs(), config=AdapterConfig(read_only=True))
    with pytest.raises(pyfuse3.FUSEError) as info:
        call(ops, "write", 5, 0, b"x")
    assert info.value.errno == errno.EROFS
    assert ops.fs.calls == []


def test_lookup_counts_and_negative_entries() -> None:
    fs = FakeFs()
    ops = Operations(fs)
    attr = call(ops, "lookup", ROOT_INO, b"x", FakeCtx())
    assert attr.st_ino == 42 and fs.refs == {42: 1}
    call(ops, "forget", [(42, 1)])
    assert fs.refs == {42: 0}
    negative = call(ops, "lookup", ROOT_INO, b"absent", FakeCtx())
    assert negative.st_ino == 0 and fs.refs == {42: 0}
    fs.fail["find"] = FsError(errno.ENOENT)           # e.g. a parent that is gone
    negative = call(ops, "lookup", ROOT_INO, b"missing", FakeCtx())
    assert negative.st_ino == 0 and fs.refs == {42: 0}


def test_entry_attributes_carry_every_field() -> None:
    attr = entry_attributes(FakeInode(ino=9, blocks=16))
    assert (attr.st_ino, attr.generation, attr.st_uid, attr.st_gid) == (9, 7, 1000, 100)
    assert (attr.st_size, attr.st_blocks, attr.st_blksize) == (5000, 16, 4096)
    assert (attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns) == (
        1_000_000_001, 2_000_000_002, 3_000_000_003)
    assert attr.attr_timeout == ATTR_TIMEOUT and attr.entry_timeout == ENTRY_TIMEOUT


def test_setattr_passes_only_requested_fields() -> None:
    fs = FakeFs()
    ops = Operations(fs)
    new = pyfuse3.EntryAttributes()
    new.st_mode = stat.S_IFREG | 0o600
    new.st_size = 123

    class Fields:
        update_mode, update_size = True, True
        update_uid = update_gid = update_atime = update_mtime = update_ctime = False

    call(ops, "setattr", 5, new, Fields(), None, FakeCtx())
    assert fs.calls[-1] == ("setattr", (5, {"mode": stat.S_IFREG | 0o600, "uid": None, "gid": None,
                                            "size": 123, "atime_ns": None, "mtime_ns": None,
                                            "ctime_ns": None}))


def test_readdir_refs_only_accepted_entries_and_not_dots(monkeypatch: pytest.MonkeyPatch) -> None:
    accepted: list[tuple[bytes, int]] = []

    def reply(token: Any, name: bytes, attr: Any, next_id: int) -> bool:
        if len(accepted) == 4:  # the buffer is full after four entries
            return False
        accepted.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fs = FakeFs()
    ops = Operations(fs)
    call(ops, "readdir", call(ops, "opendir", 1, FakeCtx()), 0, object())
    assert accepted == [(b".", 1), (b"..", 2), (b"a", 3), (b"b", 4)]
    assert fs.refs == {103: 1, 104: 1}


def test_handles_are_per_open_and_checked() -> None:
    ops = Operations(FakeFs())
    first, second = open_file(ops, 5), open_file(ops, 5)
    assert first != second
    directory = call(ops, "opendir", 1, FakeCtx())
    for handler, args in (("read", (directory, 0, 1)), ("readdir", (first, 0, object()))):
        with pytest.raises(pyfuse3.FUSEError) as info:
            call(ops, handler, *args)
        assert info.value.errno == errno.EBADF


def test_flush_and_fsync_are_left_to_the_kernel() -> None:
    # ENOSYS makes the kernel stop sending them (a request less per close): every change
    # is in the arena when its own request returns, so they have nothing to do.
    fs = FakeFs()
    ops = Operations(fs)
    fh = open_file(ops, 5)
    directory = call(ops, "opendir", 1, FakeCtx())
    for handler, args in (("flush", (fh,)), ("fsync", (fh, False)),
                          ("fsyncdir", (directory, True))):
        with pytest.raises(pyfuse3.FUSEError) as info:
            call(ops, handler, *args)
        assert info.value.errno == errno.ENOSYS
    assert [name for name, _ in fs.calls] == ["open", "opendir"]


def test_gate_holds_new_requests_until_thaw() -> None:
    async def scenario() -> list[str]:
        events: list[str] = []
        gate = RequestGate()
        ops = Operations(FakeFs(), gate)
        fh = await ops.open(5, os.O_RDWR, FakeCtx())

        async def request(name: str, traffic_handler: str, *args: Any) -> None:
            await getattr(ops, traffic_handler)(*args)
            events.append(name)

        gate.freeze(admit_writeback=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "getattr", "getattr", 5, FakeCtx())
            nursery.start_soon(request, "write", "write", fh.fh, 0, b"x")
            await trio.testing.wait_all_tasks_blocked()
            events.append("frozen")
            gate.freeze()
            assert gate.frozen
            await gate.wait_idle()
            gate.thaw()
        return events

    assert trio.run(scenario) == ["write", "frozen", "getattr"]


def test_gate_wait_idle_waits_for_requests_in_flight() -> None:
    async def scenario() -> list[str]:
        gate, events = RequestGate(), []
        release = trio.Event()

        async def slow_request() -> None:
            await gate.enter(Traffic.GENERAL)
            try:
                await release.wait()
            finally:
                gate.leave()
            events.append("request done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            await trio.testing.wait_all_tasks_blocked()
            gate.freeze()
            assert gate.in_flight == 1
            nursery.start_soon(_release_later, release)
            await gate.wait_idle()
            events.append("idle")
        return events

    assert trio.run(scenario) == ["request done", "idle"]


async def _release_later(event: trio.Event) -> None:
    await trio.testing.wait_all_tasks_blocked()     # wait_idle is waiting by now
    event.set()
