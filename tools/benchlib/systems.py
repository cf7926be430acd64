"""The filesystems compared, and how each is mounted and taken down again.

Every `mount` pushes its undo actions on the caller's stack before it makes the thing
it will undo, so that a failure half-way (or Ctrl-C) still unmounts that mount point,
ends that daemon's PID and destroys that machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchlib.cleanup import quietly
from benchlib.guestfs_cli import GuestfsCli
from benchlib.log import say
from benchlib.proc import (
    CommandError,
    end_pid,
    fuse_unmount,
    is_mountpoint,
    remove_mountpoint,
    wait_mounted,
)

MOUNT_TIMEOUT = 60.0
CEILING = Path(__file__).resolve().parent.parent / "ceilingfs.py"


@dataclass(frozen=True)
class Caps:
    """Smaller sizes for a system too slow for the profile's (None: no cap)."""

    file_size: int | None = None   # data-path files
    files: int | None = None       # files of the metadata driver


@dataclass(frozen=True)
class Mounted:
    """A system ready for workloads."""

    system: str
    path: Path                     # the folder the workloads use
    pid: int | None = None         # the serving daemon, if any
    caps: Caps = Caps()


class System(Protocol):
    """One filesystem under comparison."""

    name: str    # key in the results
    title: str   # for people

    def mount(self, stack: ExitStack, workdir: Path) -> Mounted: ...


@dataclass
class Tmpfs:
    """Kernel tmpfs: a folder in /dev/shm."""

    name: str = "tmpfs"
    title: str = "kernel tmpfs"

    def mount(self, stack: ExitStack, workdir: Path) -> Mounted:
        path = Path(tempfile.mkdtemp(prefix="gb-tmpfs-", dir="/dev/shm"))
        stack.callback(quietly(shutil.rmtree, path))
        return Mounted(self.name, path)


@dataclass
class PyfuseScript:
    """A pyfuse3 filesystem script that mounts at its one argument and serves until
    unmounted (the ceiling, and pyfuse3's example)."""

    name: str
    title: str
    script: Path
    log_dir: Path                  # where its output goes (kept with the results)
    caps: Caps = Caps()

    def mount(self, stack: ExitStack, workdir: Path) -> Mounted:
        mountpoint = workdir / self.name
        mountpoint.mkdir()
        stack.callback(quietly(remove_mountpoint, mountpoint))
        with open(self.log_dir / f"{self.name}.log", "wb") as log:
            # A session of its own: Ctrl-C reaches us, and we unmount in order.
            proc = subprocess.Popen([sys.executable, os.fspath(self.script),
                                     os.fspath(mountpoint)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        stack.callback(quietly(_stop_daemon, mountpoint, proc))
        wait_mounted(mountpoint, proc, MOUNT_TIMEOUT)
        return Mounted(self.name, mountpoint, proc.pid, self.caps)


def _stop_daemon(mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
    fuse_unmount(mountpoint)
    end_pid(proc.pid)
    proc.wait()


def ceiling(log_dir: Path) -> PyfuseScript:
    """tools/ceilingfs.py."""
    return PyfuseScript("ceiling", "pyfuse3 ceiling", CEILING, log_dir)


@dataclass
class Guestfs:
    """A guestfs machine, mounted with ``guestfs mount``."""

    cli: GuestfsCli
    machine: str
    memory: int | None = None   # None: the machine exists already (a tree was built)
    name: str = "guestfs"
    title: str = "guestfs"
    _pid: dict[Path, int] = field(default_factory=dict)

    def claim_machine(self, stack: ExitStack) -> None:
        """Destroy the machine (its arena) when `stack` unwinds."""
        stack.callback(quietly(self.cli.destroy, self.machine))

    def mount(self, stack: ExitStack, workdir: Path) -> Mounted:
        mountpoint = workdir / self.machine
        mountpoint.mkdir()
        stack.callback(quietly(remove_mountpoint, mountpoint))
        stack.callback(quietly(self._unmount, mountpoint))
        self.cli.mount(self.machine, mountpoint, self.memory)
        pid = self._pid[mountpoint] = self.cli.status(mountpoint)["pid"]
        return Mounted(self.name, mountpoint, pid)

    def recover(self, mountpoint: Path) -> dict[str, Any]:
        """``guestfs mount`` again after the daemon died; its status."""
        self.cli.mount(self.machine, mountpoint)
        status = self.cli.status(mountpoint)
        self._pid[mountpoint] = status["pid"]
        return status

    def _unmount(self, mountpoint: Path) -> None:
        if not is_mountpoint(mountpoint):
            return
        try:
            self.cli.umount(mountpoint)
        except CommandError as e:
            say(f"guestfs umount {mountpoint} failed ({e}); detaching it")
            fuse_unmount(mountpoint)
            if mountpoint in self._pid:
                end_pid(self._pid[mountpoint])
