#!/usr/bin/env python3
"""Print a JSON fingerprint of a tree on a guestfs mount, to compare across a kexec.

For every path: type and mode, owner, link count, inode number, size, mtime and ctime
(ns), extended attributes, symlink target, the SHA-256 of the contents, and the file's
physical extents in the arena (`guestfs filefrag`), so that a comparison shows whether
anything changed, including where the data pages lie. atime is left out: reading the
contents to hash them moves it.

    tools/fingerprint.py MOUNTPOINT > before.json
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path


def fingerprint(top: Path, guestfs: str = "guestfs",
                env: dict[str, str] | None = None) -> dict[str, dict]:
    """{relative path: record} for everything under `top`; `guestfs` (run with `env`)
    tells the extents."""
    records: dict[str, dict] = {}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            records[os.fspath(path.relative_to(top))] = _record(path)
            if stat.S_ISREG(os.lstat(path).st_mode):
                files.append(path)
    for path, extents in _extents(files, guestfs, env).items():
        records[os.fspath(path.relative_to(top))]["extents"] = extents
    return records


def _record(path: Path) -> dict:
    st = os.lstat(path)
    rec = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
           "nlink": st.st_nlink, "ino": st.st_ino, "size": st.st_size,
           "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
           "xattrs": {n: os.getxattr(path, n, follow_symlinks=False).hex()
                      for n in sorted(os.listxattr(path, follow_symlinks=False))}}
    if stat.S_ISLNK(st.st_mode):
        rec["target"] = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        rec["sha256"] = digest.hexdigest()
    return rec


def _extents(files: list[Path], guestfs: str, env: dict[str, str] | None) -> dict[Path, list]:
    if not files:
        return {}
    out = subprocess.run([guestfs, "filefrag", "--json", *map(os.fspath, files)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return {Path(r["file"]): r["extents"] for r in map(json.loads, out.splitlines())}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    json.dump(fingerprint(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    print()
