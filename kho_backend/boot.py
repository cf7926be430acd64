"""Booting a kernel on a machine: ``boot()`` returns a running :class:`Kernel`.

The sequence, as a kernel with KHO does it:

1. *open*: open (or create) the arena and take the machine lock; validate the header.
2. Decide what kind of boot this is. Valid boot parameters mean a handover (a KHO boot);
   then the command line in the boot-parameter slot wins over the caller's. Without
   them, an arena whose last kernel did not hand over (it crashed, or was shut down
   without kexec) is taken up through that kernel's live KHO root when the root holds
   a subtree or a pool (a *crash boot*, as a panic kexec would hand it over); otherwise
   it is refused unless ``format=True``, so files are never silently lost.
3. *handover-parse*: read and validate the whole handover (``IncomingHandover.parse``):
   its maps, and that its blocks leave page 0 and scratch alone and never overlap,
   before a single byte of the arena is written: a refused handover leaves the arena
   untouched.
4. *memblock*: boot-time allocator; scratch-only on a KHO boot.
5. *memmap*: allocate the per-page state from memblock (from scratch on a KHO boot:
   scratch too small is a BootError naming the sizes) and reset it.
6. *scratch*: at the machine's first boot size and place the scratch areas from this
   boot's memblock use; later boots reuse the recorded ones. They turn CMA-like.
7. *reserve*: memblock's reservations become RESERVED pages; everything the handover
   occupies PRESERVED.
8. *page-alloc*: start the buddy allocator. Write the header: RUNNING, our pid, boot
   count + 1, memmap location, release, no live root yet; after a crash boot the boot
   parameters now name the dead kernel's root (flagged crashed), so a retry finds it.
9. *kho*: the outgoing KHO, kexec, and the incoming handover attached to the kernel.

The boot parameters stay in place until :meth:`Kernel.finish_boot`, after the subsystems
restored what they were handed, so a boot that fails half-way can be retried; KHO
writes its live root there too (or when a subsystem first adds to it), so a boot that
fails before writes nothing outside page 0 and scratch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .arena import Arena
from .cmdline import Cmdline
from .errors import ArenaError, BootError, HandoverError, OutOfMemory
from .header import MachineHeader, MachineState
from .kexec import Kexec
from .kho import KHO
from .kho_in import IncomingHandover
from .machine import create_machine, machine_exists, open_machine, validate_name
from .memblock import Memblock
from .memmap import Memmap
from .page_alloc import PageAllocator
from .scratch import low_limit, setup_scratch
from .units import PAGE_SHIFT, format_size

log = logging.getLogger(__name__)

RELEASE = f"guestfs {__version__}"


@dataclass(eq=False)
class Kernel:
    """A booted kernel: the machine it runs and its memory-management state."""

    name: str
    arena: Arena
    header: MachineHeader
    cmdline: Cmdline
    memblock: Memblock
    memmap: Memmap
    buddy: PageAllocator
    kho: KHO
    kexec: Kexec
    kho_in: IncomingHandover | None = None  # None on a cold boot
    boot_timings: dict[str, int] = field(default_factory=dict)  # phase -> ns

    def finish_boot(self) -> int:
        """End of boot: publish this kernel's live KHO root, free what the handover
        occupies and nobody restored (returns how many pages), clear the boot-parameter
        slot and mark the header RUNNING. In that order: until the slot is cleared a
        retry finds the handover whole, since nothing is allocated after the release."""
        self.kho.go_live()
        released = self.kho_in.release_unclaimed() if self.kho_in is not None else 0
        self.header.clear_boot_params()
        self.header.state = MachineState.RUNNING
        self.write_header()
        return released

    def write_header(self) -> None:
        """Write ``self.header`` to page 0."""
        self.header.write(self.arena)

    def scratch_ranges(self) -> list[tuple[int, int]]:
        """The scratch areas as ``(start_pfn, npages)``."""
        return [(a.start_pfn, a.npages) for a in self.header.scratch]

    def shutdown(self, *, keep_mapping: bool = False) -> None:
        """Stop without handing over: flush, unmap, release the lock. The header still
        says RUNNING with our pid, so the next boot knows this kernel did not hand over.
        ``keep_mapping``: a next kernel boots in this process; it takes the mapping over
        (see :meth:`Arena.close`)."""
        self.arena.flush()
        self.arena.close(keep_mapping=keep_mapping)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def boot(machine: str, *, memory: int | None = None, nodes: int = 1, cmdline: str = "",
         create: bool = True, format: bool = False, machine_dir: Path | None = None) -> Kernel:  # fmt: skip
    """Boot a kernel on ``machine`` (created with ``memory`` bytes and ``nodes`` nodes if
    it does not exist and ``create`` is true).

    ``memory``, given for an existing machine, must match it. ``format=True`` boots empty
    even if the previous kernel crashed or left a handover (which is then discarded).
    Raises ArenaError (missing, in use, not an arena), HeaderError, HandoverError (a
    handover that cannot be trusted; the arena is left untouched) or BootError.
    """
    timings: dict[str, int] = {}
    started = time.perf_counter_ns()
    with _phase(timings, "open"):
        arena, header = _open(machine, memory, nodes, create, machine_dir)
    try:
        kernel = _boot(machine, arena, header, cmdline, format, timings)
    except BaseException:
        arena.close()
        raise
    timings["total"] = time.perf_counter_ns() - started
    log.info(
        "booted %s (boot %d%s) in %.1f ms", machine, header.boot_count, _kind(kernel.kho_in),
        timings["total"] / 1e6,
    )  # fmt: skip
    return kernel


def _kind(kho_in: IncomingHandover | None) -> str:
    if kho_in is None:
        return ""
    return ", from the live state of a crashed kernel" if kho_in.crashed else ", from a KHO handover"


# -- the steps ------------------------------------------------------------------------------


def _open(name: str, memory: int | None, nodes: int, create: bool,
          directory: Path | None) -> tuple[Arena, MachineHeader]:  # fmt: skip
    validate_name(name)
    if machine_exists(name, directory):
        arena, header = open_machine(name, directory, memory=memory)
        if nodes not in (1, header.nr_nodes):  # 1 is the default: "whatever it has"
            arena.close()
            raise ArenaError(
                f"Machine {name!r} has {header.nr_nodes} NUMA node(s), not {nodes}; "
                "its layout cannot change."
            )
        return arena, header
    if not create:
        raise ArenaError(f"There is no machine named {name!r}.")
    if memory is None:
        raise ArenaError(f"Machine {name!r} does not exist; give a memory size to create it.")
    log.info("creating machine %s: %s, %d node(s)", name, format_size(memory), nodes)
    return create_machine(name, memory, nodes, directory)


def _boot(name: str, arena: Arena, header: MachineHeader, cmdline: str, fmt: bool,
          timings: dict[str, int]) -> Kernel:  # fmt: skip
    params = header.boot_params
    from_slot = params.valid and not fmt
    cmd = Cmdline.parse(params.cmdline if from_slot else cmdline)
    scratch = [(a.start_pfn, a.npages) for a in header.scratch]
    kho_in = None
    if from_slot:
        _check_kho_on(name, cmd, "holds a handover from the previous kernel")
        with _phase(timings, "handover-parse"):
            kho_in = IncomingHandover.parse(arena, params.fdt_phys, params.fdt_size,
                                            scratch=scratch, crashed=params.crashed)
    elif not fmt and header.state is MachineState.RUNNING and header.live_root_size:
        with _phase(timings, "handover-parse"):
            kho_in = _crashed_state(name, arena, header, scratch)
        if kho_in is not None:
            _check_kho_on(name, cmd, "holds the live state of a kernel that crashed")
    _check_previous_kernel(name, header, kho_in is not None, fmt)

    with _phase(timings, "memblock"):
        ranges = arena.node_ranges()
        memblock = Memblock(ranges, low_limit=low_limit(ranges), scratch=header.scratch,
                            scratch_only=kho_in is not None)
        memblock.reserve(0, 1)  # the machine header
    with _phase(timings, "memmap"):
        memmap = _alloc_memmap(arena, memblock)
    with _phase(timings, "scratch"):
        for area in setup_scratch(header, cmd.kho_scratch, memblock):
            memmap.mark_scratch(area.start_pfn, area.npages)
        memblock.scratch_only = False  # preserved memory is known: scratch becomes CMA
    with _phase(timings, "reserve"):
        for start, end in memblock.reserved:
            memmap.mark_reserved(start, end - start)
        if kho_in is not None:
            for leaves in kho_in.reserved_blocks():     # disjoint: checked by parse
                memmap.set_preserved(leaves, disjoint=True)
    with _phase(timings, "page-alloc"):
        buddy = PageAllocator(arena, memmap)
    _start_running(arena, header, memmap, kho_in, cmdline)
    with _phase(timings, "kho"):
        scratch = [(a.start_pfn, a.npages) for a in header.scratch]
        kho = KHO(arena, buddy, memmap, scratch, header)
        kexec = Kexec(arena, header, kho, cmd, scratch, kho_in.metadata if kho_in else None)
        if kho_in is not None:
            kho_in.attach(buddy, kho)
    return Kernel(name, arena, header, cmd, memblock, memmap, buddy, kho, kexec, kho_in,
                  boot_timings=timings)


def _crashed_state(name: str, arena: Arena, header: MachineHeader,
                   scratch: list[tuple[int, int]]) -> IncomingHandover | None:
    """The live state the crashed previous kernel left, validated as a handover, or None
    when its live root holds nothing to take up."""
    try:
        kho_in = IncomingHandover.parse(arena, header.live_root_phys, header.live_root_size,
                                        scratch=scratch, crashed=True)
    except HandoverError as e:
        raise HandoverError(
            f"The previous kernel (pid {header.pid}) of machine {name!r} ended without "
            f"handing over, and its live KHO root cannot be trusted: {e}"
        ) from e
    return kho_in if kho_in.holds_state else None


def _start_running(arena: Arena, header: MachineHeader, memmap: Memmap,
                   kho_in: IncomingHandover | None, cmdline: str) -> None:
    """Write the header of the running kernel, before it publishes a live root."""
    if kho_in is None:
        header.clear_boot_params()  # a discarded handover must never be picked up later
    elif kho_in.crashed and not header.boot_params.valid:
        # The dead kernel's live root becomes this boot's handover, as a panic kexec
        # would have passed it: a retry of this boot finds it there.
        header.set_boot_params(kho_in.fdt_phys, kho_in.fdt_size, cmdline, crashed=True)
    header.state = MachineState.RUNNING
    header.pid = os.getpid()
    header.boot_count += 1
    header.memmap_pfn, header.memmap_npages = memmap.first_pfn, memmap.npages
    header.release = RELEASE
    header.live_root_phys = header.live_root_size = 0
    header.write(arena)


def _check_kho_on(name: str, cmd: Cmdline, what: str) -> None:
    if not cmd.kho:
        raise BootError(
            f"Machine {name!r} {what}, but the command line says kho=off, so this kernel "
            "cannot take it."
        )


def _check_previous_kernel(name: str, header: MachineHeader, handover: bool, fmt: bool) -> None:
    """Refuse a boot that would silently lose the previous kernel's files."""
    if handover or fmt or header.state is MachineState.FRESH:
        return
    raise BootError(
        f"The previous kernel (pid {header.pid}) of machine {name!r} ended without "
        "handing over; its files cannot be recovered."
    )


def _alloc_memmap(arena: Arena, memblock: Memblock) -> Memmap:
    npages = Memmap.pages_needed(arena.npages)
    try:
        pfn = memblock.alloc(npages)
    except OutOfMemory as e:
        if memblock.scratch_only:
            largest, total = memblock.largest_free(), memblock.total_free()
            raise BootError(
                f"Scratch is too small to boot with this handover: the memmap needs {npages} "
                f"pages ({format_size(npages << PAGE_SHIFT)}) in one piece, but the largest "
                f"free scratch range is {largest} pages ({format_size(largest << PAGE_SHIFT)}) "
                f"of {total} pages ({format_size(total << PAGE_SHIFT)}) free scratch. The "
                "scratch areas were sized at the machine's first boot."
            ) from e
        raise BootError(f"The machine has too little memory to boot: {e}") from e
    return Memmap(arena, pfn, reset=True)


@contextmanager
def _phase(timings: dict[str, int], name: str) -> Iterator[None]:
    start = time.perf_counter_ns()
    try:
        yield
    finally:
        timings[name] = time.perf_counter_ns() - start
