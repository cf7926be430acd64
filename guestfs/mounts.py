"""The mount table, the mount system calls, and the shield under a guestfs mount.

The *shield* is an empty, read-only tmpfs the daemon mounts on the mount point before
its FUSE mount and leaves in place across a kexec. While the FUSE mount is away (the
blackout of a kexec, between the old kernel's unmount and the next one's mount), a path
under the mount point reaches the shield instead of the directory underneath: a write
fails with ``EROFS`` (or ``EACCES``) rather than landing below the mount, where the next
mount would hide it. The last kernel of a mount removes it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FSTYPE = "fuse.guestfs"
FSNAME_PREFIX = "guestfs-"
SHIELD_FSTYPE = "tmpfs"
SHIELD_PREFIX = "guestfs-shield-"
MNT_DETACH = 2
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo that matters to us."""

    mountpoint: Path
    fstype: str
    source: str

    @property
    def machine(self) -> str | None:
        """The machine name if this is a guestfs mount."""
        if self.fstype == FSTYPE and self.source.startswith(FSNAME_PREFIX):
            return self.source[len(FSNAME_PREFIX):]
        return None

    @property
    def shield_of(self) -> str | None:
        """The machine whose shield this is, if it is a guestfs shield."""
        if self.fstype == SHIELD_FSTYPE and self.source.startswith(SHIELD_PREFIX):
            return self.source[len(SHIELD_PREFIX):]
        return None


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts() -> list[MountEntry]:
    """The mount table of this process's mount namespace, in mount order."""
    entries = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 2:
            entries.append(MountEntry(Path(_unescape(fields[4])), tail[0], _unescape(tail[1])))
    return entries


def mount_at(path: Path) -> MountEntry | None:
    """The topmost mount whose mount point is `path` (symlinks resolved)."""
    path = Path(os.path.realpath(path))
    found = [m for m in mounts() if m.mountpoint == path]
    return found[-1] if found else None


def mount_of_machine(machine: str) -> MountEntry | None:
    """Where `machine` is mounted, if anywhere."""
    found = [m for m in mounts() if m.machine == machine]
    return found[-1] if found else None


def still_served(path: Path, timeout: float) -> bool:
    """Whether the FUSE mount at `path` still has a daemon: a dead one's connection
    answers every request ENOTCONN at once. A statfs (never answered from the kernel's
    caches, as a stat may be) that gets another answer, or none
    within `timeout` seconds (a daemon that is busy, or in a kexec's blackout), means a
    daemon holds it, whatever its control socket says (a command run with another
    machine folder finds none)."""
    answer: list[OSError | None] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            answer.append(None)
        except OSError as e:
            answer.append(e)

    worker = threading.Thread(target=probe, name="guestfs-mount-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return not (answer and answer[0] is not None
                and answer[0].errno in (errno.ENOTCONN, errno.ECONNABORTED))


# --- system calls the standard library lacks (through ctypes, which drops the GIL) --------

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str, path: Path) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fspath(path))


def umount2(path: Path, flags: int = 0) -> None:
    """umount2(2). Blocks while the kernel writes back dirty pages: never call it from
    the thread that serves FUSE requests."""
    _check(_libc.umount2(os.fsencode(path), flags), "umount", path)


def syncfs(fd: int, mountpoint: Path) -> None:
    """syncfs(2) of the filesystem of descriptor `fd`, named `mountpoint` in errors;
    retried when a signal interrupts it. (pyfuse3.syncfs keeps the GIL, which would
    deadlock a daemon calling it on its own mount.)"""
    while True:
        try:
            _check(_libc.syncfs(fd), "syncfs", mountpoint)
            return
        except InterruptedError:
            continue


# --- the shield ----------------------------------------------------------------------------


def cover(mountpoint: Path, machine: str) -> bool:
    """Mount `machine`'s shield on `mountpoint` unless it is there already (left by the
    machine's previous kernel); False (and a warning in the log) when this process may
    not mount (not root)."""
    entry = mount_at(mountpoint)
    if entry is not None and entry.shield_of == machine:
        return True
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    ret = _libc.mount((SHIELD_PREFIX + machine).encode(), os.fsencode(mountpoint),
                      SHIELD_FSTYPE.encode(), flags, b"mode=000,size=4k,nr_inodes=1")
    if ret != 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES):
            log.warning("cannot shield %s (%s): during a kexec, writes there would land in "
                        "the directory underneath", mountpoint, os.strerror(err))
            return False
        raise OSError(err, f"cannot mount the shield: {os.strerror(err)}", os.fspath(mountpoint))
    return True


def uncover(mountpoint: Path, machine: str) -> None:
    """Remove `machine`'s shield from `mountpoint` if it is the topmost mount there
    (lazily, if a process still has its working directory in it); another machine's is
    left alone."""
    entry = mount_at(mountpoint)
    if entry is None or entry.shield_of != machine:
        return
    try:
        umount2(mountpoint)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        umount2(mountpoint, MNT_DETACH)
