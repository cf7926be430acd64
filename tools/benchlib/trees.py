"""Trees of files for the kexec benchmark, written straight into a machine or a folder.

A million inodes cannot be created through FUSE in any reasonable time, so a tree for
guestfs is written with the filesystem core on a machine of its own, handed over as an
unmount does, and mounted afterwards with ``guestfs mount`` (which restores it). The
copy-to-disk baseline gets the same tree, written to a folder on kernel tmpfs.

How the pages of a guestfs tree are laid out is part of the spec:

* ``Layout.FOLIOS``: files written front to back in 2 MiB pieces, as a copy does; files
  of 2 MiB and more get 2 MiB folios (see guestfs/store/pagemap.py for the policy).
* ``Layout.PAGES``: every file written 4 KiB at a time, its 2 MiB regions back to front:
  no region is ever written whole nor after its predecessor, so every page is an
  order-0 page.
* ``fragmented``: before the tree is written, two filler files take every free page of
  the arena, alternately, and one of them is deleted: no free block is larger than one
  page, so the tree is written into single scattered pages. The other filler is deleted
  once the tree is written; what remains is the same tree, fragmented.

Run as ``python -m benchlib.trees {guestfs MACHINE | dir PATH} SPEC_JSON``; prints how
the tree was laid out as JSON (with ``GUESTFS_MACHINE_DIR`` honoured for the machine).
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from benchlib.units import count_text, size_text

PAGE = 4096
REGION = 2 << 20          # a 2 MiB folio
DIR_FILES = 1024          # files per directory, so no directory is huge
ARENA_SLACK = 64 << 20    # boot-time memory, scratch and the handover's inode table
INODE_TABLE_BYTES = 512   # generous room per inode for its handover record
# One random block the files are cut from: their contents do not matter, only that
# they are not all zeros.
_PATTERN = random.Random(5).randbytes(REGION)


class Layout(str, enum.Enum):
    """How a guestfs tree's data pages are allocated."""

    FOLIOS = "folios"
    PAGES = "pages"


@dataclass(frozen=True)
class TreeSpec:
    """`files` files of `file_size` bytes, in directories of `DIR_FILES`."""

    files: int
    file_size: int
    layout: Layout = Layout.FOLIOS
    fragmented: bool = False

    @property
    def bytes(self) -> int:
        """Bytes of file data in the tree."""
        return self.files * self.file_size

    @property
    def inodes(self) -> int:
        """Inodes of the tree: the root, the directories and the files."""
        return 1 + self.directories + self.files

    @property
    def directories(self) -> int:
        """Directories below the root."""
        return -(-self.files // DIR_FILES)

    @property
    def label(self) -> str:
        """A short human name, e.g. ``16 Ki files × 512 B, 4 KiB pages``."""
        parts = [f"{count_text(self.files)} files × {size_text(self.file_size)}"]
        if self.layout is Layout.PAGES:
            parts.append("4 KiB pages")
        if self.fragmented:
            parts.append("fragmented")
        return ", ".join(parts)

    @property
    def baseline_key(self) -> tuple[int, int]:
        """Trees with the same key are the same files to tar (layout is guestfs's own)."""
        return (self.files, self.file_size)

    def arena_size(self) -> int:
        """Memory of a machine that holds this tree (twice the data when fragmented:
        the filler takes all of it first)."""
        unit = REGION if self.layout is Layout.FOLIOS and self.file_size >= REGION else PAGE
        data = self.files * -(-self.file_size // unit) * unit
        size = data * (2 if self.fragmented else 1) + ARENA_SLACK + self.inodes * INODE_TABLE_BYTES
        return -(-size // REGION) * REGION

    def to_json(self) -> str:
        """The spec as the JSON the builder takes."""
        return json.dumps({**asdict(self), "layout": self.layout.value})

    @classmethod
    def from_json(cls, text: str) -> TreeSpec:
        """Inverse of `to_json`."""
        fields = json.loads(text)
        return cls(**{**fields, "layout": Layout(fields["layout"])})


def pieces(spec: TreeSpec) -> Iterator[tuple[int, int]]:
    """(offset, length) of each write of one file, in the order that gives its layout."""
    if spec.layout is Layout.PAGES:
        # Regions back to front, pages front to back: each region's pages are
        # consecutive PFNs on a fresh arena, and one extent.
        for region in reversed(range(0, spec.file_size, REGION)):
            for off in range(region, min(region + REGION, spec.file_size), PAGE):
                yield off, min(PAGE, spec.file_size - off)
    else:
        for off in range(0, spec.file_size, REGION):
            yield off, min(REGION, spec.file_size - off)


class Sink(Protocol):
    """Where a tree is written: the guestfs core or a folder."""

    def mkdir(self, name: str) -> Any: ...
    def create(self, directory: Any, name: str) -> Any: ...
    def write(self, file: Any, off: int, data: memoryview) -> None: ...
    def close(self, file: Any) -> None: ...


def write_tree(spec: TreeSpec, sink: Sink) -> None:
    """Write every directory and file of `spec` into `sink`."""
    order = list(pieces(spec))
    pattern = memoryview(_PATTERN)
    for d in range(spec.directories):
        directory = sink.mkdir(f"d{d:04d}")
        for i in range(d * DIR_FILES, min(spec.files, (d + 1) * DIR_FILES)):
            file = sink.create(directory, f"f{i:07d}")
            for off, length in order:
                sink.write(file, off, pattern[:length])
            sink.close(file)


class DirSink:
    """Writes a tree into a folder with plain system calls."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mkdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def create(self, directory: Path, name: str) -> int:
        return os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, file: int, off: int, data: memoryview) -> None:
        os.pwrite(file, data, off)

    def close(self, file: int) -> None:
        os.close(file)


class CoreSink:
    """Writes a tree with the guestfs core of a booted kernel (no FUSE)."""

    def __init__(self, fs: Any) -> None:
        from guestfs.filesystem import Ctx
        from guestfs.inode import ROOT_INO
        self.fs = fs
        self.root = ROOT_INO
        self.ctx = Ctx(os.getuid(), os.getgid())

    def mkdir(self, name: str) -> int:
        return self.fs.mkdir(self.root, name.encode(), 0o755, self.ctx).ino

    def create(self, directory: int, name: str) -> int:
        return self.fs.create(directory, name.encode(), 0o644, self.ctx).ino

    def write(self, file: int, off: int, data: memoryview) -> None:
        self.fs.write(file, off, data)

    def close(self, file: int) -> None:
        """Nothing to do: the core keeps no open state for the builder."""

    def remove(self, name: str) -> None:
        """Unlink a file in the root."""
        self.fs.unlink(self.root, name.encode(), self.ctx)


def fill_alternately(sink: CoreSink, names: tuple[str, str], pages: int) -> None:
    """Write up to `pages` pages alternately into two new files in the root, so that
    each file holds every other page the allocator hands out (back to front: no
    folios); stops early when the filesystem is full."""
    from guestfs.errors import FsError
    files = [sink.create(sink.root, name) for name in names]
    page = memoryview(_PATTERN)[:PAGE]
    for i in reversed(range(pages)):
        try:
            sink.write(files[i % 2], (i // 2) * PAGE, page)
        except FsError as e:
            if e.errno != errno.ENOSPC:
                raise
            return


def layout_stats(fs: Any) -> dict[str, int]:
    """How the tree's data sits in the arena: order-0 pages, 2 MiB folios, extents."""
    stats = {"order0_pages": 0, "folios": 0, "extents": 0}
    for ino in list(fs.store.itable.inos()):
        if not fs.get(ino).is_reg:
            continue
        extents = fs.extents(ino)
        stats["extents"] += len(extents)
        for _, _, npages, order in extents:
            stats["order0_pages" if order == 0 else "folios"] += npages >> order
    return stats


def build_guestfs(machine: str, spec: TreeSpec) -> dict[str, int]:
    """Create `machine`, write `spec` into it, and hand it over as an unmount does."""
    from guestfs.session import Options, Session

    session = Session.open(Options(machine, memory=spec.arena_size(), format=True))
    try:
        fs = session.fs
        sink = CoreSink(fs)
        fillers = (".filler-kept", ".filler-freed")
        if spec.fragmented:
            # Every page files may take: the filesystem keeps the handover's room back.
            fill_alternately(sink, fillers, fs.statfs().f_bavail)
            sink.remove(fillers[1])
        write_tree(spec, sink)
        if spec.fragmented:
            sink.remove(fillers[0])
        stats = layout_stats(fs)
        session.hand_over({}, for_exec=False)
    finally:
        session.close()
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Build one tree; print its layout statistics and build time as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchlib.trees")
    parser.add_argument("kind", choices=("guestfs", "dir"))
    parser.add_argument("where", help="machine name (guestfs) or an empty folder (dir)")
    parser.add_argument("spec", type=TreeSpec.from_json)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    if args.kind == "guestfs":
        stats = build_guestfs(args.where, args.spec)
    else:
        write_tree(args.spec, DirSink(Path(args.where)))
        stats = {}
    print(json.dumps({**stats, "build_s": round(time.monotonic() - t0, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
