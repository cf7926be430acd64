"""The copy-to-disk baseline: what people do today to keep a tmpfs across a reboot.

Before the reboot the tree is saved from tmpfs into a tar file on disk and the file is
fsynced; after it, the tar file is read back into an empty tmpfs folder. The blackout
of the baseline is the save plus the restore (the reboot itself is not counted, which
favours the baseline). Only one copy of the tree is in memory at a time. The tar file
is dropped from the page cache after its fsync (``posix_fadvise(DONTNEED)``, which needs
no privilege, unlike drop_caches), so the restore reads it from disk as it would after
a real reboot.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.proc import run

TAR_TIMEOUT = 3600.0


@dataclass(frozen=True)
class RoundTrip:
    """One save and restore, in milliseconds."""

    save_ms: float
    restore_ms: float

    @property
    def total_ms(self) -> float:
        return self.save_ms + self.restore_ms


def round_trip(tree: Path, disk_dir: Path) -> RoundTrip:
    """Save `tree` (a folder on tmpfs) to a tar file in `disk_dir`, wipe it (as the
    reboot would; not timed), and restore it in place from the tar file."""
    archive = disk_dir / "tree.tar"
    t0 = time.perf_counter()
    run(["tar", "-cf", os.fspath(archive), "-C", os.fspath(tree), "."], timeout=TAR_TIMEOUT)
    _sync_and_evict(archive)
    t1 = time.perf_counter()
    shutil.rmtree(tree)
    tree.mkdir()
    t2 = time.perf_counter()
    run(["tar", "-xf", os.fspath(archive), "-C", os.fspath(tree)], timeout=TAR_TIMEOUT)
    t3 = time.perf_counter()
    archive.unlink()
    return RoundTrip((t1 - t0) * 1e3, (t3 - t2) * 1e3)


def _sync_and_evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
