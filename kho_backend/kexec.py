"""kexec: stage the next kernel, hand over through KHO, poison, and exec it.

``load`` stages the next kernel image (a command to exec) and its command line;
``prepare`` finalizes KHO, adds the ``kexec-metadata`` subtree and writes the boot
parameters into the machine header (state HANDED_OVER); ``poison`` overwrites every page
the next kernel must not rely on; ``exec`` replaces this process with the next kernel
(same PID), as ``kexec -e`` replaces the running kernel.  Any failure before the exec
aborts and leaves the running kernel as it was (KexecError names the phase).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from .cmdline import Cmdline
from .errors import HandoverError, KexecError, MachineError
from .fdt import FdtNode, FdtReader, build, u32
from .header import CMDLINE_MAX, MachineState
from .kho import METADATA_NODE
from .units import PAGE_SIZE

if TYPE_CHECKING:
    from .boot import Kernel

log = logging.getLogger(__name__)

#: What ``poison`` writes over every page neither preserved nor scratch.
POISON_BYTE = 0xAA
METADATA_COMPATIBLE = "kexec-metadata-v1"
METADATA_VERSION = 1
_PROP_NAME = re.compile(r"[A-Za-z0-9,._+?#-]{1,31}")


@dataclass(frozen=True)
class KexecMetadata:
    """The ``kexec-metadata`` subtree: who exec'd this kernel, when, and how long it took.

    ``kexec_count`` is the generation: 1 for the first kernel booted by kexec from a cold
    boot.  ``exec_time_ns`` is CLOCK_REALTIME at the exec (0 if the previous kernel
    stopped without exec, e.g. an unmount).  ``phases`` are ns per phase of that kexec.
    """

    kexec_count: int
    previous_release: str
    exec_time_ns: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    version: int = METADATA_VERSION

    def to_fdt(self) -> bytes:
        """The subtree blob (one u64 property per phase, in node ``phases``)."""
        root = FdtNode("", {"compatible": METADATA_COMPATIBLE, "version": u32(self.version),
                            "previous-release": self.previous_release,
                            "kexec-count": self.kexec_count,
                            "exec-time-ns": self.exec_time_ns})
        bad = [name for name in self.phases if not _PROP_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"phase names must be devicetree property names: {bad}")
        root.children.append(FdtNode("phases", dict(self.phases)))
        return build(root)

    @classmethod
    def from_fdt(cls, blob: bytes) -> KexecMetadata:
        """Parse and validate the subtree; HandoverError names what is wrong."""
        r = FdtReader(blob, f"the KHO subtree {METADATA_NODE!r}")
        top = r.node("/")
        r.expect_compatible(top, METADATA_COMPATIBLE)
        version = r.u32(top, "version")
        if version != METADATA_VERSION:
            raise HandoverError(f"{r.what} has version {version}; this kernel reads "
                                f"version {METADATA_VERSION}")
        phases_node = r.node("/phases")
        phases = {name: r.u64(phases_node, name) for name, _ in r.properties(phases_node)}
        return cls(kexec_count=r.u64(top, "kexec-count"),
                   previous_release=r.string(top, "previous-release"),
                   exec_time_ns=r.u64(top, "exec-time-ns"), phases=phases,
                   version=version)


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
    """kexec for one kernel (``kernel.kexec``)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.loaded: LoadedImage | None = None
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
                             f"{CMDLINE_MAX} bytes.", "load")
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

    def prepare(self, phases: dict[str, int], *, exec: bool = True) -> None:
        """Finalize KHO, add kexec-metadata, write the boot parameters (HANDED_OVER).

        ``phases`` holds the caller's timings so far (ns, e.g. "quiesce"); this adds
        "serialize" (participants), "finalize" (memory map and root FDT) and
        "boot-params" to it, and records them all in kexec-metadata.  On any failure
        everything is undone and KexecError names the phase.

        ``exec=False`` hands over for a later boot instead of an exec (an unmount): that
        is not a kexec, so kexec-metadata keeps the kexec count and records no exec time.
        """
        if self.state is not KexecState.IDLE:
            raise KexecError(f"A kexec is already {self.state.value}.", "prepare")
        kho = self.kernel.kho
        if not self.kernel.cmdline.kho:
            raise KexecError("KHO is off on this kernel's command line (kho=off): "
                             "nothing could be handed over.", "finalize")
        count = self._previous_count() + (1 if exec else 0)
        self.metadata = KexecMetadata(count, self._release(),
                                      time.time_ns() if exec else 0, dict(phases))
        # The staged next kernel's command line goes with a kexec only: the kernel that
        # a later mount boots after an unmount starts with its own.
        cmdline = self.loaded.cmdline if self.loaded and exec else ""
        phase = "finalize"
        try:
            fdt_phys, fdt_size = kho.finalize(metadata=self._metadata_blob)
            phases.update(kho.timings)
            phase = "boot-params"
            t0 = time.perf_counter_ns()
            self._write_boot_params(fdt_phys, fdt_size, cmdline)
            phases["boot-params"] = time.perf_counter_ns() - t0
            self._rewrite_metadata(phases=dict(phases))
        except Exception as e:
            if phase == "finalize" and "serialize" not in kho.timings:
                phase = "serialize"     # a participant failed before the memory map
            self._undo_prepare()
            raise KexecError(f"kexec failed in phase {phase}: {e}", phase) from e
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
        self._undo_prepare()
        self.state = KexecState.IDLE
        log.info("kexec aborted; the kernel runs on")

    def record_phase(self, name: str, ns: int) -> None:
        """Add a phase the caller timed after ``prepare`` (e.g. its unmount) to
        kexec-metadata, so that the next kernel reports it with the others."""
        if self.metadata is None:
            raise KexecError("No kexec is prepared: there is no metadata to add to.",
                             "prepare")
        self._rewrite_metadata(phases={**self.metadata.phases, name: ns})

    def _previous_count(self) -> int:
        kho_in = getattr(self.kernel, "kho_in", None)
        return kho_in.metadata.kexec_count if kho_in and kho_in.metadata else 0

    def _release(self) -> str:
        return self.kernel.header.release

    def _metadata_blob(self) -> bytes:
        """kexec-metadata as finalize adds it: the participants' time is known by then."""
        assert self.metadata is not None
        serialize = self.kernel.kho.timings["serialize"]
        self.metadata = replace(self.metadata,
                                phases={**self.metadata.phases, "serialize": serialize})
        return self.metadata.to_fdt()

    def _rewrite_metadata(self, **changes: object) -> None:
        """Rewrite kexec-metadata in place (later phase timings, the exec time)."""
        assert self.metadata is not None
        self.metadata = replace(self.metadata, **changes)
        self.kernel.kho.update_subtree(METADATA_NODE, self.metadata.to_fdt())

    def _write_boot_params(self, fdt_phys: int, fdt_size: int, cmdline: str) -> None:
        header = self.kernel.header
        header.set_boot_params(fdt_phys, fdt_size, cmdline)
        header.state = MachineState.HANDED_OVER
        self.kernel.write_header()

    def _undo_prepare(self) -> None:
        if self.kernel.header.boot_params.valid:
            self._clear_boot_params()
        if self.kernel.kho.finalized:
            self.kernel.kho.abort()
        self.metadata = None

    def _clear_boot_params(self) -> None:
        header = self.kernel.header
        header.clear_boot_params()
        header.state = MachineState.RUNNING
        self.kernel.write_header()

    # -- poison / exec ----------------------------------------------------------------------

    def poison(self) -> int:
        """Overwrite with POISON_BYTE every page that is neither preserved, nor scratch,
        nor page 0; returns the number of pages poisoned.  No way back after this."""
        if self.state is not KexecState.PREPARED:
            raise KexecError("Poisoning needs a prepared kexec.", "poison")
        t0 = time.perf_counter_ns()
        mask = poison_mask(self.kernel)
        self.state = KexecState.POISONED
        mem = self.kernel.arena.array()
        for start, end in runs(mask):
            mem[start * PAGE_SIZE:end * PAGE_SIZE] = POISON_BYTE
        pages = int(np.count_nonzero(mask))
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
        self._rewrite_metadata(exec_time_ns=time.time_ns())
        self.kernel.arena.flush()
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

    def execute(self, poison: bool | None = None) -> NoReturn:
        """prepare + (poison) + exec, for users without a filesystem to quiesce.

        ``poison`` defaults to the command line's ``kho_poison``.
        """
        if self.loaded is None:
            raise KexecError("No next kernel is loaded (kexec load first).", "exec")
        self.prepare({})
        if self.kernel.cmdline.kho_poison if poison is None else poison:
            self.poison()
        self.exec()


def poison_mask(kernel: Kernel) -> np.ndarray:
    """Bool per page: poison it? (Not preserved, not scratch, not the header page.)"""
    mask = ~kernel.kho.track.page_mask()
    for start, n in kernel.scratch_ranges():
        mask[start:start + n] = False
    mask[0] = False
    return mask


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
