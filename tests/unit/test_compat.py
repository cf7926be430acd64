"""Compatibility with earlier releases, as littlefs tests against its previous release:
an arena handed over by each release (0.2.0: `guestfs-v1` over `kho-v1`, converted at
mount; 0.3.0: `guestfs-v2` over `kho-v3`; each made by
tests/fixtures/make_release_arena.py at that release) mounts with this code, and every
name, attribute, byte and data page of it is found where that release left it."""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import pytest
from conftest_machine import machine_env  # noqa: F401

from guestfs.atime import AtimeMode, AtimePolicy
from guestfs.filesystem import Ctx
from guestfs.session import Options, Session

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_release_arena import describe  # noqa: E402  (what a release's tree must hold)
_ROOT = Ctx(uid=0, gid=0)
RELEASES = sorted(p.name.removesuffix(".arena.xz") for p in FIXTURES.glob("*.arena.xz"))


@pytest.mark.parametrize("release", RELEASES)
def test_an_earlier_release_handover_mounts_unchanged(release: str, machine_env: Path) -> None:
    manifest = json.loads((FIXTURES / f"{release}.json").read_text())
    machine = f"{manifest['machine']}-{release}"
    with lzma.open(FIXTURES / f"{release}.arena.xz") as src, \
            open(machine_env / f"{machine}.mem", "wb") as dst:
        shutil.copyfileobj(src, dst)
    session = Session.open(Options(machine, atime=AtimePolicy(AtimeMode.NOATIME)))
    try:
        fs = session.fs
        assert fs.sb.uuid == manifest["uuid"]
        found = describe(fs)
        assert sorted(found) == sorted(manifest["tree"])
        for path, want in manifest["tree"].items():
            assert found[path] == want, path
        new = fs.create(1, b"after-upgrade", 0o644, _ROOT)
        assert new.ino >= manifest["next_ino"], "an inode number of the release was reused"
        assert fs.check() == []
    finally:
        session.close()

