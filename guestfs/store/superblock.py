"""The superblock page (docs/handover-abi.md, "Superblock"): what identifies the
filesystem, bounds it, and where every other structure starts.

    page header (magic GSB2, crc32, owner 0), then
      16  u32 version (2), u32 page size (4096)
      24  16 bytes uuid          40  16 bytes directory hash key
      56  i64 created (ns)       64  u64 max inodes
      72  u64 next inode number  80  u64 inodes in use
      88  u32 inode generation, u32 flags (version 3; zero in version 2)
      96  u64 generation (handovers the filesystem has been through)
      104 u64 inode table root, u8 its height, 7 zero bytes
      120 u64 orphan list (B+tree root)
      128 u64 journal header PFN
      136 u16 options length, then the options ("key=value,...", at most 1024 bytes)
"""

from __future__ import annotations

import secrets
import struct
import time
import uuid as _uuid
from dataclasses import dataclass, field

from guestfs.inode import ROOT_INO
from guestfs.store.page import HEADER_SIZE, CorruptPage, Kind, Pages
from guestfs.store.radix import MAX_HEIGHT, RadixRoot
from kho_backend.units import PAGE_SIZE

VERSION = 3
#: Versions this code reads: 2 (release 0.3.0) has no flags.
READABLE = (2, 3)
#: Flag: the counters are kept in memory while the filesystem runs, so the inode count
#: here may be stale and the next inode number is a reservation (every number below it
#: may have been given out). A mount that finds it recounts the inodes; a clean handover
#: writes exact figures and clears it.
COUNTS_STALE = 1
FIELDS = struct.Struct("<II16s16sqQQQIIQQB7xQQH")
OPTIONS_OFFSET = HEADER_SIZE + FIELDS.size
JOURNAL_OFFSET = HEADER_SIZE + struct.calcsize("<II16s16sqQQQIIQQB7xQ")
OPTIONS_MAX = 1024
#: The largest file size, as the kernel's MAX_LFS_FILESIZE (tmpfs has the same): files
#: are sparse, and only pages actually written need room in the arena.
MAX_FILE_SIZE = (1 << 63) - 1
MAX_INODES = (1 << 32) - 1
assert OPTIONS_OFFSET + OPTIONS_MAX <= PAGE_SIZE


@dataclass
class Superblock:
    """Filesystem-wide state. `next_ino` is never lowered, so an inode number is never
    reused, and every inode carries `ino_generation` (random per filesystem) as its
    generation number. `options` are the mount options the filesystem was made with;
    ``mode`` (octal), ``uid`` and ``gid`` set the root directory's at format.

    `next_ino` and `inode_count` are the live figures; while `counts_stale` is set, the
    page holds `ino_reserved` as the next inode number (the store reserves numbers in
    batches) and whatever count was exact when it was last written (see
    `COUNTS_STALE`)."""

    uuid: str
    max_inodes: int
    journal: int = 0
    hash_key: bytes = b""
    created_ns: int = 0
    next_ino: int = ROOT_INO + 1
    inode_count: int = 0
    ino_generation: int = 0
    generation: int = 0
    itable: RadixRoot = field(default_factory=RadixRoot)
    orphans: int = 0
    options: dict[str, str] = field(default_factory=dict)
    counts_stale: bool = False
    ino_reserved: int = 0
    #: The packed uuid and options, kept: the superblock is written often, and they
    #: never change after format.
    _packed: tuple[tuple[str, tuple[tuple[str, str], ...]], bytes, bytes, int] | None = \
        field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def new(cls, arena_size: int, *, options: dict[str, str] | None = None,
            max_inodes: int | None = None) -> Superblock:
        """A fresh superblock for an arena of `arena_size` bytes: by default one inode per
        4 KiB of arena (as tmpfs bounds nr_inodes by memory), never fewer than 65536."""
        if max_inodes is None:
            max_inodes = min(max(arena_size // PAGE_SIZE, 1 << 16), MAX_INODES)
        return cls(uuid=str(_uuid.uuid4()), max_inodes=max_inodes,
                   hash_key=secrets.token_bytes(16), created_ns=time.time_ns(),
                   ino_generation=secrets.randbits(31) + 1, options=dict(options or {}))

    def allocate_ino(self) -> int:
        """A new inode number."""
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def pack_into(self, view: memoryview) -> None:
        """Write the fields into a superblock page (the caller seals it)."""
        uuid, options, length = self._static()
        count = self.inode_count
        # A count out of its range (kept after a recount that could not be exact) is
        # written in range and flagged: the next mount counts again rather than refuse
        # the superblock.
        stale = self.counts_stale or not 0 < count <= self.max_inodes
        count = min(max(count, 1), self.max_inodes)
        next_ino = max(self.ino_reserved, self.next_ino) if stale else self.next_ino
        FIELDS.pack_into(view, HEADER_SIZE, VERSION, PAGE_SIZE, uuid,
                         self.hash_key, self.created_ns, self.max_inodes, next_ino,
                         count, self.ino_generation,
                         COUNTS_STALE if stale else 0, self.generation,
                         self.itable.root, self.itable.height, self.orphans, self.journal,
                         length)
        view[OPTIONS_OFFSET:OPTIONS_OFFSET + OPTIONS_MAX] = options

    def _static(self) -> tuple[bytes, bytes, int]:
        """(uuid bytes, options padded to their field, options length)."""
        key = (self.uuid, tuple(self.options.items()))
        if self._packed is None or self._packed[0] != key:
            options = ",".join(f"{k}={v}" for k, v in sorted(self.options.items())).encode()
            if len(options) > OPTIONS_MAX:
                raise ValueError(f"mount options of {len(options)} bytes "
                                 f"(at most {OPTIONS_MAX})")
            self._packed = (key, _uuid.UUID(self.uuid).bytes,
                            options.ljust(OPTIONS_MAX, b"\0"), len(options))
        return self._packed[1:]

    @classmethod
    def read(cls, pages: Pages, pfn: int) -> Superblock:
        """The superblock at `pfn`, checked; CorruptPage names what is wrong."""
        view = pages.read(pfn, Kind.SUPERBLOCK)
        (version, page_size, uuid, key, created, max_inodes, next_ino, count, ino_gen, flags,
         generation, it_root, it_height, orphans, journal, opt_len) = \
            FIELDS.unpack_from(view, HEADER_SIZE)
        known_flags = COUNTS_STALE if version >= 3 else 0
        problems = [what for what, bad in (
            (f"version {version}; this guestfs reads versions "
             f"{', '.join(map(str, READABLE))}", version not in READABLE),
            (f"unknown flags {flags:#x}", flags & ~known_flags),
            (f"{page_size}-byte pages", page_size != PAGE_SIZE),
            (f"next inode number {next_ino}", not ROOT_INO < next_ino < 1 << 63),
            (f"{count} inodes in use of {max_inodes}", not 0 < count <= max_inodes),
            (f"an inode table of height {it_height}", it_height > MAX_HEIGHT),
            (f"options of {opt_len} bytes", opt_len > OPTIONS_MAX),
            ("no journal", not journal)) if bad]
        if problems:
            raise CorruptPage(pfn, f"the superblock has {problems[0]}")
        text = bytes(view[OPTIONS_OFFSET:OPTIONS_OFFSET + opt_len]).decode("utf-8", "replace")
        options = dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)
        return cls(uuid=str(_uuid.UUID(bytes=uuid)), max_inodes=max_inodes, journal=journal,
                   hash_key=key, created_ns=created, next_ino=next_ino, inode_count=count,
                   ino_generation=ino_gen, generation=generation,
                   itable=RadixRoot(it_root, it_height), orphans=orphans, options=options,
                   counts_stale=bool(flags & COUNTS_STALE), ino_reserved=next_ino)


def journal_of(view: memoryview) -> int:
    """The journal header PFN of a superblock page, read before the page is checked:
    it never changes after format, so a transaction cut short cannot have touched it,
    while the checksum may be that transaction's until the journal is recovered."""
    return struct.unpack_from("<Q", view, JOURNAL_OFFSET)[0]
