"""The metadata driver: create, stat, ``ls -l``, rename and unlink of many small files.

Each phase goes through every file once and counts operations per second (for
``ls -l``: entries listed per second). The FUSE systems are mounted with one-hour entry
and attribute timeouts (guestfs's own, which the ceiling copies), so a stat right after
a create would be answered from the kernel's cache without asking the filesystem at all.
Before each phase the kernel's dentry and inode caches are therefore dropped
(``drop_caches``, as root) and the forgets this sends are given
`Profile.forget_settle_s` to arrive: every operation then reaches the filesystem (as it
does for a client that comes back to its files after the kernel evicted them).

The driver is Python; its own cost per call (about a microsecond) is small next to a
FUSE round trip, but it does bound the tmpfs figures.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchlib.log import say
from benchlib.model import Table
from benchlib.profiles import Profile
from benchlib.systems import Mounted

PAYLOAD = b"x" * 1024   # each small file holds 1 KiB
UNIT = "ops/s"


@dataclass
class WorkDir:
    """One system's working folder in one run."""

    mounted: Mounted
    path: str
    names: list[str]
    fd: int = -1


def _create(d: WorkDir) -> None:
    os.mkdir(d.path)
    d.fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY)
    for name in d.names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=d.fd)
        os.write(fd, PAYLOAD)
        os.close(fd)


def _stat(d: WorkDir) -> None:
    for name in d.names:
        os.stat(name, dir_fd=d.fd, follow_symlinks=False)


def _ls(d: WorkDir) -> None:
    subprocess.run(["ls", "-l", d.path], stdout=subprocess.DEVNULL, check=True)


def _rename(d: WorkDir) -> None:
    for name in d.names:
        os.rename(name, "r" + name, src_dir_fd=d.fd, dst_dir_fd=d.fd)


def _unlink(d: WorkDir) -> None:
    for name in d.names:
        os.unlink("r" + name, dir_fd=d.fd)


PHASES: dict[str, Callable[[WorkDir], None]] = {
    "create": _create, "stat": _stat, "ls -l": _ls, "rename": _rename, "unlink": _unlink,
}
TITLES = {
    "create": "create (1 KiB each)", "stat": "stat", "ls -l": "ls -l of the folder",
    "rename": "rename", "unlink": "unlink",
}


def run_metadata(profile: Profile, systems: Sequence[Mounted], table: Table) -> None:
    """All phases on all systems, `profile.runs` times."""
    for run in range(profile.runs):
        dirs = [WorkDir(m, os.path.join(m.path, f"meta{run}"), _names(profile, m, table))
                for m in systems]
        try:
            for phase, action in PHASES.items():
                for d in dirs:
                    _timed_phase(profile, phase, action, d, table)
                    say(f"run {run + 1}/{profile.runs} {d.mounted.system:8} metadata "
                        f"{phase:7} {table.get(phase, d.mounted.system, UNIT).samples[-1]:10.0f} "
                        f"{UNIT}")
        finally:
            for d in dirs:
                if d.fd >= 0:
                    os.close(d.fd)
        for d in dirs:
            os.rmdir(d.path)


def _names(profile: Profile, mounted: Mounted, table: Table) -> list[str]:
    """The files `mounted` works on: the profile's count, or its cap (noted)."""
    count = profile.meta_files
    cap = mounted.caps.files
    if cap is not None and cap < count:
        count = cap
        for phase in PHASES:
            table.get(phase, mounted.system, UNIT).note = (
                f"{mounted.system}: {cap:,} files, not {profile.meta_files:,}: at the full "
                f"count its ls -l alone would take minutes")
    return [f"f{i:06d}" for i in range(count)]


def drop_kernel_caches() -> None:
    """Drop the kernel's dentries and inodes (not the page cache), so that the next
    phase's names and attributes are asked of each filesystem again."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def _timed_phase(profile: Profile, phase: str, action: Callable[[WorkDir], None],
                 d: WorkDir, table: Table) -> None:
    drop_kernel_caches()
    time.sleep(profile.forget_settle_s)
    t0 = time.perf_counter()
    action(d)
    elapsed = time.perf_counter() - t0
    table.add(phase, d.mounted.system, UNIT, len(d.names) / elapsed)
