"""Before a handover: who still holds files on the mount, and the quiesce.

* `holders`: processes with files open (or their working directory, root or a mapping)
  under the mount point, named when a kexec or unmount refuses to go on;
* `quiesce`: flush the kernel's dirty pages through us, then hold new requests at the
  gate and wait for those in flight.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import trio

from guestfs import mounts
from guestfs.fuse_ops import RequestGate


def holders(mountpoint: Path, exclude: int = -1) -> dict[int, str]:
    """{pid: command name} of processes using anything under `mountpoint`.

    Like fuser(1): open descriptors, working directory, root, and mapped files. Our own
    process (`exclude`) is left out.
    """
    top = os.fspath(mountpoint)
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        if _uses(Path(entry.path), top):
            found[int(entry.name)] = _comm(Path(entry.path))
    return found


def _uses(proc: Path, top: str) -> bool:
    def under(target: str) -> bool:
        return target == top or target.startswith(top + "/")

    try:
        links = [proc / "cwd", proc / "root", *(proc / "fd").iterdir()]
        if any(under(os.readlink(link)) for link in _existing(links)):
            return True
        with open(proc / "maps") as maps:
            return any(under(line.split(None, 5)[-1].strip()) for line in maps
                       if line.count(" ") >= 5)
    except OSError:     # the process ended, or is not ours to look at
        return False


def _existing(links: list[Path]) -> Iterator[Path]:
    for link in links:
        with contextlib.suppress(OSError):
            os.readlink(link)
            yield link


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return "?"


def describe_holders(found: dict[int, str]) -> str:
    """``"1234 (sqlite3), 1300 (bash)"``."""
    return ", ".join(f"{pid} ({name})" for pid, name in sorted(found.items()))


async def quiesce(gate: RequestGate, root_fd: int | None, mountpoint: Path) -> list[str]:
    """Flush, then freeze: no acknowledged write is lost, no request is half done.

    The kernel's dirty pages (of shared writable mappings) reach us as write requests
    during ``syncfs``, so only writeback is admitted while it runs; then everything
    waits at the gate and we wait for what is in flight. `root_fd` is opened before the
    freeze (opening the mount sends a request of its own).

    A write-back that failed (the arena was full when a mapped page came back) belongs
    to the process that wrote the page, whose msync or fsync reports it; it does not
    hold up the handover of everything that was stored, and comes back as a warning.
    Without `root_fd` (the root cannot be opened) there is nothing to write back through.
    """
    gate.freeze(admit_writeback=True)
    # Abandoned (not waited for) if the caller's deadline passes.
    warning = await trio.to_thread.run_sync(_flush, root_fd, mountpoint,
                                            abandon_on_cancel=True)
    gate.freeze()
    await gate.wait_idle()
    return [warning] if warning else []


def _flush(root_fd: int | None, mountpoint: Path) -> str | None:
    if root_fd is None:
        return (f"the root of {mountpoint} cannot be opened, so mapped pages were not "
                "written back")
    try:
        mounts.syncfs(root_fd, mountpoint)
    except OSError as e:
        return (f"writing back mapped pages of {mountpoint} failed ({e.strerror}); the "
                f"processes that wrote them see that error, what was stored is kept")
    return None
