"""What a daemon is asked to do: the machine, the mount point and the mount options.

`DaemonConfig.argv` is the command line that runs such a daemon, and the image a kexec
execs; the paths of a machine's log and control socket are here too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from guestfs import control, mounts
from guestfs.atime import AtimeMode, AtimePolicy
from kho_backend import machine as kmachine

DEFAULT_MEMORY = 1 << 30


class StartError(Exception):
    """The daemon could not start; the message says why, as a sentence for the user."""


# --- mount options -------------------------------------------------------------------

# Options passed to the kernel as they are (generic mount flags libfuse understands).
_PASSTHROUGH = frozenset({"suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync",
                          "async", "dirsync"})
# atime options: the kernel leaves atime of FUSE files to the filesystem, so the core
# applies them (libfuse refuses most of them anyway).
_ATIME_MODES = {"relatime": AtimeMode.RELATIME, "nostrictatime": AtimeMode.RELATIME,
                "atime": AtimeMode.RELATIME, "strictatime": AtimeMode.STRICTATIME,
                "norelatime": AtimeMode.STRICTATIME, "noatime": AtimeMode.NOATIME}
_DIRATIME = {"diratime": True, "nodiratime": False}


@dataclass(frozen=True)
class MountOptions:
    """What ``-o`` asked for. ``default_permissions`` is always on."""

    allow_other: bool = False
    read_only: bool = False
    flags: tuple[str, ...] = ()  # from _PASSTHROUGH, in the order given
    atime: AtimePolicy = AtimePolicy()

    @classmethod
    def parse(cls, text: str) -> MountOptions:
        """Parse a comma-separated ``-o`` list; `ValueError` names an unknown option."""
        allow_other = read_only = False
        flags: list[str] = []
        atime = AtimePolicy()
        for opt in filter(None, (o.strip() for o in text.split(","))):
            if opt == "allow_other":
                allow_other = True
            elif opt in ("ro", "rw"):
                read_only = opt == "ro"
            elif opt in _PASSTHROUGH:
                flags.append(opt)
            elif opt in _ATIME_MODES:
                atime = dataclasses.replace(atime, mode=_ATIME_MODES[opt])
            elif opt in _DIRATIME:
                atime = dataclasses.replace(atime, directories=_DIRATIME[opt])
            elif opt != "default_permissions":
                known = sorted({"allow_other", "ro", "rw", "default_permissions",
                                *_PASSTHROUGH, *_ATIME_MODES, *_DIRATIME})
                raise ValueError(f"unknown mount option {opt!r}; supported: "
                                 f"{', '.join(known)}")
        return cls(allow_other, read_only, tuple(flags), atime)

    def text(self) -> str:
        """The ``-o`` text that parses back into these options."""
        opts = (["allow_other"] if self.allow_other else []) + ["ro" if self.read_only else "rw"]
        opts.append(self.atime.mode.value)
        if not self.atime.directories:
            opts.append("nodiratime")
        return ",".join(opts + list(self.flags))

    def fuse_options(self, machine: str, *, debug: bool = False) -> set[str]:
        """The option set for `pyfuse3.init`."""
        opts = {"default_permissions", f"fsname={mounts.FSNAME_PREFIX}{machine}", "subtype=guestfs",
                "ro" if self.read_only else "rw", *self.flags}
        if self.atime.mode is AtimeMode.NOATIME:
            opts.add("noatime")     # only so that the mount table shows it
        if self.allow_other:
            opts.add("allow_other")
        if debug:
            opts.add("debug")
        return opts


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """Everything a daemon needs to boot and mount."""

    machine: str
    mountpoint: Path
    memory: int | None = None  # only used when the arena is created
    nodes: int | None = None   # likewise
    options: MountOptions = field(default_factory=MountOptions)
    format: bool = False
    debug: bool = False

    def argv(self, ready_fd: int | None = None) -> list[str]:
        """A command line that runs this daemon in the foreground (also the image kexec
        execs); with `ready_fd` it reports readiness on that inherited descriptor."""
        argv = [sys.executable, "-m", "guestfs.cli", "mount", "-f",
                "--machine", self.machine, "-o", self.options.text()]
        if ready_fd is not None:
            argv += ["--ready-fd", str(ready_fd)]
        if self.memory is not None:
            argv += ["--memory", str(self.memory)]
        if self.nodes is not None:
            argv += ["--nodes", str(self.nodes)]
        if self.format:
            argv.append("--format")
        if self.debug:
            argv.append("-d")
        return argv + [os.fspath(self.mountpoint)]


def machine_dir() -> Path:
    """The folder holding arenas, logs and control sockets."""
    return kmachine.machine_dir()


def log_path(machine: str) -> Path:
    """The daemon's log file when it runs in the background."""
    return machine_dir() / f"{machine}.log"


def control_path(machine: str) -> Path:
    """The control socket of `machine`'s daemon."""
    return control.socket_path(machine_dir(), machine)
