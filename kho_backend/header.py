"""The machine header in page 0 of the arena, including the boot-parameter slot.

Page 0 stands for what firmware and the boot loader tell a kernel: the machine's layout,
the scratch areas, where the running kernel keeps its live KHO root, and (the stand-in
for x86 ``setup_data`` of type ``SETUP_KEXEC_KHO``) where the previous kernel left its
handover. Every field is little-endian at a fixed offset.

Format version 2 (docs/handover-abi.md, "Machine header") survives a SIGKILL at any
instant of any write. The *static* part (layout, scratch policy and table) has a CRC of
its own and is written only when the machine is created and when its first boot sizes
the scratch areas. The *dynamic* part (state, pid, boot count, memmap, release, boot
parameters, live root) is kept twice, each copy with a sequence number and a CRC: a
write goes to the older copy, a reader takes the valid copy with the higher sequence,
so a torn write leaves the previous state readable. The static part's pieces lie where
version 1 kept the same fields, so a version-1 page (release 0.2.0) turns into version 2
by writing one copy where version 1 had reserved bytes and then one aligned 8-byte word
(version and static CRC): it is readable as one version or the other at every instant.

`STATIC_HEAD`, `STATIC_POLICY`, `DYNAMIC`, `SCRATCH_ENTRY` and `V1_FIELDS` below are the
only definition of these layouts in code; a test checks them against the document.

The boot-parameter slot is written by ``kexec`` (state HANDED_OVER), or by a boot that
takes the live state of a crashed kernel, and cleared by the boot that consumed it once
every handed-over page has been restored or released, so a boot that fails half-way can
simply be retried.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from .arena import MAX_NODES, check_geometry
from .checksum import crc32_at, seal_crc32
from .cmdline import ScratchPolicy
from .errors import ArenaError, HeaderError
from .units import PAGE_SHIFT, PAGE_SIZE, format_size

if TYPE_CHECKING:
    from .arena import Arena

MAGIC = b"GUESTMEM"
VERSION = 2
HEADER_SIZE = PAGE_SIZE
#: Longest command line the boot-parameter slot holds (version 1 held 1024 bytes; two
#: copies of the dynamic part leave room for 896).
CMDLINE_MAX = 896
RELEASE_MAX = 64
MAX_SCRATCH = 2 + MAX_NODES
BP_VALID = 1
#: Boot-parameter flag: the handover is the live state of a kernel that crashed.
BP_CRASHED = 2

#: Static part, first piece (bytes 0..32): magic, version, static CRC, size, page size, nodes.
STATIC_HEAD = struct.Struct("<8sIIQII")
#: Static part, second piece (bytes 128..168): scratch policy, percent, the three sizes,
#: number of scratch areas, reserved.
STATIC_POLICY = struct.Struct("<IIQQQII")
POLICY_OFFSET = 128
SCRATCH_ENTRY = struct.Struct("<IIQQ")
#: Static part, third piece: the scratch table.
SCRATCH_TABLE_OFFSET = 1232
SCRATCH_TABLE_END = SCRATCH_TABLE_OFFSET + MAX_SCRATCH * SCRATCH_ENTRY.size
STATIC_RANGES = ((0, STATIC_HEAD.size), (POLICY_OFFSET, POLICY_OFFSET + STATIC_POLICY.size),
                 (SCRATCH_TABLE_OFFSET, SCRATCH_TABLE_END))
#: Where the static CRC lies, in the page and in the concatenated static pieces.
CRC_OFFSET = 12
#: The aligned 8-byte word holding the version and the static CRC.
VERSION_WORD = 8
#: One copy of the dynamic part: sequence, CRC, state, pid, boot-parameter flags, boot
#: count, memmap (first pfn, pages), live root (phys, size), boot parameters (fdt_phys,
#: fdt_size, scratch_phys, scratch_size, command-line length), reserved, release,
#: command line.
DYNAMIC = struct.Struct(f"<QIIIIQQQQQQQQQII{RELEASE_MAX}s{CMDLINE_MAX}s")
DYNAMIC_CRC_OFFSET = 8
#: The two copies: where version 1 kept its boot parameters, and its reserved tail.
DYNAMIC_OFFSETS = (POLICY_OFFSET + STATIC_POLICY.size, SCRATCH_TABLE_END)
#: Version 1 (release 0.2.0), read only: one image of the page up to the scratch table,
#: checked by one CRC over the page whose last bytes (reserved there) are taken as zero.
V1_FIELDS = struct.Struct(
    "<8sIIQIIIIQQQ64s"  # magic .. release                                 (0..128)
    "IIQQQII"  # scratch policy, nr_scratch, reserved                        (128..168)
    "IIQQQQ1024s"  # boot parameters                                         (168..1232)
)
V1_CMDLINE_MAX = 1024
assert DYNAMIC.size == SCRATCH_TABLE_OFFSET - DYNAMIC_OFFSETS[0] == 1064
assert DYNAMIC_OFFSETS[1] + DYNAMIC.size <= HEADER_SIZE and V1_FIELDS.size == SCRATCH_TABLE_OFFSET


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
    """The ``SETUP_KEXEC_KHO`` stand-in: where the handover is, for the next kernel.

    ``crashed``: the handover is the live root of a kernel that died without handing
    over, taken up by the boot that found it (as a panic kexec would hand it over)."""

    valid: bool = False
    fdt_phys: int = 0
    fdt_size: int = 0
    scratch_phys: int = 0
    scratch_size: int = 0
    cmdline: str = ""
    crashed: bool = False


@dataclass
class MachineHeader:
    """Page 0 of the arena, unpacked: :meth:`read` / :meth:`write` it, or
    :meth:`pack` / :meth:`unpack` a whole page."""

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
    #: The running kernel's KHO root FDT (0, 0: none), rewritten whenever it changes.
    live_root_phys: int = 0
    live_root_size: int = 0
    page_size: int = PAGE_SIZE
    #: The format of the page this header was read from or last written to, and the
    #: sequence number and copy (0 or 1) of its dynamic part: where it is, not what.
    version: int = field(default=VERSION, compare=False)
    sequence: int = field(default=0, compare=False)
    slot: int = field(default=1, compare=False)

    # -- boot-parameter slot and live root ---------------------------------------------

    def set_boot_params(self, fdt_phys: int, fdt_size: int, cmdline: str = "", *,
                        crashed: bool = False) -> None:
        """Fill the slot for the next kernel (scratch fields point at the table in page 0)."""
        self.boot_params = BootParams(
            valid=True,
            fdt_phys=fdt_phys,
            fdt_size=fdt_size,
            scratch_phys=SCRATCH_TABLE_OFFSET,
            scratch_size=len(self.scratch) * SCRATCH_ENTRY.size,
            cmdline=cmdline,
            crashed=crashed,
        )
        _check_boot_params(self.boot_params, self.arena_size, len(self.scratch))

    def clear_boot_params(self) -> None:
        """Empty the slot (the handover has been consumed, or the kexec was aborted)."""
        self.boot_params = BootParams()

    def set_live_root(self, phys: int, size: int, *, handover: bool = False) -> None:
        """Record where the running kernel's KHO root now is. With ``handover`` (its
        handover is prepared) valid boot parameters follow it, since that root is what
        they hand over."""
        _check_live_root(phys, size, self.arena_size)
        self.live_root_phys, self.live_root_size = phys, size
        if handover and self.boot_params.valid:
            self.boot_params.fdt_phys, self.boot_params.fdt_size = phys, size

    # -- (un)packing ------------------------------------------------------------------------

    def pack(self) -> bytes:
        """A whole version-2 page 0 with this header (the dynamic part in copy 0)."""
        self._check_fits()
        page = bytearray(HEADER_SIZE)
        for (start, end), piece in zip(STATIC_RANGES, _split_static(self._static_bytes())):
            page[start:end] = piece
        page[DYNAMIC_OFFSETS[0]:DYNAMIC_OFFSETS[0] + DYNAMIC.size] = \
            self._dynamic_bytes(max(self.sequence, 1))
        return bytes(page)

    @classmethod
    def unpack(cls, page: bytes | memoryview, file_size: int | None = None) -> MachineHeader:
        """Parse and fully validate page 0 (version 2, or 1 as release 0.2.0 wrote it);
        HeaderError (or ArenaError for a size that does not match ``file_size``) names
        what is wrong. Never modifies ``page``."""
        page = bytes(page[:HEADER_SIZE])
        if len(page) < HEADER_SIZE:
            raise ArenaError(
                f"This is not a guestfs arena: it is only {len(page)} bytes long, "
                f"shorter than the {HEADER_SIZE}-byte header."
            )
        magic, version = struct.unpack_from("<8sI", page)
        if magic != MAGIC:
            raise HeaderError(
                f"This is not a guestfs arena: page 0 starts with {magic!r}, not the magic {MAGIC!r}."
            )
        if version == 1:
            header = cls._unpack_v1(page)
        elif version == VERSION:
            header = cls._unpack_v2(page)
        else:
            raise HeaderError(
                f"The machine header has format version {version}; this guestfs reads "
                f"versions 1 and {VERSION}."
            )
        header._validate(file_size)
        return header

    @classmethod
    def _unpack_v2(cls, page: bytes) -> MachineHeader:
        static = b"".join(page[start:end] for start, end in STATIC_RANGES)
        stored = struct.unpack_from("<I", static, CRC_OFFSET)[0]
        sized = crc32_at(static, CRC_OFFSET) == stored
        if not sized:
            # The first boot's sizing of scratch is the only rewrite of the static part,
            # from the unsized state: a write it did not finish still has that CRC.
            unsized = static[:STATIC_HEAD.size] + bytes(len(static) - STATIC_HEAD.size)
            if crc32_at(unsized, CRC_OFFSET) != stored:
                raise HeaderError(
                    f"The machine header is corrupt: the checksum of its static part is "
                    f"{stored:#010x} but its contents give {crc32_at(static, CRC_OFFSET):#010x}."
                )
            static = unsized
        copies = [c for c in (_read_copy(page, slot) for slot in (0, 1)) if c is not None]
        if not copies:
            raise HeaderError(
                "The machine header is corrupt: neither copy of its dynamic part (state, "
                "boot parameters) passes its checksum."
            )
        sequence, slot, dynamic = max(copies)
        header = cls._from_fields(static, dynamic, version=VERSION)
        header.sequence, header.slot = sequence, slot
        if not sized and header.state is not MachineState.FRESH:
            raise HeaderError(
                "The machine header is corrupt: its static part fails its checksum, and "
                f"the machine has run (state {header.state.name}), so it is not a first "
                "boot's unfinished write."
            )
        return header

    @classmethod
    def _unpack_v1(cls, page: bytes) -> MachineHeader:
        image = page[:SCRATCH_TABLE_END] + bytes(HEADER_SIZE - SCRATCH_TABLE_END)
        stored = struct.unpack_from("<I", image, CRC_OFFSET)[0]
        if crc32_at(image, CRC_OFFSET) != stored:
            raise HeaderError(
                f"The machine header (version 1) is corrupt: its checksum is {stored:#010x} "
                f"but its contents give {crc32_at(image, CRC_OFFSET):#010x}."
            )
        (_, _, _, size, page_size, nodes, state, pid, boots, mm_pfn, mm_n, release,
         mode, percent, low, glob, node, nr_scratch, _,
         flags, cmd_len, fdt_phys, fdt_size, scr_phys, scr_size, cmdline) = \
            V1_FIELDS.unpack_from(page)  # fmt: skip
        static = (STATIC_HEAD.pack(MAGIC, 1, 0, size, page_size, nodes)
                  + page[POLICY_OFFSET:POLICY_OFFSET + STATIC_POLICY.size]
                  + page[SCRATCH_TABLE_OFFSET:SCRATCH_TABLE_END])
        if flags & ~BP_VALID or cmd_len > V1_CMDLINE_MAX:
            raise HeaderError(
                f"The machine header (version 1) has boot parameters with flags {flags:#x} "
                f"and a {cmd_len}-byte command line; version 1 knows only the valid flag "
                f"and at most {V1_CMDLINE_MAX} bytes."
            )
        dynamic = (state, pid, flags, boots, mm_pfn, mm_n, 0, 0, fdt_phys, fdt_size,
                   scr_phys, scr_size, cmd_len, release, cmdline)
        return cls._from_fields(static, dynamic, version=1)

    @classmethod
    def _from_fields(cls, static: bytes, dynamic: tuple, *, version: int) -> MachineHeader:
        _, _, _, size, page_size, nodes = STATIC_HEAD.unpack_from(static)
        mode, percent, low, glob, node, nr_scratch, _ = STATIC_POLICY.unpack_from(static, STATIC_HEAD.size)
        (state, pid, flags, boots, mm_pfn, mm_n, root_phys, root_size, fdt_phys, fdt_size,
         scr_phys, scr_size, cmd_len, release, cmdline) = dynamic  # fmt: skip
        if state not in MachineState._value2member_map_:
            raise HeaderError(f"The machine header has an unknown state {state}.")
        if mode not in _PolicyMode._value2member_map_:
            raise HeaderError(f"The machine header has an unknown scratch policy {mode}.")
        if flags & ~(BP_VALID | BP_CRASHED) or flags == BP_CRASHED:
            raise HeaderError(f"The boot parameters have unknown flags {flags:#x}.")
        if nr_scratch > MAX_SCRATCH or cmd_len > len(cmdline):
            raise HeaderError(
                f"The machine header is inconsistent: {nr_scratch} scratch areas (at most "
                f"{MAX_SCRATCH}) and a {cmd_len}-byte command line (at most {len(cmdline)})."
            )
        try:
            release_text = release.rstrip(b"\0").decode()
            cmdline_text = cmdline[:cmd_len].decode()
        except UnicodeDecodeError as e:
            raise HeaderError(f"The machine header holds text that is not UTF-8: {e}.") from e
        table = STATIC_HEAD.size + STATIC_POLICY.size
        return cls(
            arena_size=size, nr_nodes=nodes, state=MachineState(state), pid=pid,
            boot_count=boots, release=release_text, memmap_pfn=mm_pfn, memmap_npages=mm_n,
            scratch_policy=_policy_from_fields(_PolicyMode(mode), percent, low, glob, node),
            scratch=[_unpack_area(static, table, i) for i in range(nr_scratch)],
            boot_params=BootParams(bool(flags & BP_VALID), fdt_phys, fdt_size, scr_phys,
                                   scr_size, cmdline_text, bool(flags & BP_CRASHED)),
            live_root_phys=root_phys, live_root_size=root_size,
            version=version, page_size=page_size,
        )  # fmt: skip

    def _static_bytes(self) -> bytes:
        """The three static pieces, concatenated, with their CRC."""
        mode, percent, low, glob, node = _policy_fields(self.scratch_policy)
        static = bytearray(
            STATIC_HEAD.pack(MAGIC, VERSION, 0, self.arena_size, self.page_size, self.nr_nodes)
            + STATIC_POLICY.pack(mode, percent, low, glob, node, len(self.scratch), 0)
            + b"".join(SCRATCH_ENTRY.pack(int(a.kind), a.node, a.start_pfn, a.npages)
                       for a in self.scratch)
        )
        static += bytes(_static_size() - len(static))
        seal_crc32(static, CRC_OFFSET)
        return bytes(static)

    def _dynamic_bytes(self, sequence: int) -> bytes:
        """One copy of the dynamic part, with its sequence number and CRC."""
        bp = self.boot_params
        cmdline = bp.cmdline.encode()
        flags = (BP_VALID | (BP_CRASHED if bp.crashed else 0)) if bp.valid else 0
        copy = bytearray(DYNAMIC.pack(
            sequence, 0, int(self.state), self.pid, flags, self.boot_count,
            self.memmap_pfn, self.memmap_npages, self.live_root_phys, self.live_root_size,
            bp.fdt_phys, bp.fdt_size, bp.scratch_phys, bp.scratch_size, len(cmdline), 0,
            self.release.encode(), cmdline,
        ))  # fmt: skip
        seal_crc32(copy, DYNAMIC_CRC_OFFSET)
        return bytes(copy)

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
        _check_live_root(self.live_root_phys, self.live_root_size, self.arena_size)

    def _check_fits(self) -> None:
        if len(self.release.encode()) > RELEASE_MAX or "\0" in self.release:
            raise HeaderError(
                f"The release {self.release!r} must be at most {RELEASE_MAX} bytes, without NUL."
            )
        if len(self.boot_params.cmdline.encode()) > CMDLINE_MAX:
            raise HeaderError(
                f"The next kernel's command line is longer than {CMDLINE_MAX} bytes, the most "
                f"the machine header's format version {VERSION} keeps (version 1 kept 1024)."
            )
        if len(self.scratch) > MAX_SCRATCH:
            raise HeaderError(f"There are more than {MAX_SCRATCH} scratch areas.")

    # -- arena I/O ---------------------------------------------------------------------

    @classmethod
    def read(cls, arena: Arena) -> MachineHeader:
        """Read and validate the header of a mapped arena."""
        return cls.unpack(arena.view(0), arena.size)

    def write_new(self, arena: Arena) -> None:
        """Write a whole new page 0: for a machine being created, which no other process
        can see yet (its file is linked into place afterwards)."""
        arena.view(0)[:] = self.pack()
        self.version, self.slot, self.sequence = VERSION, 0, max(self.sequence, 1)

    def write(self, arena: Arena) -> None:
        """Write this header to page 0, as :meth:`plan_write` says, so that a SIGKILL at
        any instant leaves a header that reads as before or as after."""
        page = arena.view(0)
        plan = self.plan_write(bytes(page))
        for offset, data in plan.stores:
            if len(data) == 8 and offset % 8 == 0:
                # One aligned 8-byte store, which a kill cannot tear.
                np.frombuffer(page, np.uint64, count=offset // 8 + 1)[-1] = \
                    np.frombuffer(data, np.uint64)[0]
            else:
                page[offset:offset + len(data)] = data
        self.version, self.slot, self.sequence = VERSION, plan.slot, plan.sequence

    def plan_write(self, page: bytes) -> WritePlan:
        """The stores, in order, that turn ``page`` (the current page 0) into this header:

        1. a version-1 page is converted first: its own dynamic part into copy 1 (bytes
           version 1 keeps zero and its CRC skips), then version 2 and the static CRC in
           one aligned 8-byte store, then its old dynamic fields cleared (unread now);
        2. a static part that changes (only ever from unsized to sized scratch, at the
           first boot): the table and policy, then the version word with the new CRC;
           until then the old CRC marks the static part as still unsized;
        3. the dynamic part, with the next sequence number, into the older copy.
        """
        self._check_fits()
        stores: list[tuple[int, bytes]] = []
        if struct.unpack_from("<I", page, VERSION_WORD)[0] == 1:
            old = MachineHeader._unpack_v1(page)
            old._check_fits()
            stores.append((DYNAMIC_OFFSETS[1], old._dynamic_bytes(1)))
            static = bytearray(_static_of(page))
            struct.pack_into("<II", static, VERSION_WORD, VERSION, 0)
            seal_crc32(static, CRC_OFFSET)
            stores.append((VERSION_WORD, bytes(static[VERSION_WORD:VERSION_WORD + 8])))
            stores.append((STATIC_HEAD.size, bytes(POLICY_OFFSET - STATIC_HEAD.size)))
            on_page, (sequence, slot) = bytes(static), (1, 1)
        else:
            on_page = _static_of(page)
            copies = [c for c in (_read_copy(page, i) for i in (0, 1)) if c is not None]
            sequence, slot, _ = max(copies, default=(0, 1, ()))
        static = self._static_bytes()
        if on_page != static:
            stores += _static_stores(on_page, static)
        slot, sequence = 1 - slot, sequence + 1
        stores.append((DYNAMIC_OFFSETS[slot], self._dynamic_bytes(sequence)))
        return WritePlan(stores, slot, sequence)


@dataclass(frozen=True)
class WritePlan:
    """What :meth:`MachineHeader.write` stores, in order (offset, bytes), and the copy
    and sequence number the dynamic part then has."""

    stores: list[tuple[int, bytes]]
    slot: int
    sequence: int


def _static_size() -> int:
    return sum(end - start for start, end in STATIC_RANGES)


def _split_static(static: bytes) -> list[bytes]:
    pieces, at = [], 0
    for start, end in STATIC_RANGES:
        pieces.append(static[at:at + end - start])
        at += end - start
    return pieces


def _static_of(page: bytes | memoryview) -> bytes:
    """The static pieces of a page, concatenated."""
    return b"".join(bytes(page[start:end]) for start, end in STATIC_RANGES)


def _static_stores(on_page: bytes, static: bytes) -> list[tuple[int, bytes]]:
    """The stores that size the scratch areas in the static part ``on_page``, which
    must read as unsized (its CRC is that of its first piece with the rest zero)."""
    head = STATIC_HEAD.size
    unsized = on_page[:head] + bytes(len(on_page) - head)
    word = slice(VERSION_WORD, VERSION_WORD + 8)
    if crc32_at(unsized, CRC_OFFSET) != struct.unpack_from("<I", on_page, CRC_OFFSET)[0] or \
            on_page[:word.start] + on_page[word.stop:head] != \
            static[:word.start] + static[word.stop:head]:
        raise HeaderError(
            "The machine header's static part (layout and scratch areas) is written once, "
            "when the first boot sizes scratch; it cannot change afterwards."
        )
    new_head, new_policy, new_table = _split_static(static)
    return [(SCRATCH_TABLE_OFFSET, new_table), (POLICY_OFFSET, new_policy),
            (VERSION_WORD, new_head[word])]


def _read_copy(page: bytes, slot: int) -> tuple[int, int, tuple] | None:
    """(sequence, slot, fields after the CRC) of a copy of the dynamic part, or None if
    its CRC fails (never written, or torn by a kill)."""
    start = DYNAMIC_OFFSETS[slot]
    copy = page[start:start + DYNAMIC.size]
    fields = DYNAMIC.unpack(copy)
    if crc32_at(copy, DYNAMIC_CRC_OFFSET) != fields[1]:
        return None
    (sequence, _, state, pid, flags, boots, mm_pfn, mm_n, root_phys, root_size, fdt_phys,
     fdt_size, scr_phys, scr_size, cmd_len, _, release, cmdline) = fields  # fmt: skip
    return sequence, slot, (state, pid, flags, boots, mm_pfn, mm_n, root_phys, root_size,
                            fdt_phys, fdt_size, scr_phys, scr_size, cmd_len, release, cmdline)


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


def _unpack_area(static: bytes, table: int, index: int) -> ScratchArea:
    kind, node, start, npages = SCRATCH_ENTRY.unpack_from(static, table + index * SCRATCH_ENTRY.size)
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


def _check_live_root(phys: int, size: int, arena_size: int) -> None:
    if (phys, size) == (0, 0):
        return
    if not (0 < size and phys >= PAGE_SIZE and phys % PAGE_SIZE == 0 and phys + size <= arena_size):
        raise HeaderError(
            f"The machine header puts the live KHO root at [{phys:#x}, {phys + size:#x}), "
            f"which is not a page-aligned range of the arena's memory [{PAGE_SIZE:#x}, "
            f"{arena_size:#x})."
        )
