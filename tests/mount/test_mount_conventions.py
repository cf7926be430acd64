"""The conventions of a FUSE file system: ``mount -t fuse.guestfs``, an /etc/fstab line,
and a plain ``umount`` that hands the files over as ``guestfs umount`` does.

mount(8) runs ``mount.fuse3``, which runs ``guestfs MACHINE DIR -o OPTIONS`` through
``/bin/sh`` with the shell's default search path. The type ``fuse`` with the source
``/path/to/guestfs#MACHINE`` names the command by its path: these tests use that form to
run this checkout's command, and the ``fuse.guestfs`` form only where set-up's link in
/usr/local/bin leads to this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI, Mount, is_mounted, make_mountpoint, teardown_mount, \
    unique_machine, wait_pid_gone
from guestfs import mounts

pytestmark = pytest.mark.fuse

COMMAND = Path(sys.executable).parent / "guestfs"    # this checkout's console script
SHELL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture
def mountpoints(cli_env: dict[str, str]) -> Iterator[list[Mount]]:
    """Mounts a test makes with mount(8); each unmounted, stopped and destroyed after."""
    made: list[Mount] = []
    yield made
    forced = {m.machine: teardown_mount(m) for m in made}
    assert not any(forced.values()), f"mounts needed forcing at teardown: {forced}"


def _new(made: list[Mount], env: dict[str, str]) -> Mount:
    m = Mount(unique_machine(), make_mountpoint(), env)
    made.append(m)
    return m


def _mount8(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _status(m: Mount) -> dict:
    return json.loads(m.cli("status", "--machine", m.machine, "--json").stdout)


def test_mount_8_and_plain_umount_hand_over(mountpoints: list[Mount],
                                            cli_env: dict[str, str]) -> None:
    if not COMMAND.exists():
        pytest.skip(f"no console script {COMMAND}")
    m = _new(mountpoints, cli_env)
    source = f"{COMMAND}#{m.machine}"
    done = _mount8(cli_env, "-t", "fuse", source, os.fspath(m.mountpoint),
                   "-o", "memory=64M,allow_other")
    assert done.returncode == 0, done.stderr
    entry = mounts.mount_at(m.mountpoint)
    assert entry is not None and entry.machine == m.machine and entry.fstype == "fuse.guestfs"
    live = _status(m)
    m.pid = live["pid"]
    assert live["arena"]["size"] == 64 << 20 and "allow_other" in live["options"]
    (m / "kept").write_bytes(b"across a plain umount")

    subprocess.run(["umount", os.fspath(m.mountpoint)], check=True, timeout=30)
    # Right away, as a script would: the next mount waits for the handover.
    again = _mount8(cli_env, "-t", "fuse", source, os.fspath(m.mountpoint),
                    "-o", "memory=64M")
    assert again.returncode == 0, again.stderr
    assert wait_pid_gone(m.pid, 10)
    assert (m / "kept").read_bytes() == b"across a plain umount"
    m.pid = _status(m)["pid"]

    subprocess.run(["umount", os.fspath(m.mountpoint)], check=True, timeout=30)
    assert wait_pid_gone(m.pid, 30)
    assert not is_mounted(m.mountpoint)
    offline = _status(m)
    assert offline["pid"] is None and offline["arena"]["state"] == "HANDED_OVER"
    m.pid = 0


def test_mount_8_refusals_say_why(mountpoints: list[Mount], cli_env: dict[str, str]) -> None:
    if not COMMAND.exists():
        pytest.skip(f"no console script {COMMAND}")
    m = _new(mountpoints, cli_env)
    source = f"{COMMAND}#{m.machine}"
    bad = _mount8(cli_env, "-t", "fuse", source, os.fspath(m.mountpoint), "-o", "bogus")
    assert bad.returncode != 0 and "unknown mount option 'bogus'" in bad.stderr
    assert not list(Path(cli_env["GUESTFS_MACHINE_DIR"]).glob(f"{m.machine}.*"))
    assert _mount8(cli_env, "-t", "fuse", source, os.fspath(m.mountpoint),
                   "-o", "memory=64M").returncode == 0
    m.pid = _status(m)["pid"]
    m.cli("umount", os.fspath(m.mountpoint))
    other = _mount8(cli_env, "-t", "fuse", source, os.fspath(m.mountpoint), "-o", "memory=128M")
    assert other.returncode != 0 and "has 64 MiB of memory, not the 128 MiB" in other.stderr


def test_fstab_line(mountpoints: list[Mount], cli_env: dict[str, str], tmp_path: Path) -> None:
    """The README's /etc/fstab line, in a table of its own (mount --fstab)."""
    found = shutil.which("guestfs", path=SHELL_PATH)
    if found is None or os.path.realpath(found) != os.path.realpath(COMMAND):
        pytest.skip(f"'guestfs' on the shell's default path is {found}, not this checkout's "
                    f"{COMMAND} (tools/setup.sh links it)")
    m = _new(mountpoints, cli_env)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{m.machine} {m.mountpoint} fuse.guestfs "
                     "memory=64M,allow_other,nofail,noauto 0 0\n")
    done = _mount8(cli_env, "--fstab", os.fspath(fstab), os.fspath(m.mountpoint))
    assert done.returncode == 0, done.stderr
    m.pid = _status(m)["pid"]
    assert "allow_other" in _status(m)["options"]
    (m / "f").write_text("via fstab")
    subprocess.run(["umount", os.fspath(m.mountpoint)], check=True, timeout=30)
    assert wait_pid_gone(m.pid, 30)
    assert _status(m)["arena"]["state"] == "HANDED_OVER"
    m.pid = 0


def test_mount_right_after_a_plain_umount_waits_for_the_handover(mount: Mount) -> None:
    """The daemon hands over once a plain umount has taken its mount away; a mount of
    the machine meanwhile waits for it (here the daemon is held stopped for a while)."""
    (mount / "f").write_bytes(b"handed over late")
    old = mount.pid
    os.kill(old, signal.SIGSTOP)           # this mount's daemon, by its PID
    try:
        mounts.umount2(mount.mountpoint)   # umount(2): the kernel lets go without the daemon
        again = subprocess.Popen([*CLI, "mount", "--machine", mount.machine,
                                  os.fspath(mount.mountpoint)], env=mount.env,
                                 stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert again.poll() is None, again.stderr.read()
    finally:
        os.kill(old, signal.SIGCONT)
    err = again.communicate(timeout=120)[1]
    assert again.returncode == 0, err
    assert "waiting for the last daemon" in err and "dead mount" not in err
    assert wait_pid_gone(old, 30)
    mount.pid = _status(mount)["pid"]
    assert (mount / "f").read_bytes() == b"handed over late"
