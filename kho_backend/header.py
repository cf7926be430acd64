"""The machine header in page 0 of the arena, including the boot-parameter slot.

Page 0 stands for what firmware and the boot loader tell a kernel: the machine's layout,
the scratch areas, and (the stand-in for x86 ``setup_data`` of type ``SETUP_KEXEC_KHO``)
where the previous kernel left its KHO FDT. Every field is little-endian at a fixed
offset; the whole 4096-byte page is covered by a CRC32.

The layout (format version 1) is specified in docs/handover-abi.md, "Machine header";
`HEADER_FIELDS` and `SCRATCH_ENTRY` below are its only definition in code, and a test
checks the two against each other.

The boot-parameter slot is written by ``kexec`` (state HANDED_OVER) and cleared by the
boot that consumed it once every handed-over page has been restored or released, so a
boot that fails half-way can simply be retried.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from .arena import MAX_NODES, check_geometry
from .checksum import crc32_at, seal_crc32
from .cmdline import ScratchPolicy
from .errors import ArenaError, HeaderError
from .units import PAGE_SHIFT, PAGE_SIZE, format_size

if TYPE_CHECKING:
    from .arena import Arena

MAGIC = b"GUESTMEM"
VERSION = 1
HEADER_SIZE = PAGE_SIZE
CMDLINE_MAX = 1024
RELEASE_MAX = 64
MAX_SCRATCH = 2 + MAX_NODES
BP_VALID = 1

HEADER_FIELDS = struct.Struct(
    "<8sIIQIIIIQQQ64s"  # magic .. release                                 (0..128)
    "IIQQQII"  # scratch policy, nr_scratch, reserved                        (128..168)
    "IIQQQQ1024s"  # boot parameters                                         (168..1232)
)
SCRATCH_ENTRY = struct.Struct("<IIQQ")
CRC_OFFSET = 12
SCRATCH_TABLE_OFFSET = HEADER_FIELDS.size
HEADER_END = SCRATCH_TABLE_OFFSET + MAX_SCRATCH * SCRATCH_ENTRY.size
assert SCRATCH_TABLE_OFFSET == 1232 and HEADER_END == 2816 <= HEADER_SIZE


class MachineState(IntEnum):
    """What the last kernel did with the machine."""

    FRESH = 0  # created, never booted
    RUNNING = 1  # a kernel runs it (or crashed while running it)
    HANDED_OVER = 2  # a kernel handed over through the boot parameters and stopped


class ScratchKind(IntEnum):
    """The three kinds of scratch area, as in the kernel's ``kho_scratch`` layout."""

    LOWMEM = 0
    GLOBAL = 1
    NODE = 2


class _PolicyMode(IntEnum):
    NONE = 0
    PERCENT = 1
    SIZES = 2


@dataclass(frozen=True)
class ScratchArea:
    """One scratch area: ``npages`` pages from ``start_pfn``; ``node`` for NODE areas."""

    kind: ScratchKind
    node: int
    start_pfn: int
    npages: int

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.npages


@dataclass
class BootParams:
    """The ``SETUP_KEXEC_KHO`` stand-in: where the handover is, for the next kernel."""

    valid: bool = False
    fdt_phys: int = 0
    fdt_size: int = 0
    scratch_phys: int = 0
    scratch_size: int = 0
    cmdline: str = ""


@dataclass
class MachineHeader:
    """Page 0 of the arena, unpacked. ``pack()``/``unpack()`` give and take 4096 bytes."""

    arena_size: int
    nr_nodes: int = 1
    state: MachineState = MachineState.FRESH
    pid: int = 0
    boot_count: int = 0
    release: str = ""
    memmap_pfn: int = 0
    memmap_npages: int = 0
    scratch_policy: ScratchPolicy | None = None  # None until the first boot sized scratch
    scratch: list[ScratchArea] = field(default_factory=list)
    boot_params: BootParams = field(default_factory=BootParams)
    version: int = VERSION
    page_size: int = PAGE_SIZE

    # -- boot-parameter slot ------------------------------------------------------------

    def set_boot_params(self, fdt_phys: int, fdt_size: int, cmdline: str = "") -> None:
        """Fill the slot for the next kernel (scratch fields point at the table in page 0)."""
        self.boot_params = BootParams(
            valid=True,
            fdt_phys=fdt_phys,
            fdt_size=fdt_size,
            scratch_phys=SCRATCH_TABLE_OFFSET,
            scratch_size=len(self.scratch) * SCRATCH_ENTRY.size,
            cmdline=cmdline,
        )
        _check_boot_params(self.boot_params, self.arena_size, len(self.scratch))

    def clear_boot_params(self) -> None:
        """Empty the slot (the handover has been consumed, or the kexec was aborted)."""
        self.boot_params = BootParams()

    # -- (un)packing ------------------------------------------------------------------------

    def pack(self) -> bytes:
        """The 4096-byte page 0 image, checksummed; HeaderError if a field does not fit."""
        self._check_fits()
        bp = self.boot_params
        cmdline = bp.cmdline.encode()
        policy = self.scratch_policy
        mode, percent, low, glob, node = _policy_fields(policy)
        fixed = HEADER_FIELDS.pack(
            MAGIC, self.version, 0, self.arena_size, self.page_size, self.nr_nodes,
            int(self.state), self.pid, self.boot_count, self.memmap_pfn, self.memmap_npages,
            self.release.encode(),
            mode, percent, low, glob, node, len(self.scratch), 0,
            BP_VALID if bp.valid else 0, len(cmdline), bp.fdt_phys, bp.fdt_size,
            bp.scratch_phys, bp.scratch_size, cmdline,
        )  # fmt: skip
        table = b"".join(
            SCRATCH_ENTRY.pack(int(a.kind), a.node, a.start_pfn, a.npages) for a in self.scratch
        )
        page = bytearray(HEADER_SIZE)
        page[: len(fixed)] = fixed
        page[SCRATCH_TABLE_OFFSET : SCRATCH_TABLE_OFFSET + len(table)] = table
        seal_crc32(page, CRC_OFFSET)
        return bytes(page)

    @classmethod
    def unpack(cls, page: bytes | memoryview, file_size: int | None = None) -> MachineHeader:
        """Parse and fully validate page 0; HeaderError (or ArenaError for a size that does
        not match ``file_size``) names what is wrong. Never modifies ``page``."""
        page = bytes(page[:HEADER_SIZE])
        if len(page) < HEADER_SIZE:
            raise ArenaError(
                f"This is not a guestfs arena: it is only {len(page)} bytes long, "
                f"shorter than the {HEADER_SIZE}-byte header."
            )
        f = HEADER_FIELDS.unpack_from(page)
        if f[0] != MAGIC:
            raise HeaderError(
                f"This is not a guestfs arena: page 0 starts with {f[0]!r}, not the magic {MAGIC!r}."
            )
        if f[1] != VERSION:
            raise HeaderError(
                f"The machine header has format version {f[1]}; this guestfs reads only "
                f"version {VERSION}."
            )
        crc = crc32_at(page, CRC_OFFSET)
        if crc != f[2]:
            raise HeaderError(
                f"The machine header is corrupt: its checksum is {f[2]:#010x} but its "
                f"contents give {crc:#010x}."
            )
        header = cls._from_fields(f, page)
        header._validate(file_size)
        return header

    @classmethod
    def _from_fields(cls, f: tuple, page: bytes) -> MachineHeader:
        (_, version, _, size, page_size, nodes, state, pid, boots, mm_pfn, mm_n, release,
         mode, percent, low, glob, node, nr_scratch, _,
         flags, cmd_len, fdt_phys, fdt_size, scr_phys, scr_size, cmdline) = f  # fmt: skip
        if state not in MachineState._value2member_map_:
            raise HeaderError(f"The machine header has an unknown state {state}.")
        if mode not in _PolicyMode._value2member_map_:
            raise HeaderError(f"The machine header has an unknown scratch policy {mode}.")
        if flags & ~BP_VALID:
            raise HeaderError(f"The boot parameters have unknown flags {flags:#x}.")
        if nr_scratch > MAX_SCRATCH or cmd_len > CMDLINE_MAX:
            raise HeaderError(
                f"The machine header is inconsistent: {nr_scratch} scratch areas (at most "
                f"{MAX_SCRATCH}) and a {cmd_len}-byte command line (at most {CMDLINE_MAX})."
            )
        try:
            release_text = release.rstrip(b"\0").decode()
            cmdline_text = cmdline[:cmd_len].decode()
        except UnicodeDecodeError as e:
            raise HeaderError(f"The machine header holds text that is not UTF-8: {e}.") from e
        return cls(
            arena_size=size, nr_nodes=nodes, state=MachineState(state), pid=pid,
            boot_count=boots, release=release_text, memmap_pfn=mm_pfn, memmap_npages=mm_n,
            scratch_policy=_policy_from_fields(_PolicyMode(mode), percent, low, glob, node),
            scratch=[_unpack_area(page, i) for i in range(nr_scratch)],
            boot_params=BootParams(bool(flags & BP_VALID), fdt_phys, fdt_size, scr_phys,
                                   scr_size, cmdline_text),
            version=version, page_size=page_size,
        )  # fmt: skip

    def _validate(self, file_size: int | None) -> None:
        if self.page_size != PAGE_SIZE:
            raise HeaderError(
                f"The machine header says the page size is {self.page_size}; guestfs uses {PAGE_SIZE}."
            )
        try:
            check_geometry(self.arena_size, self.nr_nodes)
        except ArenaError as e:
            raise HeaderError(f"The machine header describes an impossible machine: {e}") from e
        if file_size is not None and file_size != self.arena_size:
            raise ArenaError(
                f"The arena file is {format_size(file_size)} ({file_size} bytes) but its header "
                f"says {format_size(self.arena_size)} ({self.arena_size} bytes)."
            )
        npages = self.arena_size >> PAGE_SHIFT
        if self.memmap_npages and not 0 < self.memmap_pfn <= npages - self.memmap_npages:
            raise HeaderError(
                f"The machine header puts the memmap at pages [{self.memmap_pfn}, "
                f"{self.memmap_pfn + self.memmap_npages}), outside the arena of {npages} pages."
            )
        _check_scratch_table(self.scratch, npages, self.nr_nodes)
        if self.boot_params.valid:
            _check_boot_params(self.boot_params, self.arena_size, len(self.scratch))

    def _check_fits(self) -> None:
        if len(self.release.encode()) > RELEASE_MAX or "\0" in self.release:
            raise HeaderError(
                f"The release {self.release!r} must be at most {RELEASE_MAX} bytes, without NUL."
            )
        if len(self.boot_params.cmdline.encode()) > CMDLINE_MAX:
            raise HeaderError(
                f"The next kernel's command line is longer than {CMDLINE_MAX} bytes."
            )
        if len(self.scratch) > MAX_SCRATCH:
            raise HeaderError(f"There are more than {MAX_SCRATCH} scratch areas.")

    # -- arena I/O ---------------------------------------------------------------------

    @classmethod
    def read(cls, arena: Arena) -> MachineHeader:
        """Read and validate the header of a mapped arena."""
        return cls.unpack(arena.view(0), arena.size)

    def write(self, arena: Arena) -> None:
        """Write this header to page 0 of ``arena``."""
        arena.view(0)[:] = self.pack()


def _policy_fields(policy: ScratchPolicy | None) -> tuple[int, int, int, int, int]:
    if policy is None:
        return _PolicyMode.NONE, 0, 0, 0, 0
    if policy.percent is not None:
        return _PolicyMode.PERCENT, policy.percent, 0, 0, 0
    return _PolicyMode.SIZES, 0, policy.lowmem, policy.global_, policy.pernode


def _policy_from_fields(
    mode: _PolicyMode, percent: int, low: int, glob: int, node: int
) -> ScratchPolicy | None:
    if mode is _PolicyMode.NONE:
        return None
    if mode is _PolicyMode.PERCENT:
        return ScratchPolicy(percent=percent)
    return ScratchPolicy(percent=None, lowmem=low, global_=glob, pernode=node)


def _unpack_area(page: bytes, index: int) -> ScratchArea:
    kind, node, start, npages = SCRATCH_ENTRY.unpack_from(page, SCRATCH_TABLE_OFFSET + index * SCRATCH_ENTRY.size)
    if kind not in ScratchKind._value2member_map_:
        raise HeaderError(f"Scratch area {index} in the machine header has an unknown kind {kind}.")
    return ScratchArea(ScratchKind(kind), node, start, npages)


def _check_scratch_table(areas: list[ScratchArea], npages: int, nodes: int) -> None:
    spans = sorted((a.start_pfn, a.end_pfn) for a in areas)
    for a in areas:
        if not (0 < a.start_pfn and a.npages > 0 and a.end_pfn <= npages and a.node < nodes):
            raise HeaderError(
                f"The {a.kind.name.lower()} scratch area of node {a.node}, pages "
                f"[{a.start_pfn}, {a.end_pfn}), does not fit the machine ({npages} pages, "
                f"{nodes} node(s))."
            )
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise HeaderError(f"Two scratch areas in the machine header overlap at page {start}.")


def _check_boot_params(bp: BootParams, arena_size: int, nr_scratch: int) -> None:
    if not (0 < bp.fdt_size and bp.fdt_phys >= PAGE_SIZE and bp.fdt_phys + bp.fdt_size <= arena_size):
        raise HeaderError(
            f"The boot parameters put the KHO FDT at [{bp.fdt_phys:#x}, "
            f"{bp.fdt_phys + bp.fdt_size:#x}), outside the arena's memory "
            f"[{PAGE_SIZE:#x}, {arena_size:#x})."
        )
    table = (SCRATCH_TABLE_OFFSET, nr_scratch * SCRATCH_ENTRY.size)
    if (bp.scratch_phys, bp.scratch_size) != table:
        raise HeaderError(
            f"The boot parameters describe the scratch table as {bp.scratch_size} bytes at "
            f"{bp.scratch_phys:#x}, but it is {table[1]} bytes at {table[0]:#x}."
        )
