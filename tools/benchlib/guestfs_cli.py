"""The ``guestfs`` command line, as the benchmark uses it (always its real commands).

All machines live in the benchmark's own machine folder (``GUESTFS_MACHINE_DIR``), so
that nothing it makes can be confused with anyone else's and the folder can go at the end.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.proc import run

CLI = [sys.executable, "-m", "guestfs.cli"]
TIMEOUT = 600.0   # a mount of a large restored tree, or a kexec of one, takes a while
TOOLS = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GuestfsCli:
    """Runs ``guestfs`` subcommands against one machine folder."""

    machine_dir: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment of every guestfs process we start (tree builders too, which
        import benchlib from tools/)."""
        path = os.pathsep.join(filter(None, [os.fspath(TOOLS), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "GUESTFS_MACHINE_DIR": os.fspath(self.machine_dir),
                "PYTHONPATH": path}

    def run(self, *args: str) -> str:
        """Run ``guestfs ARGS``; its stdout."""
        return run([*CLI, *args], timeout=TIMEOUT, env=self.env).stdout

    def mount(self, machine: str, mountpoint: Path, memory: int | None = None) -> None:
        """``guestfs mount``: returns once the mount is live."""
        size = ["--memory", str(memory)] if memory is not None else []
        self.run("mount", "--machine", machine, *size, os.fspath(mountpoint))

    def umount(self, mountpoint: Path) -> None:
        """``guestfs umount``: hands over and waits for the daemon to end."""
        self.run("umount", os.fspath(mountpoint))

    def status(self, mountpoint: Path) -> dict[str, Any]:
        """``guestfs status --json``."""
        return json.loads(self.run("status", os.fspath(mountpoint), "--json"))

    def kexec(self, mountpoint: Path, *flags: str) -> dict[str, Any]:
        """``guestfs kexec --json [FLAGS]`` (e.g. ``--exec``, ``--poison``): generation,
        pid, blackout_ms and phases."""
        return json.loads(self.run("kexec", "--json", *flags, os.fspath(mountpoint)))

    def destroy(self, machine: str) -> None:
        """``guestfs machine destroy``."""
        self.run("machine", "destroy", machine)

    def has_kexec(self) -> bool:
        """Whether this guestfs has the ``kexec`` subcommand yet."""
        return run([*CLI, "kexec", "--help"], timeout=60, env=self.env, check=False).returncode == 0

    def python(self, *args: str) -> str:
        """Run this Python with `args` in the guestfs environment; its stdout."""
        return run([sys.executable, *args], timeout=TIMEOUT * 6, env=self.env).stdout
