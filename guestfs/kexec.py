"""kexec of a mounted guestfs: who still holds files, quiescing, and the blackout.

The daemon drives the sequence (`Daemon._op_kexec`); this module holds its parts:

* `holders`: processes with files open (or their working directory, root or a mapping)
  under the mount point, named when a kexec refuses to go on;
* `quiesce`: flush the kernel's dirty pages through us, then hold new requests and wait
  for those in flight;
* `Blackout`: the phases of one kexec, from the start of quiesce until the new mount
  answers, carried across in the ``kexec-metadata`` subtree;
* `inject_fault`: test-only failures in each phase before the exec (GUESTFS_TEST_HOOKS=1).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from guestfs import mounts
from guestfs.fuse_ops import RequestGate

if TYPE_CHECKING:
    from kho_backend.boot import Kernel
    from kho_backend.kexec import KexecMetadata

# Every phase of a kexec, in the order they happen; up to poison in the old kernel.
PHASES = ("quiesce", "serialize", "finalize", "boot-params", "unmount", "teardown",
          "poison", "exec", "boot", "restore", "mount")
FAULT_PHASES = ("quiesce", "serialize", "finalize", "boot-params", "unmount")


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


async def quiesce(gate: RequestGate, root_fd: int, mountpoint: Path) -> list[str]:
    """Flush, then freeze: no acknowledged write is lost, no request is half done.

    The kernel's dirty pages (of shared writable mappings) reach us as write requests
    during ``syncfs``, so only writeback is admitted while it runs; then everything
    waits at the gate and we wait for what is in flight. `root_fd` is opened before the
    freeze (opening the mount sends a request of its own).

    A write-back that failed (the arena was full when a mapped page came back) belongs
    to the process that wrote the page, whose msync or fsync reports it; it does not
    hold up the handover of everything that was stored, and comes back as a warning.
    """
    gate.freeze(admit_writeback=True)
    # Abandoned (not waited for) if the caller's deadline passes.
    warning = await trio.to_thread.run_sync(_flush, root_fd, mountpoint,
                                            abandon_on_cancel=True)
    gate.freeze()
    await gate.wait_idle()
    return [warning] if warning else []


def _flush(root_fd: int, mountpoint: Path) -> str | None:
    try:
        mounts.syncfs(root_fd, mountpoint)
    except OSError as e:
        return (f"writing back mapped pages of {mountpoint} failed ({e.strerror}); the "
                f"processes that wrote them see that error, what was stored is kept")
    return None


@dataclass(frozen=True)
class Blackout:
    """How long the filesystem did not answer across one kexec, by phase (ms)."""

    phases: dict[str, float]

    @property
    def total_ms(self) -> float:
        return sum(self.phases.values())

    @classmethod
    def measure(cls, metadata: KexecMetadata, started_ns: int, kernel: Kernel,
                restore_ns: int, mount_ns: int) -> Blackout:
        """The blackout of the kexec that booted `kernel`.

        The old kernel's phases come from kexec-metadata; ``exec`` is the time from its
        exec call (wall clock, shared across the exec) to the start of our boot, which is
        almost all Python start-up; then boot, restore and mount as measured here.
        """
        ms = {name: ns / 1e6 for name, ns in metadata.phases.items() if name in PHASES}
        ms["exec"] = max(0, started_ns - metadata.exec_time_ns) / 1e6
        ms["boot"] = kernel.boot_timings.get("total", 0) / 1e6
        ms["restore"] = restore_ns / 1e6
        ms["mount"] = mount_ns / 1e6
        return cls({name: round(ms[name], 3) for name in PHASES if name in ms})

    def as_dict(self) -> dict:
        return {"total_ms": round(self.total_ms, 3), "phases": self.phases}

    def table(self) -> str:
        """One line per phase with its share of the whole."""
        total = self.total_ms or 1.0
        return "\n".join(f"  {name:<12} {ms:9.1f} ms  {100 * ms / total:5.1f} %"
                         for name, ms in self.phases.items())


class InjectedFault(RuntimeError):
    """A failure a test asked for."""


@contextlib.contextmanager
def inject_fault(kernel: Kernel, phase: str | None) -> Iterator[None]:
    """Make `phase` of the next kexec fail, to show that a failure aborts cleanly.

    quiesce and unmount are the daemon's own phases (it checks `phase` itself);
    serialize fails in a KHO participant after guestfs has serialized; finalize fails
    while KHO writes the memory map; boot-params fails writing the machine header.
    """
    if phase == "serialize":
        participant = _FailingParticipant()
        kernel.kho.register(participant)
        try:
            yield
        finally:
            kernel.kho.unregister(participant)
    elif phase in ("finalize", "boot-params"):
        owner, name = (kernel.kho, "_write_handover") if phase == "finalize" else \
            (kernel, "write_header")
        original = getattr(owner, name)

        def fail(*args, **kwargs):
            setattr(owner, name, original)
            raise InjectedFault(f"injected failure in {phase}")
        setattr(owner, name, fail)
        try:
            yield
        finally:
            setattr(owner, name, original)
    else:
        yield


class _FailingParticipant:
    name = "fault-injection"

    def kho_finalize(self, kho) -> None:
        raise InjectedFault("injected failure in serialize")

    def kho_abort(self, kho) -> None:
        pass


def elapsed_ns(since: int) -> int:
    """Nanoseconds since the `time.perf_counter_ns` reading `since`."""
    return time.perf_counter_ns() - since
