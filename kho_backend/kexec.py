"""kexec: stage the next kernel, hand over through KHO, poison, and exec it.

``load`` stages the next kernel image (a command to exec) and its command line;
``prepare`` finalizes KHO (its participants, then the root FDT: the maps are live and
need no writing), adds the ``kexec-metadata`` subtree last and writes the boot
parameters into the machine header (state HANDED_OVER); ``abort`` undoes that, and the
live root says again what it said before; ``poison`` overwrites every page the next
kernel is not handed (pool pages and the maps' nodes are handed over); ``exec`` replaces this process with the next kernel
(same PID), as ``kexec -e`` replaces the running kernel.  Any failure before the exec
aborts and leaves the running kernel as it was (KexecError names the phase).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import NoReturn

import numpy as np

from .arena import Arena
from .cmdline import Cmdline
from .errors import InjectedFault, KexecError, MachineError
from .header import CMDLINE_MAX, MachineHeader, MachineState
from .kexec_metadata import METADATA_NODE, KexecMetadata
from .kho import KHO
from .units import PAGE_SIZE

log = logging.getLogger(__name__)

#: What ``poison`` writes over every page neither preserved nor scratch.
POISON_BYTE = 0xAA
#: The phases ``prepare(fault=...)`` can fail on purpose.
FAULT_PHASES = ("serialize", "finalize", "boot-params")


@dataclass(frozen=True)
class LoadedImage:
    """The staged next kernel: the program to exec, its argv, its command line."""

    path: str
    argv: tuple[str, ...]
    cmdline: str


class KexecState(Enum):
    IDLE = "idle"
    PREPARED = "prepared"     # handover written; abort still possible
    POISONED = "poisoned"     # no way back: only exec remains


class Kexec:
    """kexec for one kernel (``kernel.kexec``).

    It works on the kernel's arena, machine header and KHO, with the kernel's command
    line (is KHO on, poison?) and the scratch areas, and knows the kexec-metadata the
    kernel was booted with (None after a cold boot) to count kexecs.  It adds its own
    ``kexec-metadata`` subtree as a KHO participant, the last one to run.
    """

    name = METADATA_NODE

    def __init__(self, arena: Arena, header: MachineHeader, kho: KHO, cmdline: Cmdline,
                 scratch: Sequence[tuple[int, int]],
                 booted_by: KexecMetadata | None) -> None:
        self.arena = arena
        self.header = header
        self.kho = kho
        self.cmdline = cmdline
        self.scratch = list(scratch)
        self.booted_by = booted_by
        self.loaded: LoadedImage | None = None
        self._fault: str | None = None
        self.state = KexecState.IDLE
        #: What this kexec records in its kexec-metadata subtree (set by prepare).
        self.metadata: KexecMetadata | None = None

    # -- load ----------------------------------------------------------------------------

    def load(self, argv: Sequence[str], cmdline: str = "") -> None:
        """Stage the next kernel: ``argv[0]`` must be an executable; ``cmdline`` is
        checked now so that a bad one fails here, not in the next kernel."""
        if not argv or not all(isinstance(a, str) for a in argv):
            raise KexecError("kexec load needs a command (a list of strings).", "load")
        path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
        if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise KexecError(f"The next kernel {argv[0]!r} is not an executable file.",
                             "load")
        if len(cmdline.encode()) > CMDLINE_MAX:
            raise KexecError(f"The next kernel's command line is longer than "
                             f"{CMDLINE_MAX} bytes, the most the machine header keeps.",
                             "load")
        try:
            Cmdline.parse(cmdline)
        except MachineError as e:
            raise KexecError(f"The next kernel's command line is not valid: {e}",
                             "load") from e
        self.loaded = LoadedImage(path, tuple(argv), cmdline)
        log.info("kexec: loaded %s (cmdline %r)", " ".join(argv), cmdline)

    def unload(self) -> None:
        self.loaded = None

    # -- prepare / abort --------------------------------------------------------------------

    def prepare(self, phases: dict[str, int], *, exec: bool = True,
                fault: str | None = None) -> None:
        """Finalize KHO, add kexec-metadata, write the boot parameters (HANDED_OVER).

        ``phases`` holds the caller's timings so far (ns, e.g. "quiesce"); this adds
        "serialize" (participants), "finalize" (memory map and root FDT) and
        "boot-params" to it, and records them all in kexec-metadata.  On any failure
        everything is undone and KexecError names the phase.

        ``exec=False`` hands over for a later boot instead of an exec (an unmount): that
        is not a kexec, so kexec-metadata keeps the kexec count and records no exec time.

        ``fault`` ("serialize", "finalize" or "boot-params") makes that phase fail on
        purpose once its work is done, so that a test sees the undo of each.
        """
        if self.state is not KexecState.IDLE:
            raise KexecError(f"A kexec is already {self.state.value}.", "prepare")
        kho = self.kho
        if not self.cmdline.kho:
            raise KexecError("KHO is off on this kernel's command line (kho=off): "
                             "nothing could be handed over.", "finalize")
        previous = self.booted_by.kexec_count if self.booted_by else 0
        self.metadata = KexecMetadata(previous + (1 if exec else 0), self.header.release,
                                      time.time_ns() if exec else 0, dict(phases))
        # The staged next kernel's command line goes with a kexec only: the kernel that
        # a later mount boots after an unmount starts with its own.
        cmdline = self.loaded.cmdline if self.loaded and exec else ""
        if fault not in (None, *FAULT_PHASES):
            raise ValueError(f"no phase {fault!r} to fail; phases: {', '.join(FAULT_PHASES)}")
        if self in kho.participants:
            kho.unregister(self)
        kho.register(self)          # after every subsystem: its subtree comes last
        self._fault = fault
        phase = "finalize"
        try:
            fdt_phys, fdt_size = kho.finalize()
            phases.update(kho.timings)
            self._inject("finalize")
            phase = "boot-params"
            t0 = time.perf_counter_ns()
            self._write_boot_params(fdt_phys, fdt_size, cmdline)
            phases["boot-params"] = time.perf_counter_ns() - t0
            self._rewrite_metadata(phases=dict(phases))
            self._inject("boot-params")
        except Exception as e:
            if phase == "finalize" and "serialize" not in kho.timings:
                phase = "serialize"     # a participant failed before the memory map
            self._undo_prepare()
            raise KexecError(f"kexec failed in phase {phase}: {e}", phase) from e
        finally:
            self._fault = None
        self.state = KexecState.PREPARED
        log.info("kexec prepared: KHO FDT at %#x (%d bytes); phases %s", fdt_phys,
                 fdt_size, {k: f"{v / 1e6:.1f} ms" for k, v in phases.items()})

    def abort(self) -> None:
        """Undo ``prepare``: clear the boot parameters, abort KHO.  Refused once poisoned."""
        if self.state is KexecState.POISONED:
            raise KexecError("Memory has been poisoned: this kexec cannot be aborted.",
                             "abort")
        if self.state is not KexecState.PREPARED:
            raise KexecError("No kexec is prepared: nothing to abort.", "abort")
        try:
            self._undo_prepare()
        finally:
            # Even if a step of the undo failed: idle once nothing of the handover stands.
            if not self.kho.finalized and not self.header.boot_params.valid:
                self.state = KexecState.IDLE
        log.info("kexec aborted; the kernel runs on")

    def record_phase(self, name: str, ns: int) -> None:
        """Add a phase the caller timed after ``prepare`` (e.g. its unmount) to
        kexec-metadata, so that the next kernel reports it with the others."""
        if self.metadata is None:
            raise KexecError("No kexec is prepared: there is no metadata to add to.",
                             "prepare")
        self._rewrite_metadata(phases={**self.metadata.phases, name: ns})

    # -- the kexec-metadata subtree (a KHO participant) -----------------------------------

    def kho_finalize(self, kho: KHO) -> None:
        """Add the kexec-metadata subtree; `prepare` rewrites it with every phase."""
        if self.metadata is not None:
            kho.add_subtree(METADATA_NODE, self.metadata.to_fdt())
        self._inject("serialize")

    def _inject(self, phase: str) -> None:
        if self._fault == phase:
            self._fault = None
            raise InjectedFault(f"injected failure in {phase}")

    def kho_abort(self, kho: KHO) -> None:
        if METADATA_NODE in kho.subtrees:
            kho.remove_subtree(METADATA_NODE)

    def _rewrite_metadata(self, **changes: object) -> None:
        """Rewrite kexec-metadata in place (later phase timings, the exec time)."""
        assert self.metadata is not None
        self.metadata = replace(self.metadata, **changes)
        self.kho.update_subtree(METADATA_NODE, self.metadata.to_fdt())

    def _write_boot_params(self, fdt_phys: int, fdt_size: int, cmdline: str) -> None:
        self.header.set_boot_params(fdt_phys, fdt_size, cmdline)
        self.header.state = MachineState.HANDED_OVER
        self.header.write(self.arena)

    def _undo_prepare(self) -> None:
        if self.header.boot_params.valid:
            self._clear_boot_params()
        if self.kho.finalized:
            self.kho.abort()
        self.metadata = None

    def _clear_boot_params(self) -> None:
        self.header.clear_boot_params()
        self.header.state = MachineState.RUNNING
        self.header.write(self.arena)

    # -- poison / exec ----------------------------------------------------------------------

    def poison(self) -> int:
        """Overwrite with POISON_BYTE every page that is neither preserved, nor scratch,
        nor page 0; returns the number of pages poisoned.  No way back after this."""
        if self.state is not KexecState.PREPARED:
            raise KexecError("Poisoning needs a prepared kexec.", "poison")
        t0 = time.perf_counter_ns()
        mask = poison_mask(self.kho, self.scratch)
        self.state = KexecState.POISONED
        fill_runs(self.arena.fd, runs(mask), POISON_BYTE)
        pages = int(np.count_nonzero(mask))
        self.kho.poisoned(POISON_BYTE)
        assert self.metadata is not None
        self._rewrite_metadata(phases={**self.metadata.phases,
                                       "poison": time.perf_counter_ns() - t0})
        log.info("kexec: poisoned %d pages with %#04x", pages, POISON_BYTE)
        return pages

    def exec(self) -> NoReturn:
        """Replace this process with the loaded next kernel (same PID)."""
        if self.loaded is None:
            raise KexecError("No next kernel is loaded (kexec load first).", "exec")
        if self.state is KexecState.IDLE:
            raise KexecError("The kexec is not prepared (prepare first).", "exec")
        self.stamp_exec()
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(self.loaded.path, self.loaded.argv)
        except OSError as e:
            if self.state is KexecState.PREPARED:
                self.abort()
            raise KexecError(f"Cannot exec the next kernel {self.loaded.path}: "
                             f"{e.strerror}.", "exec") from e

    def stamp_exec(self) -> None:
        """Record the exec time in kexec-metadata and flush the arena: the moment the
        next kernel's blackout share starts (an exec, or a boot in this same process)."""
        if self.metadata is None:
            raise KexecError("No kexec is prepared: there is no metadata to stamp.", "exec")
        self._rewrite_metadata(exec_time_ns=time.time_ns())
        self.arena.flush()

    def execute(self, poison: bool | None = None) -> NoReturn:
        """prepare + (poison) + exec, for users without a filesystem to quiesce.

        ``poison`` defaults to the command line's ``kho_poison``.
        """
        if self.loaded is None:
            raise KexecError("No next kernel is loaded (kexec load first).", "exec")
        self.prepare({})
        if self.cmdline.kho_poison if poison is None else poison:
            self.poison()
        self.exec()


def poison_mask(kho: KHO, scratch: Sequence[tuple[int, int]]) -> np.ndarray:
    """Bool per page: poison it? (Not handed over: a preserved block, a pool's block, a
    node of their maps, the root FDT; not scratch; not the header page.)"""
    mask = ~kho.handed_over_mask()
    for start, n in scratch:
        mask[start:start + n] = False
    mask[0] = False
    return mask


#: Bytes one write of `fill_runs` covers.
FILL_CHUNK = 8 << 20


def fill_runs(fd: int, page_runs: Sequence[tuple[int, int]], byte: int) -> None:
    """Write ``byte`` over the pages [start, end) of every run, through the arena's file
    descriptor in large writes: the speed of ``dd`` into /dev/shm, about twice that of
    filling the mapping, whose first touch of each page costs a fault."""
    buf = memoryview(bytes([byte]) * FILL_CHUNK)
    for start, end in page_runs:
        off, stop = start * PAGE_SIZE, end * PAGE_SIZE
        while off < stop:
            off += os.pwrite(fd, buf[:min(FILL_CHUNK, stop - off)], off)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
