"""Starting a daemon in the background (``guestfs mount`` without ``-f``).

The daemon runs detached (a new session, its output appended to
``<machine dir>/<machine>.log``) and says on an inherited pipe whether its mount is live
(`Readiness`); `start_background` waits for that and returns the daemon's PID.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guestfs import mounts
from guestfs.config import DaemonConfig, StartError, log_path
from kho_backend import machine as kmachine

log = logging.getLogger(__name__)

READY_TIMEOUT = 300.0  # seconds; creating and booting a large arena takes a while
EXIT_TIMEOUT = 30.0  # seconds a daemon that failed to start gets to exit


class Readiness:
    """Tells the process that started the daemon whether the mount is live.

    One JSON line on an inherited pipe: ``{"ok": true, "pid": N}`` or
    ``{"ok": false, "error": MESSAGE}``. Without a pipe (``-f`` from a terminal) the
    news goes to the log only.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ok(self) -> None:
        self._send({"ok": True, "pid": os.getpid()})

    def fail(self, message: str) -> None:
        self._send({"ok": False, "error": message})

    def _send(self, message: dict[str, Any]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, json.dumps(message).encode() + b"\n")
        except OSError as e:  # the starter gave up waiting; nothing to tell
            log.warning("could not report readiness: %s", e)
        finally:
            os.close(self._fd)
            self._fd = None


def start_background(config: DaemonConfig,
                     progress: Callable[[str], None] = lambda msg: None) -> int:
    """Start the daemon detached and return its PID once the mount is live.

    Raises `StartError` with the daemon's reason (or the tail of its log) otherwise; a
    first mount of a machine that fails leaves no log behind. A Ctrl-C while waiting
    raises `StillStarting`: the daemon goes on.
    """
    check_machine_files(config)
    kmachine.checked_dir(create=True)
    log_file = log_path(config.machine)
    new_log = not os.path.lexists(log_file)
    read_fd, write_fd = os.pipe()
    out = open_log(log_file)
    try:
        proc = subprocess.Popen(config.argv(ready_fd=write_fd), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, pass_fds=(write_fd,),
                                start_new_session=True)
    finally:
        os.close(out)
        os.close(write_fd)  # so that the daemon's exit shows as end-of-file
    try:
        reply = _await_readiness(read_fd, progress, log_file)
    except KeyboardInterrupt:
        raise StillStarting(proc.pid) from None
    finally:
        os.close(read_fd)
    if reply is None or not reply.get("ok"):
        # Wait for the failed daemon, so that its machine lock is free when we return.
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        tail = _log_tail(log_file)
        if new_log and not kmachine.machine_exists(config.machine):
            log_file.unlink(missing_ok=True)
        if reply is None:
            raise StartError(f"the daemon {_ended(code)} before the mount was live.{tail}")
        raise StartError(str(reply.get("error")))
    entry = mounts.mount_at(Path(config.mountpoint))
    if entry is None or entry.machine != config.machine:
        raise StartError(f"the daemon reported success but {config.mountpoint} is not mounted.")
    return proc.pid


def _ended(code: int | None) -> str:
    """How a daemon ended, from its exit status (a signal's is negative)."""
    if code is None or code >= 0:
        return f"ended (exit status {code})"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    hint = (f"; an arena page could not be backed: is the filesystem of "
            f"{kmachine.machine_dir()} full?") if -code == signal.SIGBUS else ""
    return f"was killed by {name}{hint}"


class StillStarting(Exception):
    """Ctrl-C while a daemon was starting: it goes on (its pid is `pid`)."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.pid = pid


def check_machine_files(config: DaemonConfig) -> None:
    """Refuse to make a fresh machine in place of one whose arena vanished (its log is
    still there): that would silently start empty over someone's files."""
    if config.format or kmachine.machine_exists(config.machine):
        return
    log_file = log_path(config.machine)
    starting = _writer_of(log_file)
    if starting is not None:
        # Another first mount of this machine: its daemon is creating the arena now.
        raise StartError(f"machine {config.machine} is being created and mounted by "
                         f"daemon pid {starting}; see {log_file}.")
    if os.path.lexists(log_file):
        raise StartError(f"machine {config.machine}'s arena "
                         f"{kmachine.machine_path(config.machine)} is missing, but its log "
                         f"{log_file} is still there: the arena was moved or deleted. Mount "
                         f"with --format to start an empty machine of that name, or run "
                         f"'guestfs machine destroy {config.machine}' to forget it.")


def _writer_of(log_file: Path) -> int | None:
    """The PID of a daemon writing `log_file` (its standard output), if one runs."""
    target = os.fspath(log_file)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"{entry.path}/fd/1") == target:
                    return int(entry.name)
            except OSError:     # the process ended, or is not ours to look at
                continue
    return None


def open_log(path: Path) -> int:
    """A descriptor appending to the daemon's log (mode 0600), never through a symlink
    and only to a regular file of our own."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StartError(f"cannot open the log {path}: {e.strerror}.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise StartError(f"the log {path} is not a regular file of this user; remove it.")
    return fd


def _await_readiness(fd: int, progress: Callable[[str], None],
                     log_file: Path) -> dict[str, Any] | None:
    """The daemon's readiness message, or None if it ended without one."""
    deadline = time.monotonic() + READY_TIMEOUT
    data, told = b"", False
    with open(fd, "rb", buffering=0, closefd=False) as pipe:
        while True:
            if not select.select([pipe], [], [], 1.0)[0]:
                if time.monotonic() > deadline:
                    raise StartError(f"the daemon did not mount within {READY_TIMEOUT:.0f} s; "
                                     f"see {log_file}.")
                if not told:
                    progress("waiting for the daemon to boot and mount…")
                    told = True
                continue
            chunk = pipe.read(4096)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return None


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f" Last lines of {path}:\n  " + "\n  ".join(tail) if tail else ""
