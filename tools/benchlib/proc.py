"""Processes and mounts: running commands, waiting for mounts, ending what we started.

Everything here acts on one named thing (a mount point, a PID we were given), never on
processes found by name.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchlib.log import say

END_TIMEOUT = 30.0  # seconds a daemon gets to end once its mount is gone


class CommandError(Exception):
    """A command failed; the message has its last lines of stderr."""


def run(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output as text; `CommandError` if it fails.

    The command gets a process group of its own, which is killed whole if it runs out of
    time or we are interrupted: helpers it started (pip's build backend, fio's jobs) go
    with it instead of living on."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(env) if env is not None else None)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):  # the whole group has ended already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise CommandError(f"{' '.join(argv[:3])} … did not end within {timeout:.0f} s") \
                from None
        raise
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv[:3])} … failed (exit {proc.returncode}): "
                           f"{last_lines(stderr or stdout)}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def last_lines(text: str, n: int = 3) -> str:
    """The last `n` non-empty lines of `text`, on one line."""
    return " | ".join([line for line in text.splitlines() if line.strip()][-n:])


def mountpoints() -> list[str]:
    """Every mount point of this mount namespace (from the mount table: a stat could
    hang on a FUSE mount whose daemon is stuck)."""
    with open("/proc/self/mountinfo") as table:
        return [_unescape(line.split()[4]) for line in table]


def is_mountpoint(path: Path) -> bool:
    """Whether something is mounted at `path`."""
    return os.path.realpath(path) in mountpoints()


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until `proc` has mounted at `path`; `CommandError` if it ends first."""
    deadline = time.monotonic() + timeout
    while not is_mountpoint(path):
        if proc.poll() is not None:
            raise CommandError(f"the daemon for {path} ended (exit {proc.returncode}) "
                               f"before it mounted")
        if time.monotonic() > deadline:
            raise CommandError(f"nothing mounted at {path} within {timeout:.0f} s")
        time.sleep(0.05)


def fuse_unmount(path: Path) -> None:
    """Unmount a FUSE mount point; lazily if a plain unmount is refused."""
    if not is_mountpoint(path):
        return
    if run(["fusermount3", "-u", os.fspath(path)], timeout=60, check=False).returncode:
        say(f"{path} is busy; detaching it lazily")
        run(["fusermount3", "-u", "-z", os.fspath(path)], timeout=60, check=False)


def end_pid(pid: int, timeout: float = END_TIMEOUT) -> None:
    """Wait for process `pid` to end; SIGTERM it after `timeout`, SIGKILL if it still
    will not. The pidfd pins the process, so a reused PID is never signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                say(f"process {pid} has not ended; sending {sig.name}")
                signal.pidfd_send_signal(pidfd, sig)
            if select.select([pidfd], [], [], timeout)[0]:  # readable once it ended
                return
    finally:
        os.close(pidfd)


def remove_mountpoint(path: Path) -> None:
    """Remove an empty mount-point folder, never anything below a live mount."""
    if not is_mountpoint(path):
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()


def remove_tree_unless_mounted(path: Path) -> None:
    """Remove a work folder, unless something is still mounted inside it (then removing
    it would delete files of that mount): say so and leave it."""
    top = os.path.realpath(path)
    inside = [m for m in mountpoints() if m == top or m.startswith(top + os.sep)]
    if inside:
        say(f"leaving {path}: still mounted there: {', '.join(inside)}")
        return
    shutil.rmtree(path, ignore_errors=True)


def kill_and_wait(pid: int, timeout: float = END_TIMEOUT) -> None:
    """SIGKILL process `pid` (through a pidfd, so a reused PID is never signalled) and
    wait until it has ended."""
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not select.select([pidfd], [], [], timeout)[0]:
            raise CommandError(f"process {pid} did not end {timeout:.0f} s after SIGKILL")
    finally:
        os.close(pidfd)


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssShmem of process `pid`, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields
