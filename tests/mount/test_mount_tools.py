"""Standard tools on a real mount: cp -a, tar, diff -r, mv, ln, setfattr/getfattr,
SQLite (rollback journal and WAL), stress-ng and fio with verification."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import Mount

pytestmark = pytest.mark.fuse

TOOL_TIMEOUT = 120


def sh(*argv: str | os.PathLike[str], cwd: Path | None = None,
       timeout: float = TOOL_TIMEOUT) -> str:
    """Run a tool; fail the test with its output if it exits non-zero."""
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tree on a local filesystem with every kind of thing the tools copy."""
    root = tmp_path_factory.mktemp("src") / "tree"
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "docs" / "readme.txt").write_text("guestfs test tree\n" * 100)
    (root / "docs" / "deep" / "er" / "note").write_text("deep\n")
    (root / "big.bin").write_bytes(os.urandom(3 << 20) + b"end")
    (root / "empty").touch()
    with open(root / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"x")
    os.symlink("docs/readme.txt", root / "link-to-readme")
    os.symlink("nowhere", root / "dangling")
    os.link(root / "big.bin", root / "big.hardlink")
    os.chmod(root / "docs" / "deep", 0o700)
    os.chmod(root / "empty", 0o600)
    os.utime(root / "docs" / "readme.txt", ns=(1_000_000_000_000_000_001, 1_200_000_000_000_000_002))
    return root


def test_cp_a_then_diff(source_tree: Path, workdir: Path) -> None:
    sh("cp", "-a", source_tree, workdir / "copy")
    sh("diff", "-r", "--no-dereference", source_tree, workdir / "copy")
    copy = workdir / "copy"
    assert (copy / "big.bin").stat().st_ino == (copy / "big.hardlink").stat().st_ino
    assert os.readlink(copy / "dangling") == "nowhere"
    src, dst = (source_tree / "docs" / "readme.txt").stat(), (copy / "docs" / "readme.txt").stat()
    assert dst.st_mtime_ns == src.st_mtime_ns
    assert oct((copy / "docs" / "deep").stat().st_mode) == oct((source_tree / "docs" / "deep").stat().st_mode)


def test_tar_create_and_extract(source_tree: Path, workdir: Path, tmp_path: Path) -> None:
    archive = workdir / "tree.tar"
    sh("tar", "-C", source_tree, "-cf", archive, ".")
    (workdir / "x").mkdir()
    sh("tar", "-C", workdir / "x", "-xpf", archive)
    sh("diff", "-r", "--no-dereference", source_tree, workdir / "x")
    # and back out of the mount
    sh("tar", "-C", workdir / "x", "-cf", tmp_path / "back.tar", ".")
    (tmp_path / "back").mkdir()
    sh("tar", "-C", tmp_path / "back", "-xpf", tmp_path / "back.tar")
    sh("diff", "-r", "--no-dereference", source_tree, tmp_path / "back")


def test_mv_ln_across_directories(workdir: Path) -> None:
    for d in ("a", "b/c"):
        (workdir / d).mkdir(parents=True)
    (workdir / "a" / "file").write_text("payload")
    sh("ln", workdir / "a" / "file", workdir / "a" / "hard")
    sh("ln", "-s", "../../a/file", workdir / "b" / "c" / "soft")
    sh("mv", workdir / "a" / "file", workdir / "b" / "moved")
    sh("mv", workdir / "b" / "c", workdir / "a" / "c")
    assert (workdir / "b" / "moved").read_text() == "payload"
    assert (workdir / "a" / "hard").stat().st_nlink == 2
    assert (workdir / "a" / "c" / "soft").is_symlink()
    assert not (workdir / "b" / "c").exists()


def test_setfattr_getfattr(workdir: Path) -> None:
    need("setfattr")
    f = workdir / "f"
    f.write_text("x")
    sh("setfattr", "-n", "user.colour", "-v", "blue", f)
    sh("setfattr", "-n", "user.bin", "-v", "0x00ff10", f)
    dump = sh("getfattr", "-d", "-e", "hex", f)
    assert 'user.colour=0x626c7565' in dump and "user.bin=0x00ff10" in dump
    sh("setfattr", "-x", "user.colour", f)
    assert "user.colour" not in sh("getfattr", "-d", f)
    missing = subprocess.run(["getfattr", "-n", "user.colour", f], capture_output=True, text=True)
    assert missing.returncode != 0 and "No such attribute" in missing.stderr
    sh("setfattr", "-n", "trusted.t", "-v", "1", f)  # root may use trusted.*
    assert "trusted.t" in sh("getfattr", "-d", "-m", "-", f)


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_integrity(workdir: Path, journal_mode: str) -> None:
    path = workdir / f"db-{journal_mode}.sqlite"
    db = sqlite3.connect(path)
    assert db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
    db.execute("CREATE INDEX t_name ON t(name)")
    for batch in range(20):
        with db:
            db.executemany("INSERT INTO t (name, blob) VALUES (?, ?)",
                           [(f"row-{batch}-{i}", os.urandom(200)) for i in range(250)])
    with db:
        db.execute("DELETE FROM t WHERE id % 3 = 0")
        db.execute("UPDATE t SET name = name || '-updated' WHERE id % 5 = 0")
    db.execute("VACUUM")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    expected = db.execute("SELECT count(*), sum(length(blob)) FROM t").fetchone()
    db.close()

    again = sqlite3.connect(path)
    assert again.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert again.execute("SELECT count(*), sum(length(blob)) FROM t").fetchone() == expected
    again.close()


def test_stress_ng_filesystem_stressors(shared_mount: Mount, workdir: Path) -> None:
    need("stress-ng")
    seconds = 6
    sh("stress-ng", "--temp-path", workdir, "--timeout", f"{seconds}s", "--verify",
             "--metrics-brief", "--hdd", "1", "--hdd-bytes", "8M",
             "--dentry", "1", "--rename", "1", "--link", "1", "--symlink", "1",
             "--xattr", "1", "--dir", "1", timeout=seconds * 10)
    assert shared_mount.fsck() == []


def test_fio_verify_crc32c(workdir: Path) -> None:
    need("fio")
    sh("fio", "--name=verify", f"--directory={workdir}", "--size=32M", "--bs=64k",
       "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
       "--ioengine=psync", "--fallocate=none", "--verify_state_save=0", "--numjobs=2", "--group_reporting")
