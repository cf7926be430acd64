"""Shared fixtures: real guestfs mounts made with the real command line.

Tests live in tiers, one folder each, and are marked with it: ``unit`` (the core and the
emulated machine, in process, fast), ``model`` (model-based tests, with kernel processes
that really exec themselves), ``mount`` (real FUSE mounts through the command line),
``clients`` (SQLite, PostgreSQL, QEMU) and ``bench`` (the benchmark harness).
``tools/test`` runs them all; ``tools/test --quick`` the first three, with fewer
hypothesis examples (``GUESTFS_QUICK_TESTS=1``).

Every mount gets a unique machine name in a per-session machine folder under /dev/shm
(short, because control sockets live there and Unix socket paths are limited to 107
bytes). Whatever happens in the test, the finalizer unmounts (``guestfs umount``, then
``fusermount3 -u -z`` / ``umount -l`` of that mount point only), waits for that mount's
daemon by its PID (killing that PID only if it will not end), and deletes the arena.

Tests that need FUSE are marked ``fuse`` and skipped, with the reason, when /dev/fuse is
missing or we are not root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guestfs import control

TIERS = ("unit", "model", "mount", "clients", "bench")
CLI = [sys.executable, "-m", "guestfs.cli"]
CLI_TIMEOUT = 120  # seconds for one CLI call (mounting boots a kernel)
EXIT_TIMEOUT = 30  # seconds a daemon gets to end after its mount is gone


def fuse_unavailable() -> str | None:
    """Why real mounts cannot be tested here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "real mounts need root"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier (the folder it lives in), and skip, with the reason,
    the tests that need FUSE where there is none."""
    reason = fuse_unavailable()
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if reason is not None and item.get_closest_marker("fuse"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def machine_dir() -> Iterator[Path]:
    """A private machine folder for this test session."""
    path = Path(tempfile.mkdtemp(prefix="gfs-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cli_env(machine_dir: Path) -> dict[str, str]:
    """Environment for every ``guestfs`` call of the tests."""
    return {**os.environ, "GUESTFS_MACHINE_DIR": os.fspath(machine_dir)}


def run_cli(env: dict[str, str], *args: str, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``guestfs ARGS``; with `check`, fail the test showing stderr on a non-zero exit."""
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"guestfs {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def unique_machine() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def make_mountpoint() -> Path:
    """An empty directory that other users can reach (pytest's tmp folders are 0700,
    which would hide an allow_other mount from them)."""
    path = Path(tempfile.mkdtemp(prefix="gfs-mnt-"))
    path.chmod(0o755)
    return path


@dataclass
class Mount:
    """A live guestfs mount made by the fixture."""

    machine: str
    mountpoint: Path
    env: dict[str, str]
    pid: int = 0

    def cli(self, *args: str, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run the command line with this mount's machine folder."""
        return run_cli(self.env, *args, check=check, timeout=timeout)

    def status(self) -> dict[str, Any]:
        """``guestfs status --json`` of this mount."""
        return json.loads(self.cli("status", os.fspath(self.mountpoint), "--json").stdout)

    def fsck(self) -> list[str]:
        """The daemon's consistency check of the live filesystem (empty when sound)."""
        sock = control.socket_path(Path(self.env["GUESTFS_MACHINE_DIR"]), self.machine)
        return control.request(sock, {"op": "check"}, timeout=60)["problems"]

    def __truediv__(self, name: str) -> Path:
        return self.mountpoint / name

    @property
    def log(self) -> Path:
        return Path(self.env["GUESTFS_MACHINE_DIR"]) / f"{self.machine}.log"


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly at `path`."""
    target = os.fspath(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as ended (its reaper may be slow or absent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `pid` to end; whether it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def teardown_mount(m: Mount) -> list[str]:
    """Unmount, end the daemon, delete the arena; returns what had to be forced."""
    forced = []
    if is_mounted(m.mountpoint):
        proc = m.cli("umount", os.fspath(m.mountpoint), check=False, timeout=60)
        if proc.returncode != 0:
            forced.append(f"guestfs umount failed: {proc.stderr.strip()}")
    for fallback in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if is_mounted(m.mountpoint):
            subprocess.run([*fallback, os.fspath(m.mountpoint)], capture_output=True, timeout=30)
            forced.append(" ".join(fallback))
    if m.pid and not wait_pid_gone(m.pid, EXIT_TIMEOUT):
        os.kill(m.pid, signal.SIGKILL)  # this mount's daemon only, by its PID
        wait_pid_gone(m.pid, 10)
        forced.append(f"SIGKILL {m.pid}")
    m.cli("machine", "destroy", m.machine, check=False, timeout=60)
    for leftover in Path(m.env["GUESTFS_MACHINE_DIR"]).glob(f"{m.machine}.*"):
        leftover.unlink(missing_ok=True)
    if not is_mounted(m.mountpoint):
        m.mountpoint.rmdir()
    return forced


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount_factory(cli_env: dict[str, str]) -> Iterator[MountFactory]:
    """Make mounts: ``mount_factory(memory="64M", options="allow_other")``."""
    made: list[Mount] = []

    def make(*, memory: str = "256M", options: str | None = None) -> Mount:
        m = Mount(unique_machine(), make_mountpoint(), cli_env)
        made.append(m)
        args = ["mount", "--machine", m.machine, "--memory", memory]
        if options:
            args += ["-o", options]
        m.cli(*args, os.fspath(m.mountpoint))
        m.pid = m.status()["pid"]
        return m

    yield make
    problems = {m.machine: teardown_mount(m) for m in made}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"mounts needed forcing at teardown: {problems}"


@pytest.fixture
def mount(mount_factory: MountFactory) -> Mount:
    """A fresh 256 MiB mount."""
    return mount_factory()


FAULTY_DAEMON = Path(__file__).resolve().parent / "helpers" / "faulty_daemon.py"
RAISE_IN_HANDLER = "raise-in-handler"     # faulty_daemon.py's other fault


@pytest.fixture
def faulty_mount(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[str], Mount]]:
    """``faulty_mount(fault)``: a fresh 256 MiB mount whose daemon fails on purpose:
    its first handover in phase `fault`, or in a FUSE handler (RAISE_IN_HANDLER); see
    tests/helpers/faulty_daemon.py."""
    made: list[tuple[Mount, subprocess.Popen]] = []

    def make(fault: str) -> Mount:
        m = Mount(unique_machine(), make_mountpoint(), cli_env)
        log = open(tmp_path / f"{m.machine}.log", "wb")
        proc = subprocess.Popen([sys.executable, os.fspath(FAULTY_DAEMON), fault, m.machine,
                                 os.fspath(m.mountpoint), str(256 << 20)], env=cli_env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        made.append((m, proc))
        m.pid = proc.pid
        deadline = time.monotonic() + CLI_TIMEOUT
        while not is_mounted(m.mountpoint) or m.cli("status", os.fspath(m.mountpoint),
                                                    check=False).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the faulty daemon did not mount: "
                            f"{(tmp_path / f'{m.machine}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        return m

    yield make
    problems = {}
    for m, proc in made:
        forced = teardown_mount(m)
        proc.wait(timeout=EXIT_TIMEOUT)
        if forced:
            problems[m.machine] = forced
    assert not problems, f"mounts needed forcing at teardown: {problems}"


@pytest.fixture(scope="module")
def shared_mount(cli_env: dict[str, str]) -> Iterator[Mount]:
    """One mount for a whole test module (tests work in their own directories on it)."""
    m = Mount(unique_machine(), make_mountpoint(), cli_env)
    try:
        m.cli("mount", "--machine", m.machine, "--memory", "512M", os.fspath(m.mountpoint))
        m.pid = m.status()["pid"]
        yield m
    finally:
        forced = teardown_mount(m)
    assert not forced, f"shared mount needed forcing at teardown: {forced}"


@pytest.fixture
def workdir(shared_mount: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the shared mount, named after the test."""
    path = shared_mount.mountpoint / request.node.name.replace("/", "_")[:200]
    path.mkdir()
    return path
