"""A guestfs mount made for one experiment, through the ``guestfs`` command line.

`guest_mount` mounts a fresh machine with a unique name on a fresh mount point and,
however the block ends, unmounts it, waits for (or as a last resort kills) the daemon
it started, destroys the machine and removes the mount point.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import Failure
from clients.report import progress

ROOT = Path(__file__).resolve().parents[2]
GUESTFS = ROOT / ".venv" / "bin" / "guestfs"
CLI_TIMEOUT = 300.0  # seconds for one guestfs call (a kexec flushes and restores)
DAEMON_EXIT_TIMEOUT = 60.0


def ensure_guestfs() -> None:
    """Set up the project's virtual environment if the ``guestfs`` command is missing."""
    if not GUESTFS.exists():
        progress("setting up guestfs (tools/setup.sh)…")
        subprocess.run(["bash", "-c", 'source tools/setup.sh && guestfs_setup test'],
                       cwd=ROOT, check=True)


def guestfs(*args: str, timeout: float = CLI_TIMEOUT) -> str:
    """Run ``guestfs ARGS``; its stdout, or `Failure` with its stderr."""
    proc = subprocess.run([os.fspath(GUESTFS), *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise Failure(f"guestfs {' '.join(args)} exited {proc.returncode}: "
                      f"{proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Kexec:
    """What one ``guestfs kexec --json`` reported, plus its wall time seen from here."""

    generation: int
    pid: int
    blackout_ms: float
    phases: dict[str, Any]
    wall_ms: float

    def largest_phases(self, count: int = 3) -> str:
        """The `count` longest phases of the blackout, e.g. "poison 410 ms, boot 5 ms"."""
        timed = sorted(((float(ms), name) for name, ms in self.phases.items()
                        if isinstance(ms, (int, float))), reverse=True)[:count]
        return ", ".join(f"{name} {ms:.1f} ms" for ms, name in timed)


@dataclass
class GuestMount:
    """A live mount of machine `machine` at `mountpoint`, served by daemon `pid`."""

    machine: str
    mountpoint: Path
    pid: int = 0

    def __truediv__(self, name: str) -> Path:
        return self.mountpoint / name

    def status(self) -> dict[str, Any]:
        """``guestfs status --json``."""
        status: dict[str, Any] = json.loads(guestfs("status", os.fspath(self.mountpoint),
                                                    "--json"))
        return status

    def kexec(self, *, poison: bool = True) -> Kexec:
        """Kexec the mount's kernel; returns once the new kernel serves the mount."""
        args = ["kexec", "--json", *(["--poison"] if poison else []),
                os.fspath(self.mountpoint)]
        t0 = time.perf_counter()
        report = json.loads(guestfs(*args))
        result = Kexec(report["generation"], report["pid"], report["blackout_ms"],
                       report.get("phases", {}), (time.perf_counter() - t0) * 1e3)
        if result.pid != self.pid:
            raise Failure(f"kexec changed the daemon's PID from {self.pid} to {result.pid}")
        return result


@contextmanager
def guest_mount(prefix: str, memory: str, *, allow_other: bool = False) -> Iterator[GuestMount]:
    """Mount a fresh machine named ``<prefix>-<random>``; clean everything up after."""
    ensure_guestfs()
    machine = f"{prefix}-{uuid.uuid4().hex[:8]}"
    mountpoint = Path(tempfile.mkdtemp(prefix=f"{machine}-mnt-"))
    mountpoint.chmod(0o755)  # other users (the database's) must reach an allow_other mount
    gm = GuestMount(machine, mountpoint)
    try:
        args = ["mount", "--machine", machine, "--memory", memory]
        progress(f"mounting machine {machine} ({memory}) at {mountpoint}")
        guestfs(*args, *(["-o", "allow_other"] if allow_other else []), os.fspath(mountpoint))
        gm.pid = gm.status()["pid"]
        yield gm
    finally:
        _teardown(gm)


def _teardown(gm: GuestMount) -> None:
    """Unmount, end the daemon, destroy the machine; never raises (it runs on failure)."""
    if _is_mounted(gm.mountpoint):
        try:
            guestfs("umount", os.fspath(gm.mountpoint))
        except (Failure, subprocess.TimeoutExpired) as e:
            progress(f"clean unmount failed ({e}); detaching {gm.mountpoint}")
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(gm.mountpoint)],
                           capture_output=True)
    if gm.pid:
        _end_daemon(gm.pid)
    try:
        guestfs("machine", "destroy", gm.machine)
    except (Failure, subprocess.TimeoutExpired) as e:
        progress(f"could not destroy machine {gm.machine}: {e}")
    if not _is_mounted(gm.mountpoint):
        gm.mountpoint.rmdir()


def _end_daemon(pid: int) -> None:
    """Wait for the daemon we started to end; SIGKILL it (by its PID) if it will not."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([pidfd], [], [], DAEMON_EXIT_TIMEOUT)[0]:
            progress(f"daemon {pid} has not ended; killing it")
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _is_mounted(path: Path) -> bool:
    target = os.fspath(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
