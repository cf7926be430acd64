"""Machines: named arenas in the machine folder, and the per-machine lock.

A machine ``NAME`` is the arena file ``<dir>/NAME.mem``; ``<dir>`` is
``$GUESTFS_MACHINE_DIR`` or ``/dev/shm/guestfs`` (created mode 0700). /dev/shm is open to
every user, so the folder is trusted only if it is a real directory owned by this user
and writable by nobody else (`checked_dir`), and files in it are opened without
following symlinks: otherwise another user could create the folder first and make us
write or lose files through it.

The lock is an exclusive ``flock`` on the arena's file descriptor, which is close-on-exec:
when a kernel ``exec``s the next one in the same process, the old image's lock goes away
with its descriptors and the new image takes it again while booting. A crashed kernel's
lock goes away with its process. The lock is what says a machine is in use; the pid in the
header is only there to name the holder.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import ArenaError, MachineError

if TYPE_CHECKING:
    from .arena import Arena
    from .header import MachineHeader, MachineState

# .arena and .header (numpy) are imported where a machine is opened or its header read,
# so that the command line can find machines and their sockets without loading numpy.
from .units import PAGE_SIZE, format_size

ENV_DIR = "GUESTFS_MACHINE_DIR"
DEFAULT_DIR = Path("/dev/shm/guestfs")
SUFFIX = ".mem"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class MachineInfo:
    """One machine as ``list_machines()`` sees it (without taking its lock)."""

    name: str
    path: Path
    size: int
    nodes: int | None  # None, like state/pid/boot_count, when the header is unreadable
    state: MachineState | None
    pid: int | None  # pid holding the lock if in use, else the last kernel's pid
    alive: bool  # a process holds the machine lock right now
    boot_count: int | None
    error: str | None = None  # why the header could not be read


def machine_dir(override: Path | None = None) -> Path:
    """The machine folder: ``override``, else ``$GUESTFS_MACHINE_DIR``, else the default."""
    if override is not None:
        return Path(override)
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else DEFAULT_DIR


def checked_dir(directory: Path | None = None, *, create: bool = False) -> Path:
    """The machine folder, made (mode 0700) if `create` and missing; MachineError if it
    is a symlink or not a directory, belongs to another user, or others may write to it.
    """
    folder = machine_dir(directory)
    if create:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return folder
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"can be written by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        raise MachineError(f"The machine folder {folder} {problem}; it cannot be trusted "
                           f"with machines. Remove it, or set {ENV_DIR} to a folder of "
                           "your own.")
    return folder


def check_room(size: int, directory: Path | None = None) -> None:
    """Refuse an arena of `size` bytes that the machine folder's filesystem (RAM, for
    /dev/shm) has no room for; ArenaError with the figures."""
    folder = machine_dir(directory)
    st = os.statvfs(folder if folder.exists() else folder.parent)
    room = st.f_bavail * st.f_frsize
    if size > room:
        raise ArenaError(f"A machine of {format_size(size)} does not fit: {folder} has "
                         f"{format_size(room)} free.")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid machine name, else raise ArenaError."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ArenaError(
            f"{name!r} is not a valid machine name; use 1 to 64 letters, digits, '_', '.' or '-'."
        )
    return name


def machine_path(name: str, directory: Path | None = None) -> Path:
    """Path of the arena file of machine ``name``."""
    return machine_dir(directory) / (validate_name(name) + SUFFIX)


def machine_exists(name: str, directory: Path | None = None) -> bool:
    """Whether machine ``name`` has an arena file."""
    return machine_path(name, directory).exists()


def create_machine(name: str, size: int, nodes: int = 1, directory: Path | None = None) -> tuple[Arena, MachineHeader]:
    """Create machine ``name`` (arena of ``size`` bytes, FRESH header), locked by the caller.

    The file is built under a temporary name and linked into place, so no other process
    ever sees a half-made arena, and an existing machine is never overwritten.
    """
    checked_dir(directory, create=True)
    check_room(size, directory)
    path = machine_path(name, directory)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    from .arena import Arena
    from .header import MachineHeader

    arena = Arena.create(tmp, size, nodes)
    try:
        fcntl.flock(arena.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        header = MachineHeader(arena_size=size, nr_nodes=nodes)
        header.write_new(arena)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ArenaError(f"Machine {name!r} already exists ({path}).") from None
        arena.path = path
        return arena, header
    except BaseException:
        arena.close()
        raise
    finally:
        tmp.unlink(missing_ok=True)


def open_machine(name: str, directory: Path | None = None, *, memory: int | None = None) -> tuple[Arena, MachineHeader]:
    """Open, lock and validate machine ``name``; the file is not modified.

    ArenaError if it does not exist, is in use, is not an arena or is not ``memory`` bytes;
    HeaderError if its header is corrupt.
    """
    from .arena import Arena

    checked_dir(directory)
    path = machine_path(name, directory)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ArenaError(f"There is no machine named {name!r} (no file {path}).") from None
    except OSError as e:
        raise ArenaError(f"Cannot open machine {name!r} ({path}): {e.strerror}.") from e
    try:
        _lock(fd, name, path)
        header = _read_header(fd, path)
        if memory is not None and memory != header.arena_size:
            raise ArenaError(
                f"Machine {name!r} has {format_size(header.arena_size)} of memory, not the "
                f"{format_size(memory)} asked for; its size cannot change."
            )
        return Arena(path, fd, header.nr_nodes), header
    except BaseException:
        os.close(fd)
        raise


def list_machines(directory: Path | None = None) -> list[MachineInfo]:
    """Every machine in the folder, sorted by name, with what its header says."""
    folder = checked_dir(directory)
    if not folder.is_dir():
        return []
    holders = _lock_holders()
    return [_info(path, holders) for path in sorted(folder.glob("*" + SUFFIX)) if _NAME_RE.fullmatch(path.stem)]


def destroy_machine(name: str, directory: Path | None = None) -> None:
    """Delete machine ``name`` and everything in its memory; refused while it is in use."""
    checked_dir(directory)
    path = machine_path(name, directory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ArenaError(f"There is no machine named {name!r} (no file {path}).") from None
    try:
        _lock(fd, name, path)
        arena = sys.modules.get(f"{__package__}.arena")   # not imported: nothing kept
        if arena is not None:
            arena.drop_kept_mapping()   # its memory must not outlive the file here
        path.unlink()
    finally:
        os.close(fd)


# -- helpers ----------------------------------------------------------------------------


def _lock(fd: int, name: str, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _lock_holders().get(_file_id(fd)) or _header_pid(fd)
        holder = f"pid {pid}" if pid else "another process"
        raise ArenaError(f"Machine {name!r} is in use by {holder}.") from None


def _read_header(fd: int, path: Path) -> MachineHeader:
    from .header import HEADER_SIZE, MachineHeader

    size = os.fstat(fd).st_size
    if size < HEADER_SIZE or size % PAGE_SIZE:
        raise ArenaError(f"{path} is not a guestfs arena: its size, {size} bytes, is not a whole number of pages.")
    page = os.pread(fd, HEADER_SIZE, 0)
    try:
        return MachineHeader.unpack(page, size)
    except MachineError as e:
        raise type(e)(f"{path}: {e}") from e


def _header_pid(fd: int) -> int:
    from .header import HEADER_SIZE, MachineHeader

    try:
        return MachineHeader.unpack(os.pread(fd, HEADER_SIZE, 0)).pid
    except MachineError:
        return 0


def _file_id(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _lock_holders() -> dict[tuple[int, int, int], int]:
    """(major, minor, inode) -> pid for every FLOCK in /proc/locks (empty if unreadable)."""
    holders = {}
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 5287 00:1b:2 0 EOF"; blocked waiters have "->" after "1:"
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        major, minor, inode = fields[5].split(":")
        holders[(int(major, 16), int(minor, 16), int(inode))] = int(fields[4])
    return holders


def _info(path: Path, holders: dict[tuple[int, int, int], int]) -> MachineInfo:
    from .header import HEADER_SIZE, MachineHeader

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        return MachineInfo(path.stem, path, 0, None, None, None, False, None, e.strerror)
    try:
        size = os.fstat(fd).st_size
        holder = holders.get(_file_id(fd))
        try:
            h = MachineHeader.unpack(os.pread(fd, HEADER_SIZE, 0), size)
        except MachineError as e:
            return MachineInfo(path.stem, path, size, None, None, holder, holder is not None, None, str(e))
        pid = holder if holder is not None else h.pid
        return MachineInfo(path.stem, path, size, h.nr_nodes, h.state, pid, holder is not None, h.boot_count)
    finally:
        os.close(fd)
