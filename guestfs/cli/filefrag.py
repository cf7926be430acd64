"""``guestfs filefrag``: where a file's pages lie in the arena."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from guestfs import control, mounts
from guestfs.cli.common import CliError, Subparsers, machine_at
from guestfs.config import control_path


def add(sub: Subparsers) -> None:
    p = sub.add_parser("filefrag", help="show where a file's pages lie in the arena",
                       description="Like filefrag(8): the physical extents of files on a "
                       "guestfs mount, as runs of arena pages (PFNs) with their folio order. "
                       "A kexec keeps every one of them where it is.")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.set_defaults(func=run_filefrag)


def run_filefrag(args: argparse.Namespace) -> int:
    """``guestfs filefrag``."""
    for path in args.files:
        os.lstat(path)      # a missing file is named as such, before asking the daemon
        mountpoint, inside = _split_mount(path)
        reply = control.request(control_path(machine_at(mountpoint)),
                                {"op": "extents", "path": os.fspath(inside)})
        if args.json:
            print(json.dumps({"file": os.fspath(path), "ino": reply["ino"],
                              "size": reply["size"], "extents": reply["extents"]}))
            continue
        print(f"{path}: inode {reply['ino']}, {reply['size']} bytes, "
              f"{len(reply['extents'])} extent(s)")
        for pgoff, pfn, npages, order in reply["extents"]:
            print(f"  pages {pgoff}..{pgoff + npages - 1} -> pfn {pfn}..{pfn + npages - 1}"
                  f" (order {order})")
    return 0


def _split_mount(path: Path) -> tuple[Path, Path]:
    """The guestfs mount holding `path` (not following its last component) and the
    path inside it."""
    full = Path(os.path.realpath(path.parent)) / path.name
    for top in (full, *full.parents):
        entry = mounts.mount_at(top)
        if entry is not None and entry.machine is not None:
            return top, full.relative_to(top)
    raise CliError(f"{path} is not on a guestfs mount")
