"""The superblock: what identifies a filesystem and bounds it."""

from __future__ import annotations

import secrets
import time
import uuid as _uuid
from dataclasses import dataclass, field

from guestfs.inode import ROOT_INO
from kho_backend.units import PAGE_SIZE

#: The largest file size, as the kernel's MAX_LFS_FILESIZE (tmpfs has the same): files
#: are sparse, and only pages actually written need room in the arena.
MAX_FILE_SIZE = (1 << 63) - 1
MAX_INODES = (1 << 32) - 1


@dataclass(slots=True)
class Superblock:
    """Filesystem-wide state; all of it is handed over across kexec.

    `generation` counts the handovers the filesystem has been through. `next_ino` is
    never lowered, so an inode number is never reused within a filesystem, and every
    inode carries `ino_generation` (random per filesystem) as its generation number.
    `max_file_size` is `MAX_FILE_SIZE` (handovers from releases before 0.2 recorded the
    arena size there; a restore lifts it). `options` are the
    mount options the filesystem was made with; ``mode`` (octal), ``uid`` and ``gid``
    set the root directory's when formatting (default 755, the daemon's own ids).
    """

    uuid: str
    max_inodes: int
    max_file_size: int
    generation: int = 0
    next_ino: int = ROOT_INO + 1
    ino_generation: int = 0
    created_ns: int = 0
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(cls, arena_size: int, *, max_inodes: int | None = None,
            options: dict[str, str] | None = None) -> Superblock:
        """A fresh superblock for an arena of `arena_size` bytes.

        `max_inodes` defaults to one inode per 4 KiB of arena (as tmpfs bounds nr_inodes
        by memory), but never fewer than 65536 for small arenas nor more than a u32
        holds (the handover's limit).
        """
        if max_inodes is None:
            max_inodes = min(max(arena_size // PAGE_SIZE, 1 << 16), MAX_INODES)
        return cls(
            uuid=str(_uuid.uuid4()),
            max_inodes=max_inodes,
            max_file_size=MAX_FILE_SIZE,
            ino_generation=secrets.randbits(31) + 1,
            created_ns=time.time_ns(),
            options=dict(options or {}),
        )

    def allocate_ino(self) -> int:
        """A new inode number."""
        ino = self.next_ino
        self.next_ino += 1
        return ino
