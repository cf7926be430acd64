"""The command line: help, usage errors (exit 2), failures (exit 1, "guestfs: ..." on
stderr), status output, and the daemon's ways to stop."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (CLI, Mount, is_mounted, make_mountpoint, run_cli, teardown_mount,
                      unique_machine, wait_pid_gone)
from guestfs import __version__, background, cli
from guestfs.cli import manpage
from guestfs.cli import mount as mount_cli
from guestfs.cli.common import one_style
from guestfs.config import MountOptions
from kho_backend.fdt import FdtReader
from guestfs.atime import AtimeMode, AtimePolicy

HELP_PATHS = [[], ["mount"], ["umount"], ["status"], ["machine"], ["machine", "list"],
              ["machine", "destroy"], ["kho"], ["kho", "dump"], ["kho", "memmap"]]


@pytest.fixture(autouse=True)
def private_machine_dir(machine_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTFS_MACHINE_DIR", os.fspath(machine_dir))


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: " ".join(p) or "guestfs")
def test_help_everywhere(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: guestfs")


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["mount"], "required"),
    (["mount", "-o", "bogus", "/mnt"], "unknown mount option 'bogus'"),
    (["mount", "--memory", "12Q", "/mnt"], "not a size"),
    (["mount", "--machine", "no/slash", "/mnt"], "not a valid machine name"),
    (["status", "/mnt", "--machine", "x"], "not allowed with"),
    (["machine", "destroy"], "required"),
    (["frobnicate"], "invalid choice"),
    (["moutn", "/mnt"], "invalid choice: 'moutn'"),         # a typo, not mount(8)'s form
    (["mount", "--memory", "1000", "/mnt"], "1000 is not a whole number of 4 KiB pages"),
    (["kexec", "--cmdline", "kho=on quiet", "/mnt"], "unknown word 'quiet'"),
    (["kexec", "--cmdline", "kho=maybe", "/mnt"], "'kho=maybe' is not valid"),
    (["kexec", "--cmdline", "kho_scratch=0%", "/mnt"], "kho_scratch=0% is not valid"),
    (["kexec", "--cmdline", "kho=off", "/mnt"], "kho=off: that kernel could not hand"),
    (["mount", "--nodes", "two", "/mnt"], "'two' is not a whole number"),
    (["m1", "/mnt", "/mnt2", "-o", "rw"], "expected a machine and a mount point"),
    (["m1", "/mnt", "-o"], "-o needs a value"),
    (["m1", "/mnt", "-x", "-o", "rw"], "unknown switch '-x'"),
])
def test_usage_errors_exit_2(argv: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "guestfs: " in err and message in err


@pytest.mark.parametrize("argv, message", [
    (["umount", "/"], "/ is not a guestfs mount"),
    (["status", "/"], "/ is not a guestfs mount"),
    (["status", "--machine", "no-such-machine"], "no machine named 'no-such-machine'"),
    (["machine", "destroy", "no-such-machine"], "no machine named 'no-such-machine'"),
    (["fsck", "--machine", "no-such-machine"], "no machine named 'no-such-machine'"),
    (["kho", "dump", "--machine", "no-such-machine"], "no machine named 'no-such-machine'"),
    (["mount", "--machine", "m", "/no/such/dir"], "mount point /no/such/dir does not exist"),
])
def test_failures_exit_1(argv: list[str], message: str,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("guestfs: ") and message in err
    assert err.count("\n") == 1 and not err.rstrip().endswith(".")    # one line, one style


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"guestfs {__version__}\n"


def test_messages_have_one_style() -> None:
    assert one_style("There is no machine named 'x'.") == "there is no machine named 'x'"
    assert one_style("KHO is off (kho=off).") == "KHO is off (kho=off)"
    assert one_style("/mnt is busy...") == "/mnt is busy..."


def test_helper_form_becomes_guestfs_mount() -> None:
    """``guestfs MACHINE DIR -o OPTIONS`` is what mount.fuse3 runs for mount(8)."""
    assert mount_cli.helper_argv(["vm1", "/mnt/g", "-o", "rw,memory=1G,allow_other,dev,suid"]) \
        == ["mount", "--machine", "vm1", "--memory", "1G", "-o", "rw,allow_other,dev,suid",
            "/mnt/g"]
    assert mount_cli.helper_argv(["vm1", "/mnt/g", "-onodes=2", "-o", "memory=64M"]) == \
        ["mount", "--machine", "vm1", "--nodes", "2", "--memory", "64M", "/mnt/g"]


def test_mount_onto_a_missing_directory_starts_no_daemon(
        monkeypatch: pytest.MonkeyPatch, machine_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_daemon(*args: object, **kwargs: object) -> int:
        raise AssertionError("a daemon was started")

    monkeypatch.setattr(background, "start_background", no_daemon)
    machine = unique_machine()
    assert cli.main(["mount", "--machine", machine, "/no/such/dir"]) == 1
    assert cli.main([machine, "/no/such/dir", "-o", "memory=64M"]) == 1     # mount(8)'s form
    assert capsys.readouterr().err.count("does not exist") == 2
    assert not list(machine_dir.glob(f"{machine}.*"))


def test_manual_page_is_the_parser_s() -> None:
    page = manpage.render()
    assert page.startswith(".\\\" Generated") and ".TH GUESTFS 1" in page
    for command in ("guestfs mount", "guestfs umount", "guestfs kexec", "guestfs kho dump",
                    "guestfs kho memmap", "guestfs machine destroy", "guestfs fsck"):
        assert f".SS {command}\n" in page.replace("\\-", "-"), command
    assert "\\-\\-cmdline ARGS" in page and "MOUNTING WITH mount(8)" in page
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", "-"], input=page, capture_output=True, text=True,
                               env={**os.environ, "MANWIDTH": "80"}, timeout=60)
        assert shown.returncode == 0 and "fuse.guestfs" in shown.stdout, shown.stderr


def test_mount_reports_the_daemons_reason(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(cli_env, "mount", "--machine", unique_machine(), os.fspath(tmp_path / "nope"),
                   check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("guestfs: ") and "does not exist" in proc.stderr


def test_a_failed_first_mount_leaves_no_file(cli_env: dict[str, str],
                                             machine_dir: Path) -> None:
    machine, mnt = unique_machine(), make_mountpoint()
    try:
        proc = run_cli(cli_env, "mount", "--machine", machine, "--memory", "1M",
                       os.fspath(mnt), check=False)
    finally:
        mnt.rmdir()
    assert proc.returncode == 1 and "1 MiB is too small" in proc.stderr
    assert not list(machine_dir.glob(f"{machine}.*"))
    stray = machine_dir / f"{machine}.log"          # as an older release could leave
    stray.write_text("a log\n")
    assert "destroyed" in run_cli(cli_env, "machine", "destroy", machine).stderr
    assert not stray.exists()


def test_a_second_first_mount_names_the_daemon_creating_the_machine(
        cli_env: dict[str, str], machine_dir: Path) -> None:
    """Two first mounts of one machine at once: the second found the first one's log
    before its arena, and said the arena was moved or deleted (mount with --format).
    A process writing the log stands in for the first daemon, in the instant before it
    creates the arena."""
    machine, mnt = unique_machine(), make_mountpoint()
    log = machine_dir / f"{machine}.log"
    with open(log, "ab") as out:
        first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 stdout=out)
    try:
        proc = run_cli(cli_env, "mount", "--machine", machine, "--memory", "64M",
                       os.fspath(mnt), check=False)
        assert proc.returncode == 1, proc.stderr
        assert f"being created and mounted by daemon pid {first.pid}" in proc.stderr
        assert "--format" not in proc.stderr and not is_mounted(mnt)
    finally:
        first.kill()
        first.wait()
        log.unlink()
        mnt.rmdir()


def test_a_daemon_killed_while_starting_is_named_by_its_signal() -> None:
    assert background._ended(1) == "ended (exit status 1)"
    assert background._ended(-signal.SIGKILL) == "was killed by SIGKILL"
    bus = background._ended(-signal.SIGBUS)
    assert bus.startswith("was killed by SIGBUS") and "full?" in bus


def test_mount_options_round_trip() -> None:
    opts = MountOptions.parse("allow_other,ro,noatime,nosuid,default_permissions")
    assert opts.allow_other and opts.read_only and opts.flags == ("nosuid",)
    assert opts.atime == AtimePolicy(AtimeMode.NOATIME)
    assert MountOptions.parse(opts.text()) == opts
    fuse = opts.fuse_options("m1")
    assert {"default_permissions", "allow_other", "ro", "noatime", "fsname=guestfs-m1",
            "subtype=guestfs"} <= fuse
    assert "allow_other" not in MountOptions.parse("").fuse_options("m1")


def test_atime_options_are_the_filesystem_s() -> None:
    """libfuse refuses most atime options and the kernel leaves atime of FUSE files to the
    filesystem: they become the core's policy, the last mode word winning."""
    for text, policy in (("", AtimePolicy()),
                         ("strictatime", AtimePolicy(AtimeMode.STRICTATIME)),
                         ("norelatime", AtimePolicy(AtimeMode.STRICTATIME)),
                         ("noatime,relatime", AtimePolicy(AtimeMode.RELATIME)),
                         ("nostrictatime", AtimePolicy(AtimeMode.RELATIME)),
                         ("atime,nodiratime", AtimePolicy(AtimeMode.RELATIME, False)),
                         ("nodiratime,diratime", AtimePolicy())):
        opts = MountOptions.parse(text)
        assert opts.atime == policy, text
        assert MountOptions.parse(opts.text()) == opts
        assert not {"relatime", "strictatime", "nodiratime", "diratime", "norelatime",
                    "nostrictatime", "atime"} & opts.fuse_options("m1"), text


# --- with a mount ------------------------------------------------------------------------


@pytest.mark.fuse
def test_status_json_and_text(mount: Mount) -> None:
    status = mount.status()
    assert {"machine", "pid", "generation", "mountpoint", "arena", "inodes",
            "boot_timings_ns", "last_blackout"} <= status.keys()
    assert status["machine"] == mount.machine and status["pid"] == mount.pid
    assert status["arena"]["size"] == 256 << 20
    assert 0 < status["arena"]["free_pages"] <= status["arena"]["pages"]
    by_machine = json.loads(mount.cli("status", "--machine", mount.machine, "--json").stdout)
    assert by_machine["pid"] == mount.pid
    text = mount.cli("status", os.fspath(mount.mountpoint)).stdout
    assert mount.machine in text and f"pid {mount.pid}" in text


@pytest.mark.fuse
def test_machine_list_and_destroy_refused_while_mounted(mount: Mount) -> None:
    listing = json.loads(mount.cli("machine", "list", "--json").stdout)
    mine = [m for m in listing if m["machine"] == mount.machine]
    assert mine and mine[0]["mountpoint"] == os.fspath(mount.mountpoint)
    refused = mount.cli("machine", "destroy", mount.machine, check=False)
    assert refused.returncode == 1 and "is mounted at" in refused.stderr


@pytest.mark.fuse
def test_second_mount_of_a_machine_or_mountpoint_fails(mount: Mount) -> None:
    other = make_mountpoint()
    try:
        again = mount.cli("mount", "--machine", mount.machine, os.fspath(other), check=False)
        assert again.returncode == 1 and "in use" in again.stderr
        stacked = mount.cli("mount", "--machine", unique_machine(),
                            os.fspath(mount.mountpoint), check=False)
        assert stacked.returncode == 1 and "already a guestfs mount" in stacked.stderr
    finally:
        other.rmdir()


@pytest.mark.fuse
def test_umount_refused_while_busy(mount: Mount) -> None:
    (mount / "held").write_text("x")
    with open(mount / "held"):
        busy = mount.cli("umount", os.fspath(mount.mountpoint), check=False)
    assert busy.returncode == 1 and "busy" in busy.stderr
    assert f"in use by pid {os.getpid()} (" in busy.stderr          # names who holds it
    assert mount.status()["pid"] == mount.pid


@pytest.mark.fuse
def test_umount_waits_for_the_daemon_and_status_goes_offline(mount: Mount) -> None:
    mount.cli("umount", os.fspath(mount.mountpoint))
    assert not is_mounted(mount.mountpoint)
    assert wait_pid_gone(mount.pid, 0)
    offline = json.loads(mount.cli("status", "--machine", mount.machine, "--json").stdout)
    assert offline["pid"] is None and offline["machine"] == mount.machine


@pytest.mark.fuse
def test_external_umount_stops_the_daemon(mount: Mount) -> None:
    subprocess.run(["umount", os.fspath(mount.mountpoint)], check=True, timeout=30)
    assert wait_pid_gone(mount.pid, 10)


@pytest.mark.fuse
def test_foreground_daemon_stops_on_sigterm(cli_env: dict[str, str]) -> None:
    machine, mnt = unique_machine(), make_mountpoint()
    daemon = subprocess.Popen([*CLI, "mount", "-f", "--machine", machine, "--memory", "64M",
                               os.fspath(mnt)], env=cli_env, stderr=subprocess.PIPE, text=True)
    m = Mount(machine, mnt, cli_env, daemon.pid)
    try:
        _wait_until_mounted(mnt, daemon)
        (mnt / "f").write_bytes(b"written just before the signal")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert not is_mounted(mnt)
        assert "SIGTERM" in daemon.stderr.read()
    finally:
        teardown_mount(m)


def _foreground_daemon(cli_env: dict[str, str], machine: str,
                       mnt: Path) -> subprocess.Popen[str]:
    """``guestfs mount -f`` of a new 64M machine, in a session of its own."""
    return subprocess.Popen([*CLI, "mount", "-f", "--machine", machine, "--memory", "64M",
                             os.fspath(mnt)], env=cli_env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.fuse
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_foreground_daemon_stops_once_on_a_burst_of_signals(
        cli_env: dict[str, str], signum: signal.Signals) -> None:
    """An impatient Ctrl-C, pressed again and again: the signals that come while the
    first one's handover runs, or once the daemon has stopped, change nothing (they
    ended it with a traceback and exit 1, or killed it as the interpreter exited)."""
    machine, mnt = unique_machine(), make_mountpoint()
    daemon = _foreground_daemon(cli_env, machine, mnt)
    m = Mount(machine, mnt, cli_env, daemon.pid)
    try:
        _wait_until_mounted(mnt, daemon)
        (mnt / "f").write_bytes(b"written just before the signals")
        for _ in range(40):
            if daemon.poll() is not None:
                break
            daemon.send_signal(signum)
            time.sleep(0.001)
        assert daemon.wait(timeout=30) == 0
        stderr = daemon.stderr.read()
        assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
        assert not is_mounted(mnt)
        m.cli("mount", "--machine", machine, os.fspath(mnt))
        assert (mnt / "f").read_bytes() == b"written just before the signals"
        assert m.fsck() == []
    finally:
        teardown_mount(m)


@pytest.mark.fuse
def test_ctrl_c_while_the_next_image_starts_stops_it_once_it_serves(
        cli_env: dict[str, str]) -> None:
    """Ctrl-C to a foreground daemon just as a ``kexec --exec`` execs the next image: the
    half-started interpreter died of it (a traceback, the shield left, no daemon). The
    signal now waits across the exec, and the next kernel stops on it once it serves."""
    machine, mnt = unique_machine(), make_mountpoint()
    daemon = _foreground_daemon(cli_env, machine, mnt)
    m = Mount(machine, mnt, cli_env, daemon.pid)
    try:
        _wait_until_mounted(mnt, daemon)
        (mnt / "f").write_bytes(b"kept")
        kexec = subprocess.Popen([*CLI, "kexec", "--exec", os.fspath(mnt)], env=cli_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = []
        for line in daemon.stderr:
            lines.append(line)
            if "kexec: exec" in line:
                time.sleep(0.05)        # the next image's interpreter is starting
                daemon.send_signal(signal.SIGINT)
                break
        kexec.wait(timeout=60)
        assert daemon.wait(timeout=60) == 0
        lines += daemon.stderr.readlines()
        log = "".join(lines)
        assert "Traceback" not in log and "SIGINT (received while booting)" in log, log
        assert not is_mounted(mnt)
        m.cli("mount", "--machine", machine, os.fspath(mnt))
        assert (mnt / "f").read_bytes() == b"kept"
    finally:
        teardown_mount(m)


def _wait_until_mounted(mnt: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        assert proc.poll() is None, f"daemon exited {proc.returncode}"
        assert time.monotonic() < deadline, "never mounted"
        time.sleep(0.05)


@pytest.mark.fuse
def test_dead_daemons_mount_is_cleared_by_umount(mount: Mount) -> None:
    os.kill(mount.pid, signal.SIGKILL)  # this mount's daemon, by its PID
    assert wait_pid_gone(mount.pid, 10)
    dead = mount.cli("status", os.fspath(mount.mountpoint), check=False)
    assert dead.returncode == 1 and "does not answer" in dead.stderr
    for args in (["kexec"], ["kexec", "--load-only"], ["kexec", "--abort"]):
        kexec = mount.cli(*args, os.fspath(mount.mountpoint), check=False)
        assert kexec.returncode == 1 and "daemon is gone" in kexec.stderr, kexec.stderr
    mount.cli("umount", os.fspath(mount.mountpoint))
    assert not is_mounted(mount.mountpoint)


@pytest.mark.fuse
def test_a_live_mount_is_not_taken_for_dead_from_another_machine_folder(
        mount: Mount, tmp_path: Path) -> None:
    """A command run with another GUESTFS_MACHINE_DIR finds no control socket for the
    machine: it must not unmount the live mount as a dead one (the mount command then
    put an empty machine of that name in its place)."""
    (mount / "precious").write_bytes(b"kept")
    other = tmp_path / "machines"
    other.mkdir(mode=0o700)
    env = {**mount.env, "GUESTFS_MACHINE_DIR": os.fspath(other)}
    for args in (["umount", os.fspath(mount.mountpoint)],
                 ["mount", "--machine", mount.machine, "--memory", "64M",
                  os.fspath(mount.mountpoint)]):
        refused = run_cli(env, *args, check=False)
        assert refused.returncode == 1, refused.stderr
        assert "still served by a daemon" in refused.stderr and "GUESTFS_MACHINE_DIR" in refused.stderr
        assert (mount / "precious").read_bytes() == b"kept"
        assert mount.status()["pid"] == mount.pid
    assert not any(other.iterdir())                 # no machine was made there


@pytest.mark.fuse
def test_kho_dump_and_memmap(mount: Mount, tmp_path: Path) -> None:
    mount.cli("umount", os.fspath(mount.mountpoint))
    done = mount.cli("kho", "dump", "--machine", mount.machine, "--dtb",
                     os.fspath(tmp_path / "kho.dtb"))
    assert f"machine {mount.machine}" in done.stdout and "Device-tree source" in done.stdout
    assert "page-size = <4096>;" in done.stdout                     # decoded, not swapped
    assert re.search(r"superblock = /bits/ 64 <0x[0-9a-f]+>;", done.stdout)
    root, sub = tmp_path / "kho.dtb", tmp_path / "kho.guestfs.dtb"
    assert f"to {root}" in done.stderr and f"to {sub}" in done.stderr
    if shutil.which("dtc"):
        for blob, compatible in ((root, "kho-v3"), (sub, "guestfs-v2")):
            dts = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", os.fspath(blob)],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            assert f'compatible = "{compatible}";' in dts
            assert "page-size = <0x100000>;" in dts or blob == root   # dtc reads big-endian
    else:
        assert FdtReader(sub.read_bytes(), "kho.guestfs.dtb").u32(0, "page-size") == 4096
    picture = tmp_path / "memmap.png"
    drawn = mount.cli("kho", "memmap", "--machine", mount.machine, "-o", os.fspath(picture))
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "close-up" in drawn.stdout and "preserved pool" in drawn.stdout


@pytest.mark.fuse
def test_kexec_refusals_and_abort_with_nothing_staged(mount: Mount) -> None:
    nothing = mount.cli("kexec", "--abort", os.fspath(mount.mountpoint), check=False)
    assert nothing.returncode == 1 and "nothing to abort" in nothing.stderr
    mount.cli("kexec", "--load-only", "--cmdline", "kho_poison", os.fspath(mount.mountpoint))
    mount.cli("kexec", "--abort", os.fspath(mount.mountpoint))
    missing = mount.cli("filefrag", os.fspath(mount / "nonexist"), check=False)
    assert missing.returncode == 1 and "No such file or directory" in missing.stderr
    assert "b'" not in missing.stderr


@pytest.mark.fuse
def test_commands_run_from_inside_the_mount_do_not_hold_it(mount: Mount) -> None:
    """A command whose working directory is the mount leaves it first: kexec and umount
    name the processes that use the mount, never themselves."""
    holder = subprocess.Popen(["sleep", "60"], cwd=mount.mountpoint)
    try:
        busy = subprocess.Popen([*CLI, "umount", "."], cwd=mount.mountpoint, env=mount.env,
                                stderr=subprocess.PIPE, text=True)
        err = busy.communicate(timeout=60)[1]
        assert busy.returncode == 1 and f"in use by pid {holder.pid} (sleep);" in err, err
        assert str(busy.pid) not in err
    finally:
        holder.kill()
        holder.wait()
    kexec = subprocess.run([*CLI, "kexec", "."], cwd=mount.mountpoint, env=mount.env,
                           capture_output=True, text=True, timeout=120)
    assert kexec.returncode == 0, kexec.stderr
    assert mount.status()["generation"] == 1 and mount.status()["pid"] == mount.pid


@pytest.mark.fuse
def test_fsck_live_offline_and_of_a_damaged_record(mount: Mount) -> None:
    (mount / "f").write_bytes(b"data")
    live = mount.cli("fsck", "--machine", mount.machine)
    assert "(mounted): no problems" in live.stdout
    mount.cli("umount", os.fspath(mount.mountpoint))
    offline = mount.cli("fsck", "--machine", mount.machine, "--json")
    assert json.loads(offline.stdout) == {"machine": mount.machine, "problems": []}
    _flip_record_page_byte(Path(mount.env["GUESTFS_MACHINE_DIR"]) / f"{mount.machine}.mem")
    damaged = mount.cli("fsck", "--machine", mount.machine, check=False)
    assert damaged.returncode == 4 and "corrupt" in damaged.stdout, damaged.stdout
    mount.cli("mount", "--machine", mount.machine, os.fspath(mount.mountpoint))
    mount.pid = mount.status()["pid"]
    with pytest.raises(OSError) as eio:
        (mount / "f").read_bytes()
    assert eio.value.errno == errno.EIO


def _flip_record_page_byte(arena: Path) -> None:
    """Flip a byte in the record page of inode 2 of a handed-over arena."""
    from guestfs.handover import NAME, read_subtree
    from guestfs.store.page import Pages
    from guestfs.store.records import InodeTable
    from guestfs.store.superblock import Superblock
    from kho_backend.arena import Arena
    from kho_backend.header import MachineHeader
    from kho_backend.kho_in import IncomingHandover
    from kho_backend.units import PAGE_SHIFT

    with Arena.open(arena) as mem:
        params = MachineHeader.read(mem).boot_params
        handover = IncomingHandover.parse(mem, params.fdt_phys, params.fdt_size)
        sb_pfn = read_subtree(handover.retrieve_subtree(NAME)[1]).superblock_phys >> PAGE_SHIFT
        pages = Pages(mem)
        sb = Superblock.read(pages, sb_pfn)
        page = InodeTable(pages, sb.itable, sb.ino_generation).page_of(2)
        mem.view(page)[4000] ^= 0x01
