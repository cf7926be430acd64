"""One kernel of a machine with its filesystem, from boot to handover: the life cycle.

Everything that runs a guestfs "kernel" goes through a `Session`: the daemon (which adds
the FUSE mount and the request gate around it), the kernel process of the model test,
and the benchmark's tree builder. The sequence, with its states:

    open():        boot -> take the filesystem over (handed over, or left by a kernel
                   that died), or format a fresh one -> register it with KHO -> finish
                   boot                                                  RUNNING
    hand_over():   finalize KHO, write the boot parameters              HANDED_OVER
                   (for the exec of the next kernel, or for a later mount)
    abort():       take the handover back                                RUNNING
    poison():      overwrite what is not preserved (no way back)         POISONED
    exec():        replace this process with the next kernel            (does not return)
    leave():       or end this kernel for a next one booted in this same
                   process with `open(Options(connection=...))`       CLOSED
    close():       shut the kernel down (after a handover, or as a crash) CLOSED

A failure in `hand_over` undoes all of it (KHO, boot parameters) before it raises, so the
session is RUNNING again. `Fault` names a phase that a test can make fail on purpose, once:
an explicit argument of `open`, never a switch of the production paths.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from guestfs import connection, handover
from guestfs.atime import AtimePolicy
from guestfs.connection import ConnectionId, ConnectionState
from guestfs.filesystem import Filesystem
from kho_backend import boot as kboot
from kho_backend.boot import Kernel
from kho_backend.errors import BootError, KexecError, MachineError
from kho_backend.kexec import KexecState
from kho_backend.kexec_metadata import KexecMetadata

log = logging.getLogger(__name__)


class State(enum.Enum):
    """Where a session is in its life cycle."""

    RUNNING = "running"
    HANDED_OVER = "handed over"
    POISONED = "poisoned"
    CLOSED = "closed"


class Fault(enum.Enum):
    """A phase of a handover that can be made to fail on purpose (tests only).

    The session fails SERIALIZE, FINALIZE and BOOT_PARAMS itself, after the phase's work,
    so that the undo of each is exercised; the daemon fails QUIESCE and UNMOUNT, its own
    phases. BOOT fails the next kernel's boot in this same process (an `open` with a
    connection), after its kernel booted and before it restores: the handover is
    written by then, so it is a failure after the point of no return.
    """

    QUIESCE = "quiesce"
    SERIALIZE = "serialize"
    FINALIZE = "finalize"
    BOOT_PARAMS = "boot-params"
    UNMOUNT = "unmount"
    BOOT = "boot"


@dataclass(frozen=True)
class Options:
    """How to boot: the machine, and what to create it with if it does not exist."""

    machine: str
    memory: int | None = None      # only used when the machine is created
    nodes: int = 1
    format: bool = False
    cmdline: str = ""
    atime: AtimePolicy = AtimePolicy()
    restore_only: bool = False      # a machine without a filesystem is an error (fsck)
    #: Boot in the process that serves this FUSE connection, which outlives the previous
    #: kernel: take its handed-over state (`guestfs.connection`) over.
    connection: ConnectionId | None = None


class Session:
    """A booted kernel and its filesystem (see the module docstring)."""

    def __init__(self, kernel: Kernel, fs: Filesystem, restore_ns: int,
                 fault: Fault | None, kept: ConnectionState | None = None) -> None:
        self.kernel = kernel
        self.fs = fs
        #: The FUSE connection state handed over to this kernel (a boot in the same
        #: process), for the adapter to take over; None otherwise.
        self.kept = kept
        #: The kexec that booted this kernel (None after a cold boot or after an
        #: unmount's handover, whose exec time is 0).
        self.booted_by_kexec: KexecMetadata | None = (
            kernel.kho_in.metadata if kernel.kho_in and kernel.kho_in.metadata
            and kernel.kho_in.metadata.exec_time_ns else None)
        #: ns from the end of boot to the filesystem ready: restore and finish_boot.
        self.restore_ns = restore_ns
        self.for_exec = False       # what the current handover is for
        #: Preserved pages nothing restored, freed at the end of boot.
        self.released = 0
        self._fault = fault
        self._closed = False

    @property
    def state(self) -> State:
        """Read from the machine itself, so that it cannot disagree with it even when an
        undo failed half-way: a KHO still finalized is a handover that stands."""
        if self._closed:
            return State.CLOSED
        kexec = self.kernel.kexec
        if kexec.state is KexecState.POISONED:
            return State.POISONED
        if (kexec.state is KexecState.PREPARED or self.kernel.kho.finalized
                or self.kernel.header.boot_params.valid):
            return State.HANDED_OVER
        return State.RUNNING

    @classmethod
    def open(cls, options: Options, *, fault: Fault | None = None) -> Session:
        """Boot a kernel on the machine, restore its filesystem (or format one), register
        it for the next handover and finish boot. Raises what boot and restore raise
        (MachineError, HandoverError: the arena is then left as it was).

        With `options.connection`, the FUSE connection state handed over for it is
        claimed (HandoverError if there is none) and its references adopted before the
        orphan list is finished, so that files still open through it are kept."""
        kernel = kboot.boot(options.machine, memory=options.memory, nodes=options.nodes,
                            cmdline=options.cmdline, create=True, format=options.format)
        kept = None
        try:
            t0 = time.perf_counter_ns()
            if options.connection is not None:
                if fault is Fault.BOOT:
                    fault = None
                    raise BootError("injected failure in boot")
                kept = connection.claim(kernel.kho_in, options.connection)
            fs = handover.restore(kernel, atime=options.atime,
                                  refs=kept.refs if kept else None)
            if fs is None and options.restore_only:
                raise MachineError(f"machine {options.machine} holds no filesystem")
            if fs is None:
                fs = handover.format(kernel, atime=options.atime)
            else:
                log.info("restored filesystem %s: generation %d, %d inodes", fs.sb.uuid,
                         fs.sb.generation, fs.sb.inode_count)
            kernel.kho.register(handover.GuestfsHandover(fs))
            released = kernel.finish_boot()
        except BaseException:
            # The handover stays for a retry. A restore that got as far as finishing
            # orphans or counting the boot wrote those to the arena already; a retry
            # finds them done (and counts the boot once more).
            kernel.shutdown()
            raise
        session = cls(kernel, fs, time.perf_counter_ns() - t0, fault, kept)
        session.released = released
        booted_by = session.booted_by_kexec
        if booted_by is not None:
            log.info("exec from: %s (count %d); released %d unclaimed preserved pages",
                     booted_by.previous_release, booted_by.kexec_count, released)
        return session

    # --- the handover ----------------------------------------------------------------

    def load(self, argv: Sequence[str], cmdline: str = "") -> None:
        """Stage the next kernel image and its command line (``kexec -l``)."""
        self.kernel.kexec.load(list(argv), cmdline)

    def unload(self) -> None:
        """Unstage it."""
        self.kernel.kexec.unload()

    def take_fault(self, phase: Fault) -> bool:
        """True, once, if a test asked this session to fail in `phase`."""
        if self._fault is phase:
            self._fault = None
            return True
        return False

    def hand_over(self, phases: dict[str, int], *, for_exec: bool) -> None:
        """Finalize KHO (its participants first) and write the boot parameters: for the
        exec of the next kernel, or for a later mount (an unmount: no kexec is counted).
        Adds its phases to `phases`; KexecError names the phase of a failure, after
        undoing."""
        self._expect(State.RUNNING, "hand over")
        fault = next((f.value for f in (Fault.SERIALIZE, Fault.FINALIZE, Fault.BOOT_PARAMS)
                      if self.take_fault(f)), None)
        lost = self.kernel.arena.detached()
        if lost is not None:
            raise KexecError(f"{lost} while mounted: the files now live only in this "
                             "daemon's memory, where a handover would lose them; copy them "
                             "out of the mount, then only SIGKILL ends the daemon",
                             "serialize")
        self.for_exec = for_exec
        self.kernel.kexec.prepare(phases, exec=for_exec, fault=fault)

    def abort(self) -> None:
        """Take the handover back: the filesystem goes on as if nothing happened."""
        self._expect(State.HANDED_OVER, "abort")
        self.kernel.kexec.abort()

    def poison(self) -> None:
        """Overwrite every page the next kernel must not rely on; no way back."""
        self._expect(State.HANDED_OVER, "poison")
        self.kernel.kexec.poison()

    def exec(self) -> NoReturn:
        """Replace this process with the staged next kernel (same PID). If the exec
        fails, its handover is taken back unless memory was poisoned (KexecError)."""
        if self.state not in (State.HANDED_OVER, State.POISONED) or not self.for_exec:
            raise KexecError("The session is not handed over for an exec.", "exec")
        self.kernel.kexec.exec()

    def leave(self) -> None:
        """End this kernel for a next one booted in this same process (the in-process
        counterpart of `exec`): stamp the exec time, so the next kernel knows a kexec
        booted it, and close (the machine lock goes; the arena's mapping is left for
        the next kernel, which would otherwise fault on every page it touches first)."""
        if self.state not in (State.HANDED_OVER, State.POISONED) or not self.for_exec:
            raise KexecError("The session is not handed over for an exec.", "exec")
        self.kernel.kexec.stamp_exec()
        self._close(keep_mapping=True)

    def record_phase(self, name: str, ns: int) -> None:
        """Add a phase timed after the handover (unmount, teardown) to kexec-metadata."""
        self.kernel.kexec.record_phase(name, ns)

    def close(self) -> None:
        """Shut the kernel down: after a handover the arena keeps it for the next boot;
        without one, the next boot sees a kernel that did not hand over."""
        self._close(keep_mapping=False)

    def _close(self, *, keep_mapping: bool) -> None:
        if not self._closed:
            self.kernel.shutdown(keep_mapping=keep_mapping)
            self._closed = True

    def _expect(self, state: State, what: str) -> None:
        if self.state is not state:
            raise KexecError(f"cannot {what}: the session is {self.state.value}", what)

