"""Nothing acknowledged is lost at the edges, on a real mount: times before 1970 and far
in the future, an unmount that cannot hand over, a full arena, writes during the
blackout of a kexec, a failed write-back, Ctrl-C, impossible sizes, an untrusted or
damaged machine folder."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (CLI, Mount, MountFactory, is_mounted, make_mountpoint, run_cli,
                      teardown_mount, unique_machine, wait_pid_gone)
from guestfs import background, mounts
from guestfs.cli import kexec as cli_kexec
from guestfs.cli import main as cli_main
from guestfs.filesystem import Filesystem
from guestfs.session import Fault, Session

pytestmark = pytest.mark.fuse
MiB = 1 << 20


def remount(m: Mount) -> None:
    m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint))
    m.pid = m.status()["pid"]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def times(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns


# --- times -------------------------------------------------------------------------------

EDGE_TIMES = {
    "before-1970": (-1_000_000_001, -1),                              # 1969-12-31 23:59:58.999…
    "in-1960": (-315_619_200 * 10**9, 1_700_000_000 * 10**9),
    "in-2600": (19_880_899_200 * 10**9 + 7, 19_880_899_200 * 10**9),  # past a 64-bit ns count
    "far-past": (-(1 << 62) * 10**9, -(1 << 40) * 10**9 + 5),
}


def test_times_before_1970_and_after_2262_survive_kexec_and_umount(
        mount_factory: MountFactory) -> None:
    m = mount_factory()
    for name, (atime, mtime) in EDGE_TIMES.items():
        (m / name).touch()
        os.utime(m / name, ns=(atime, mtime))
    m.cli("kexec", os.fspath(m.mountpoint))
    m.cli("umount", os.fspath(m.mountpoint))
    remount(m)
    for name, expected in EDGE_TIMES.items():
        assert times(m / name) == expected, name
    assert m.fsck() == []


# --- an unmount that cannot hand over ------------------------------------------------------


@pytest.mark.fuse
def test_a_mount_whose_parent_was_renamed_says_so(cli_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    """The daemon unmounts by the path it mounted at: after a rename of a folder above,
    an unmount or a kexec aborts (and the mount serves), naming that cause (it said
    only 'umount: No such file or directory')."""
    parent, moved = tmp_path / "parent", tmp_path / "moved"
    (parent / "m").mkdir(parents=True)
    tmp_path.chmod(0o755)
    m = Mount(unique_machine(), parent / "m", cli_env)
    try:
        m.cli("mount", "--machine", m.machine, "--memory", "64M", os.fspath(m.mountpoint))
        m.pid = m.status()["pid"]
        (m / "f").write_bytes(b"kept")
        parent.rename(moved)
        for args in (["umount"], ["kexec"]):
            refused = m.cli(*args, os.fspath(moved / "m"), check=False)
            assert refused.returncode == 1, refused.stderr
            assert "was a folder above it renamed" in refused.stderr
            assert "serves as before" in refused.stderr
        moved.rename(parent)
        assert (m / "f").read_bytes() == b"kept"
        m.cli("umount", os.fspath(m.mountpoint))
    finally:
        if moved.exists():
            moved.rename(parent)
        teardown_mount(m)


@pytest.mark.parametrize("phase", [f.value for f in Fault if f is not Fault.BOOT])
def test_an_unmount_that_cannot_hand_over_aborts_and_the_mount_serves(
        faulty_mount: Callable[[str], Mount], phase: str) -> None:
    m = faulty_mount(phase)
    (m / "kept").write_bytes(b"before")
    failed = m.cli("umount", os.fspath(m.mountpoint), check=False)
    assert failed.returncode == 1
    assert f"unmount of {m.mountpoint} aborted in phase {phase}" in failed.stderr
    (m / "after").write_bytes(b"still serving")
    assert m.status()["pid"] == m.pid and m.fsck() == []
    m.cli("umount", os.fspath(m.mountpoint))
    remount(m)
    assert (m / "kept").read_bytes() == b"before"
    assert (m / "after").read_bytes() == b"still serving"


def test_a_busy_umount_exits_1_naming_the_pid_and_changes_nothing(
        mount_factory: MountFactory) -> None:
    m = mount_factory()
    (m / "open").write_text("x")
    with open(m / "open") as held:
        proc = m.cli("umount", os.fspath(m.mountpoint), check=False)
        assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr
        assert held.read() == "x"
        (m / "new").write_text("still serving")
    assert m.status()["pid"] == m.pid


# --- a full arena --------------------------------------------------------------------------


def test_a_write_the_arena_cannot_hold_fails_at_write_and_loses_nothing(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """dd of 96 MiB into a 64 MiB machine fails with ENOSPC; then small files fill what
    is left: every byte inside every file's size is what was written (a write that does
    not fit stores nothing), also after the kernel drops its cache and after a kexec."""
    m = mount_factory(memory="64M")
    source = tmp_path / "random"
    source.write_bytes(os.urandom(96 * MiB))
    dd = subprocess.run(["dd", f"if={source}", f"of={m / 'big'}", "bs=1M", "count=96"],
                        capture_output=True, text=True)
    assert dd.returncode != 0 and "No space left on device" in dd.stderr
    attempted: dict[str, bytes] = {}
    acknowledged: set[str] = set()
    chunk = 0
    while True:          # small files of odd sizes until not even one page is left
        name = f"fill-{chunk}"
        attempted[name] = os.urandom(4096 * (chunk % 7) + 1000 + chunk)
        try:
            with open(m / name, "wb") as f:
                f.write(attempted[name])
            acknowledged.add(name)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            if len(attempted[name]) <= 4096:
                break
        chunk += 1
    assert os.statvfs(m.mountpoint).f_bavail == 0

    def check() -> None:
        size = (m / "big").stat().st_size
        assert 0 < size < 64 * MiB
        assert (m / "big").read_bytes() == source.read_bytes()[:size]
        for name, data in attempted.items():
            stored = (m / name).read_bytes() if (m / name).exists() else b""
            assert stored in (b"", data), f"{name} holds part of a write that failed"
            assert name not in acknowledged or stored == data, f"{name} lost acknowledged bytes"

    check()
    drop_caches()
    check()
    m.cli("kexec", os.fspath(m.mountpoint))
    check()


def test_a_failed_write_back_does_not_block_kexec(mount_factory: MountFactory) -> None:
    """Pages dirtied through a shared mapping that do not fit are the mapper's loss
    (msync would have told it); they must not keep the machine from a kexec."""
    m = mount_factory(memory="32M")
    fd = os.open(m / "mapped", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 64 * MiB)
        with mmap.mmap(fd, 64 * MiB) as mapping:
            for off in range(0, 64 * MiB, 4096):
                mapping[off:off + 5] = b"dirty"
            with pytest.raises(OSError) as told:
                mapping.flush()                      # msync
            assert told.value.errno in (errno.ENOSPC, errno.EIO)
    finally:
        os.close(fd)
    for generation in (1, 2):
        proc = m.cli("kexec", os.fspath(m.mountpoint))
        warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
        assert all("writing back mapped pages" in w for w in warnings), warnings
        assert m.status()["generation"] == generation
    assert m.fsck() == []


# --- writes during the blackout of a kexec -----------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys
    top, log = sys.argv[1], open(sys.argv[2], "w")
    n = 0
    while not os.path.exists(sys.argv[3]):
        n += 1
        path = os.path.join(top, "w-%d" % n)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"written %d" % n)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            continue
        log.write(path + "\\n")
        log.flush()
""")


def test_no_acknowledged_write_goes_below_the_mount_during_a_kexec(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    m = mount_factory()
    log, stop = tmp_path / "acknowledged", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, os.fspath(m.mountpoint),
                               os.fspath(log), os.fspath(stop)])
    try:
        deadline = time.monotonic() + 60
        while not log.exists() or not log.read_text():
            assert writer.poll() is None, "the writer died before its first write"
            assert time.monotonic() < deadline, "the writer wrote nothing in 60 s"
            time.sleep(0.01)
        for _ in range(3):
            m.cli("kexec", "--force", os.fspath(m.mountpoint))
    finally:
        stop.touch()
        writer.wait(timeout=60)
    acknowledged = log.read_text().split()
    assert len(acknowledged) > 3
    for path in acknowledged:
        n = path.rsplit("-", 1)[1]
        assert Path(path).read_bytes() == b"written %s" % n.encode()
    m.cli("umount", os.fspath(m.mountpoint))
    assert not is_mounted(m.mountpoint), "the shield under the mount was left behind"
    assert os.listdir(m.mountpoint) == [], "a write landed in the directory below the mount"


# --- Ctrl-C --------------------------------------------------------------------------------


def test_ctrl_c_during_kexec_says_it_carries_on(mount_factory: MountFactory,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    m = mount_factory()
    (m / "f").write_text("x")

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_kexec, "_await_next_kernel", interrupted)
    monkeypatch.setenv("GUESTFS_MACHINE_DIR", m.env["GUESTFS_MACHINE_DIR"])
    assert cli_main(["kexec", os.fspath(m.mountpoint)]) == 130
    err = capsys.readouterr().err
    assert "carries on in daemon pid" in err and "Traceback" not in err
    deadline = time.monotonic() + 120
    while True:
        proc = m.cli("status", "--machine", m.machine, "--json", check=False)
        status = json.loads(proc.stdout) if proc.returncode == 0 else {}
        if status.get("pid") and status.get("generation") == 1:
            break
        assert time.monotonic() < deadline, "the kexec did not carry on"
        time.sleep(0.1)
    assert (m / "f").read_text() == "x"


@pytest.mark.parametrize("when", ["check", "handover"])
def test_ctrl_c_during_an_offline_fsck_leaves_the_machine_handed_over(
        mount_factory: MountFactory, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], when: str) -> None:
    """Ctrl-C cancels the check, which only reads, but never the handover after it: the
    machine was left as a kernel that crashed (state RUNNING), though the command said
    nothing was changed."""
    m = mount_factory(memory="64M")
    (m / "f").write_text("kept")
    m.cli("umount", os.fspath(m.mountpoint))

    def ctrl_c() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)          # Python runs the handler between two instructions
    check, hand_over = Filesystem.check, Session.hand_over

    def check_interrupted(self: Filesystem) -> list[str]:
        if when == "check":
            ctrl_c()
        return check(self)

    def hand_over_interrupted(self: Session, *args: object, **kwargs: object) -> None:
        if when == "handover":
            ctrl_c()
        hand_over(self, *args, **kwargs)
    monkeypatch.setattr(Filesystem, "check", check_interrupted)
    monkeypatch.setattr(Session, "hand_over", hand_over_interrupted)
    monkeypatch.setenv("GUESTFS_MACHINE_DIR", m.env["GUESTFS_MACHINE_DIR"])
    code = cli_main(["fsck", "--machine", m.machine])
    out, err = capsys.readouterr()
    if when == "check":
        assert code == 130 and err.endswith("guestfs: interrupted; nothing was changed\n")
    else:       # the check was done: its result stands
        assert code == 0 and "no problems" in out
    assert "Traceback" not in err
    status = json.loads(m.cli("status", "--machine", m.machine, "--json").stdout)
    assert status["arena"]["state"] == "HANDED_OVER"
    m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint))
    assert (m / "f").read_text() == "kept"
    assert "crashed kernel" not in m.log.read_text()


def test_ctrl_c_while_a_mount_starts_says_it_carries_on(
        cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    machine, mountpoint = unique_machine(), make_mountpoint()

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(background, "_await_readiness", interrupted)
    monkeypatch.setenv("GUESTFS_MACHINE_DIR", cli_env["GUESTFS_MACHINE_DIR"])
    try:
        assert cli_main(["mount", "--machine", machine, "--memory", "64M",
                         os.fspath(mountpoint)]) == 130
        err = capsys.readouterr().err
        assert "goes on mounting" in err and f"guestfs umount {mountpoint}" in err
        deadline = time.monotonic() + 120
        while mounts.mount_of_machine(machine) is None:
            assert time.monotonic() < deadline, "the mount did not carry on"
            time.sleep(0.1)
    finally:
        if is_mounted(mountpoint):
            run_cli(cli_env, "umount", os.fspath(mountpoint))
        run_cli(cli_env, "machine", "destroy", machine, check=False)
        mountpoint.rmdir()


def test_ctrl_c_while_the_command_line_loads_is_one_line() -> None:
    """The console script's entry catches a Ctrl-C that lands while the heavy imports
    run (the interrupt fires a millisecond into them)."""
    code = ("import os, signal, threading\n"
            "from guestfs import entry\n"
            "threading.Timer(0.001, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
            "raise SystemExit(entry.main())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "guestfs: interrupted; nothing was changed\n"


# --- sizes and the machine folder -----------------------------------------------------------


@pytest.mark.fuse
def test_a_machine_folder_filled_after_the_arena_was_made(tmp_path: Path) -> None:
    """The arena is a sparse file: once its filesystem is full, the daemon's first store
    to a page never backed dies of SIGBUS. The log must say so (the daemon vanished
    without a word), the write is not acknowledged, and nothing is lost once there is
    room again."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M,mode=700", "tmpfs", small],
                   check=True)
    folder = small / "machines"
    folder.mkdir(mode=0o700)
    env = {**os.environ, "GUESTFS_MACHINE_DIR": os.fspath(folder)}
    m = Mount(unique_machine(), make_mountpoint(), env)
    try:
        m.cli("mount", "--machine", m.machine, "--memory", "4M", os.fspath(m.mountpoint))
        m.pid = m.status()["pid"]
        (m / "kept").write_bytes(b"acknowledged")
        filler = small / "filler"
        with open(filler, "wb") as f:
            with pytest.raises(OSError):
                while True:
                    f.write(bytes(1 << 20))
                    f.flush()
        with pytest.raises(OSError):
            (m / "big").write_bytes(os.urandom(2 << 20))
        assert wait_pid_gone(m.pid, 10)
        assert "Fatal Python error: Bus error" in m.log.read_text()
        filler.unlink()
        m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint))
        m.pid = m.status()["pid"]
        assert (m / "kept").read_bytes() == b"acknowledged"
        assert m.fsck() == []
    finally:
        teardown_mount(m)          # removes the mount point too
        subprocess.run(["umount", small], check=True)


@pytest.mark.fuse
def test_an_arena_deleted_while_mounted_is_never_handed_over(
        mount_factory: MountFactory) -> None:
    """The arena's file deleted under a live mount: the daemon's mapping still holds the
    files, but a handover into it reaches no next kernel. An unmount or a kexec said
    they succeeded and lost every file; they must refuse, and the daemon serve on, so
    that the files can be copied out."""
    m = mount_factory(memory="64M")
    (m / "f").write_bytes(b"only in the daemon's memory now")
    (Path(m.env["GUESTFS_MACHINE_DIR"]) / f"{m.machine}.mem").unlink()
    daemon = os.pidfd_open(m.pid)       # so that the end kills this process, never another
    try:
        for args in (["umount"], ["kexec"], ["kexec", "--exec"]):
            refused = m.cli(*args, os.fspath(m.mountpoint), check=False)
            assert refused.returncode == 1 and "was deleted while mounted" in refused.stderr, \
                refused.stderr
        os.kill(m.pid, signal.SIGTERM)          # this mount's daemon, by its PID
        deadline = time.monotonic() + 10
        while "was deleted while mounted" not in m.log.read_text():
            assert time.monotonic() < deadline, "SIGTERM was not refused"
            time.sleep(0.05)
        assert m.status()["pid"] == m.pid
        assert (m / "f").read_bytes() == b"only in the daemon's memory now"
    finally:
        signal.pidfd_send_signal(daemon, signal.SIGKILL)   # nothing else ends it; the
        os.close(daemon)                                   # finalizer clears the dead mount
        wait_pid_gone(m.pid, 10)


def test_a_machine_larger_than_the_room_is_refused(cli_env: dict[str, str]) -> None:
    machine, mountpoint = unique_machine(), make_mountpoint()
    try:
        proc = run_cli(cli_env, "mount", "--machine", machine, "--memory", "1T",
                       os.fspath(mountpoint), check=False)
        assert proc.returncode == 1 and "does not fit" in proc.stderr and "TiB" in proc.stderr
        assert not list(Path(cli_env["GUESTFS_MACHINE_DIR"]).glob(f"{machine}.*")), \
            "a refused first mount left files behind"
        assert not is_mounted(mountpoint)
    finally:
        mountpoint.rmdir()


def test_an_arena_that_vanished_is_not_replaced_by_an_empty_one(
        mount_factory: MountFactory) -> None:
    m = mount_factory()
    (m / "precious").write_text("x")
    m.cli("umount", os.fspath(m.mountpoint))
    arena = Path(m.env["GUESTFS_MACHINE_DIR"]) / f"{m.machine}.mem"
    moved = arena.with_name("elsewhere.bin")
    arena.rename(moved)
    try:
        proc = m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint), check=False)
        assert proc.returncode == 1 and "is missing" in proc.stderr
        assert not arena.exists() and not is_mounted(m.mountpoint)
    finally:
        moved.rename(arena)
    remount(m)
    assert (m / "precious").read_text() == "x"


@pytest.mark.parametrize("make_bad", ["world-writable", "other-owner", "symlink"])
def test_an_untrusted_machine_folder_is_refused(tmp_path: Path, make_bad: str) -> None:
    folder = tmp_path / "machines"
    if make_bad == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "real")
    else:
        folder.mkdir(mode=0o700)
        if make_bad == "world-writable":
            folder.chmod(0o777)
        else:
            os.chown(folder, 65534, 65534)
    mountpoint = make_mountpoint()
    try:
        proc = subprocess.run([*CLI, "mount", "--machine", "m", os.fspath(mountpoint)],
                              env={**os.environ, "GUESTFS_MACHINE_DIR": os.fspath(folder)},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "cannot be trusted" in proc.stderr, proc.stderr
        assert not is_mounted(mountpoint)
        target = tmp_path / "real" if make_bad == "symlink" else folder
        assert not [p for p in target.iterdir()], "files were made in an untrusted folder"
    finally:
        mountpoint.rmdir()


def test_the_log_is_never_written_through_a_symlink(cli_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    machine = unique_machine()
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    log = Path(cli_env["GUESTFS_MACHINE_DIR"]) / f"{machine}.log"
    log.symlink_to(victim)
    mountpoint = make_mountpoint()
    try:
        proc = run_cli(cli_env, "mount", "--machine", machine, "--format",
                       os.fspath(mountpoint), check=False)
        assert proc.returncode == 1 and "log" in proc.stderr
        assert victim.read_text() == "untouched\n" and not is_mounted(mountpoint)
    finally:
        log.unlink()
        run_cli(cli_env, "machine", "destroy", machine, check=False)
        mountpoint.rmdir()
