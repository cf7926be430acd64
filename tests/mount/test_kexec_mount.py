"""`guestfs kexec` and the unmount handover on a real FUSE mount.

The model-based test of the handover drives the core in a kernel process
(test_kexec_model.py); here the whole product runs: the CLI, the daemon booting the next
kernel in its own process (the mount kept) or exec'ing itself (``--exec``), FUSE. Every
kexec poisons the memory that was not preserved.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Mount, MountFactory
from conftest_machine import examples
from guestfs.session import Fault

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from fingerprint import fingerprint  # noqa: E402

pytestmark = pytest.mark.fuse


def guestfs_bin() -> str:
    return os.fspath(Path(sys.executable).with_name("guestfs"))


def kexec(m: Mount, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return m.cli("kexec", "--poison", *args, os.fspath(m.mountpoint), check=check)


def snapshot(m: Mount) -> dict:
    return fingerprint(m.mountpoint, guestfs_bin(), m.env)


def write_sample(m: Mount) -> None:
    (m / "dir/sub").mkdir(parents=True)
    (m / "dir/text").write_text("kept across kexec\n")
    (m / "big").write_bytes(random.Random(1).randbytes(5 << 20))   # folios and pages
    os.link(m / "dir/text", m / "dir/sub/hardlink")
    os.symlink("dir/text", m / "link")
    os.setxattr(m / "dir/text", "user.note", b"xattr value")
    os.chmod(m / "dir/sub", 0o2750)
    os.mkfifo(m / "fifo")
    with open(m / "sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"in the middle")


def test_kexec_keeps_every_file_and_every_pfn(mount_factory: MountFactory) -> None:
    m = mount_factory()
    write_sample(m)
    before = snapshot(m)
    out = kexec(m, "--json")
    result = json.loads(out.stdout)
    assert result["pid"] == m.pid, "the next kernel runs in the same process"
    assert result["generation"] == 1
    assert set(result["phases"]) >= {"quiesce", "serialize", "finalize", "poison", "exec",
                                     "boot", "restore", "mount"}
    assert snapshot(m) == before
    assert any(order == 9 for _, _, _, order in before["big"]["extents"])
    status = m.status()
    assert status["generation"] == 1 and status["last_blackout"]["total_ms"] > 0
    assert m.fsck() == []


HOLDER = """
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
sys.stdin.readline()
try:
    os.listxattr(fd)        # never answered from a kernel cache
    print("answered", flush=True)
except OSError as e:
    print(errno.errorcode[e.errno], flush=True)
"""


def test_exec_refuses_while_a_file_is_open_and_force_goes_on(mount_factory: MountFactory) -> None:
    m = mount_factory()
    (m / "held").write_text("open elsewhere")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, os.fspath(m / "held")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        refused = kexec(m, "--exec", check=False)
        assert refused.returncode == 1
        assert f"{holder.pid} (python" in refused.stderr and "--force" in refused.stderr
        assert (m / "held").read_text() == "open elsewhere"     # still serving
        kexec(m, "--exec", "--force")
        assert (m / "held").read_text() == "open elsewhere"     # the new mount has it
        holder.stdin.write("go\n")
        holder.stdin.flush()
        # The holder's descriptor belongs to the old mount, whose daemon image is gone.
        assert holder.stdout.readline().strip() == "ENOTCONN"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("phase", [f.value for f in Fault if f is not Fault.BOOT])
def test_a_failure_before_exec_aborts_and_the_mount_serves_as_before(
        faulty_mount: Callable[[str], Mount], phase: str) -> None:
    m = faulty_mount(phase)
    write_sample(m)
    before = snapshot(m)
    free_before = m.status()["arena"]["free_pages"]
    # Only an exec unmounts; the other phases fail the same in both kinds of kexec.
    failed = kexec(m, *(["--exec"] if phase == Fault.UNMOUNT.value else []), check=False)
    assert failed.returncode == 1
    assert f"aborted in phase {phase}" in failed.stderr
    assert snapshot(m) == before
    status = m.status()
    assert status["pid"] == m.pid and status["generation"] == 0
    assert status["arena"]["free_pages"] == free_before, "abort must free what it allocated"
    (m / "after-abort").write_text("writes work")
    kexec(m)
    assert (m / "after-abort").read_text() == "writes work"
    assert m.fsck() == []


def test_a_full_arena_still_hands_over(mount_factory: MountFactory) -> None:
    """Writes stop with ENOSPC before the room the handover needs is gone."""
    m = mount_factory(memory="16M")
    chunk = random.Random(2).randbytes(256 << 10)
    with pytest.raises(OSError) as full:
        for i in range(1000):
            (m / f"fill-{i}").write_bytes(chunk)      # the close reports writeback errors
    assert full.value.errno == errno.ENOSPC
    (m / f"fill-{i}").unlink()      # the file whose write failed, as its writer would
    before = snapshot(m)
    assert all(rec["size"] == len(chunk) for rec in before.values())
    m.cli("umount", os.fspath(m.mountpoint))
    m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint))
    m.pid = m.status()["pid"]
    assert differences(before, snapshot(m)) == {}
    kexec(m)
    assert differences(before, snapshot(m)) == {}


def test_twenty_kexecs_keep_every_file_and_free_memory(mount_factory: MountFactory) -> None:
    m = mount_factory(memory="128M")
    write_sample(m)
    before = snapshot(m)
    kexec(m)        # the first moves the kernel's memmap into scratch; from then on, steady
    free = m.status()["arena"]["free_pages"]
    for generation in range(2, examples(20) + 1):
        result = json.loads(kexec(m, "--json").stdout)
        assert result["generation"] == generation and result["pid"] == m.pid
        assert m.status()["arena"]["free_pages"] == free
    assert snapshot(m) == before


def test_unmount_hands_over_and_a_later_mount_finds_every_file(mount_factory: MountFactory) -> None:
    m = mount_factory()
    write_sample(m)
    before = snapshot(m)
    m.cli("umount", os.fspath(m.mountpoint))
    dump = m.cli("kho", "dump", "--machine", m.machine).stdout
    assert '"guestfs-v2"' in dump and '"kho-v3"' in dump
    m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint))
    m.pid = m.status()["pid"]
    assert snapshot(m) == before
    assert m.status()["generation"] == 1


def test_a_corrupt_handover_is_refused_and_left_untouched(mount_factory: MountFactory) -> None:
    m = mount_factory(memory="64M")
    write_sample(m)
    m.cli("umount", os.fspath(m.mountpoint))
    arena = Path(m.env["GUESTFS_MACHINE_DIR"]) / f"{m.machine}.mem"
    flip_superblock_byte(arena)
    handed_over = handover_state(arena)
    for _attempt in range(2):       # refused every time: nothing was consumed or lost
        refused = m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint), check=False)
        assert refused.returncode == 1
        assert "superblock" in refused.stderr and "--format" in refused.stderr, refused.stderr
        assert handover_state(arena) == handed_over, "the handover must be left as it was"
    assert '"guestfs-v2"' in m.cli("kho", "dump", "--machine", m.machine).stdout
    m.cli("mount", "--machine", m.machine, "--format", os.fspath(m.mountpoint))
    m.pid = m.status()["pid"]
    assert os.listdir(m.mountpoint) == []


def handover_state(arena: Path) -> tuple:
    """The boot parameters and a digest of every page the handover occupies (what it
    preserves, its maps, its root): a boot that refuses it may use free memory, never
    those."""
    import numpy as np

    from kho_backend.arena import Arena
    from kho_backend.header import MachineHeader
    from kho_backend.kho_in import IncomingHandover

    with Arena.open(arena) as mem:
        params = MachineHeader.read(mem).boot_params
        mask = IncomingHandover.parse(mem, params.fdt_phys, params.fdt_size).page_mask()
        pages = mem.array().reshape(mem.npages, -1)[np.flatnonzero(mask)]
        return params, int(mask.sum()), hashlib.sha256(pages.tobytes()).hexdigest()


def flip_superblock_byte(arena: Path) -> None:
    """Flip one byte of the guestfs superblock in a handed-over arena."""
    from guestfs.handover import NAME, read_subtree
    from kho_backend.arena import Arena
    from kho_backend.header import MachineHeader
    from kho_backend.kho_in import IncomingHandover

    with Arena.open(arena) as mem:
        params = MachineHeader.read(mem).boot_params
        handover = IncomingHandover.parse(mem, params.fdt_phys, params.fdt_size)
        sb = read_subtree(handover.retrieve_subtree(NAME)[1]).superblock_phys
        mem.phys_view(sb + 100, 1)[0] ^= 0x40


def test_random_operations_across_kexecs_match_a_tmpfs_twin(mount_factory: MountFactory) -> None:
    """A smaller model test on the real mount: the same random operations on the mount
    and on a kernel tmpfs directory must agree (errors included); each round ends with a
    kexec or an unmount and mount, after which the mount must be exactly as before,
    inode numbers and PFNs included."""
    m = mount_factory()
    twin = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="gfs-twin-"))
    rng = random.Random(4)
    try:
        for round_ in range(4):
            for _ in range(40):
                random_operation(rng, [m.mountpoint, twin])
            assert comparable(m.mountpoint) == comparable(twin)
            before = snapshot(m)
            if round_ % 2:
                m.cli("umount", os.fspath(m.mountpoint))
                m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint))
                m.pid = m.status()["pid"]
            else:
                kexec(m)
            assert differences(before, snapshot(m)) == {}
    finally:
        shutil.rmtree(twin)


def differences(before: dict, after: dict) -> dict:
    """{path: {field: (before, after)}} for what changed between two fingerprints."""
    out = {}
    for path in before.keys() | after.keys():
        a, b = before.get(path, {}), after.get(path, {})
        changed = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        if changed:
            out[path] = changed
    return out


def random_operation(rng: random.Random, roots: list[Path]) -> None:
    names = ["a", "b", "c", "d/e", "d/f"]
    name, other = rng.choice(names), rng.choice(names)
    op = rng.choice(["write", "write", "truncate", "rename", "link", "unlink", "mkdir",
                     "symlink", "xattr", "chmod", "utime"])
    offset, data = rng.choice([0, 100, 4096, 70000]), rng.randbytes(rng.randint(1, 9000))
    size, mode, stamp = rng.choice([0, 10, 5000]), rng.choice([0o600, 0o644, 0o755]), rng.randint(0, 2**31)
    for root in roots:
        (root / "d").mkdir(exist_ok=True)
        path, target = root / name, root / other
        try:
            if op == "write":
                with open(path, "r+b" if path.is_file() else "wb") as f:
                    f.seek(offset)
                    f.write(data)
            elif op == "truncate":
                os.truncate(path, size)
            elif op == "rename":
                os.rename(path, target)
            elif op == "link":
                os.link(path, target)
            elif op == "unlink":
                os.unlink(path)
            elif op == "mkdir":
                os.mkdir(path)
            elif op == "symlink":
                os.symlink(other, path)
            elif op == "xattr":
                os.setxattr(path, "user.k", data[:100], follow_symlinks=False)
            elif op == "chmod":
                os.chmod(path, mode)
            elif op == "utime":
                os.utime(path, ns=(stamp, stamp), follow_symlinks=False)
        except OSError as e:
            error = e.errno
        else:
            error = 0
        if root is roots[0]:
            expected = error
        else:
            assert error == expected, f"{op} {name} {other}: guestfs {expected}, tmpfs {error}"


def comparable(top: Path) -> dict:
    """What both trees must agree on: names, types, modes, sizes, contents, link counts,
    xattrs and symlink targets (not inode numbers or times, which differ between them)."""
    out = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        xattrs = sorted((n, os.getxattr(path, n, follow_symlinks=False))
                        for n in os.listxattr(path, follow_symlinks=False))
        rec: tuple = (st.st_mode, st.st_nlink, xattrs)
        if path.is_symlink():
            rec += (os.readlink(path),)
        elif path.is_file():
            rec += (st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        out[os.fspath(path.relative_to(top))] = rec
    return out
