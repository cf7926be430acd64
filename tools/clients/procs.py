"""Child processes this tool starts, and how they end.

Every process is stopped by its own PID, or, for a child started as the leader of a new
session (a database server and the backends it forks), by the process group that PID
leads. Nothing is ever looked up or killed by name.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from clients import Failure
from clients.report import progress

STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL
READY_TIMEOUT = 30.0  # seconds a client gets to say it is ready
TOOLS_DIR = Path(__file__).resolve().parents[1]  # where `python -m clients.X` resolves


def exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so every ``finally`` cleans up (SIGINT
    already raises KeyboardInterrupt)."""
    def leave(signum: int, frame: FrameType | None) -> None:
        progress(f"stopped by {signal.Signals(signum).name}; cleaning up")
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)


@dataclass
class Child:
    """A process we started. With `session` it leads its own session, and signals go to
    the whole process group it leads (its forks included)."""

    name: str
    proc: subprocess.Popen[bytes]
    session: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the child (or its group); a child already gone is fine."""
        try:
            if self.session:
                os.killpg(self.proc.pid, sig)
            elif self.running():
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def readline(self, timeout: float) -> str:
        """The next line of the child's stdout (a pipe), waiting up to `timeout` s."""
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"{self.name} said nothing for {timeout:.0f} s")
        line = self.proc.stdout.readline().decode(errors="replace")
        if not line:
            raise EOFError(f"{self.name} ended (exit {self.proc.wait()})")
        return line.rstrip("\n")

    def kill(self) -> None:
        """SIGKILL, as the old kernel ends every process, and reap it."""
        self.signal(signal.SIGKILL)
        self.proc.wait()
        if self.session:
            wait_group_gone(self.proc.pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not ended within `timeout` seconds."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def group_alive(pgid: int) -> bool:
    """Whether a live process is left in process group `pgid` (zombies do not count:
    orphans are reaped by whoever PID 1 is, maybe late)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def wait_group_gone(pgid: int, timeout: float = STOP_TIMEOUT) -> None:
    """Wait until the processes of group `pgid` have ended (they are reaped by init once
    their leader is gone), SIGKILLing the group again if they linger."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)


@contextlib.contextmanager
def started(name: str, argv: Sequence[str], *, session: bool = False,
            **popen: Any) -> Iterator[Child]:
    """Start `argv`; whatever happens, it is stopped when the block ends."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), start_new_session=session,
                                                     **popen)
    child = Child(name, proc, session)
    try:
        yield child
    finally:
        if child.running() or (session and group_alive(child.pid)):
            child.stop()


@contextlib.contextmanager
def client(name: str, module: str, *args: str, ready_timeout: float = READY_TIMEOUT
           ) -> Iterator[Child]:
    """`started` for ``python -m clients.<module> ARGS``, stdout on a pipe; yields once
    the client printed its ``ready ...`` line (every client module prints one when it
    is about to work)."""
    with started(name, [sys.executable, "-m", f"clients.{module}", *args],
                 stdout=subprocess.PIPE, cwd=TOOLS_DIR) as child:
        try:
            line = child.readline(ready_timeout)
        except (TimeoutError, EOFError) as e:
            raise Failure(f"{name} did not start: {e}") from None
        if not line.startswith("ready"):
            raise Failure(f"{name} did not start: it said {line!r}")
        yield child


def check_running(*children: Child) -> None:
    """`Failure` if any of `children` has ended (before we meant to end it)."""
    for child in children:
        if not child.running():
            raise Failure(f"{child.name} ended by itself (exit {child.proc.returncode})")
