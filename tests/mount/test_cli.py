"""The command line: help, usage errors (exit 2), failures (exit 1, "guestfs: ..." on
stderr), status output, and the daemon's ways to stop."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (CLI, Mount, is_mounted, make_mountpoint, run_cli, teardown_mount,
                      unique_machine, wait_pid_gone)
from guestfs import cli
from guestfs.config import MountOptions
from guestfs.filesystem import AtimeMode, AtimePolicy

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
])
def test_failures_exit_1(argv: list[str], message: str,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("guestfs: ") and message in err


def test_mount_reports_the_daemons_reason(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(cli_env, "mount", "--machine", unique_machine(), os.fspath(tmp_path / "nope"),
                   check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("guestfs: ") and "does not exist" in proc.stderr


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
    mount.cli("umount", os.fspath(mount.mountpoint))
    assert not is_mounted(mount.mountpoint)


@pytest.mark.fuse
def test_kho_dump_and_memmap(mount: Mount, tmp_path: Path) -> None:
    dump = mount.cli("kho", "dump", "--machine", mount.machine).stdout
    assert f"machine {mount.machine}" in dump
    picture = tmp_path / "memmap.png"
    mount.cli("kho", "memmap", "--machine", mount.machine, "-o", os.fspath(picture))
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


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
