"""A PostgreSQL server of our own: Debian's binaries, an unprivileged system user, a
data directory on the mount, a private socket directory and a free localhost port."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import Failure, apt
from clients.libpq import Connection, PgError
from clients.procs import Child, started
from clients.report import progress

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PACKAGES = apt.PACKAGES["postgres"]
USER = "guestfs-pg"
READY_TIMEOUT = 300.0  # seconds for a start, crash recovery included
CRASH_RECOVERY = "database system was not properly shut down; automatic recovery in progress"


def ensure_installed() -> None:
    """PostgreSQL 15 (and contrib, for amcheck) from Debian's packages: installed by
    tools/setup.sh for the tests, here only when a run on its own finds them missing."""
    if not all((PG_BIN / tool).exists() for tool in ("pg_ctl", "initdb", "pgbench")):
        apt.ensure(PACKAGES)


def ensure_user() -> pwd.struct_passwd:
    """The unprivileged system user the server runs as, created if missing."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        progress(f"creating system user {USER}")
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", USER],
                       check=True)
        return pwd.getpwnam(USER)


def free_port() -> int:
    """A localhost TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A data directory (on the mount) and where its server listens."""

    datadir: Path
    rundir: Path  # outside the mount: the socket and the server log
    port: int
    user: pwd.struct_passwd

    @property
    def conninfo(self) -> str:
        return f"host={self.rundir} port={self.port} user={USER} dbname=postgres"

    @property
    def log(self) -> Path:
        return self.rundir / "server.log"

    def client_args(self) -> list[str]:
        """Connection options for the PostgreSQL command-line clients."""
        return ["-h", str(self.rundir), "-p", str(self.port), "-U", USER]

    def as_user(self) -> dict[str, Any]:
        """Popen arguments that run a command as the server's user."""
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [],
                "cwd": "/", "env": {"PATH": f"{PG_BIN}:/usr/bin:/bin", "LC_ALL": "C"}}

    def initdb(self) -> None:
        """A fresh cluster with page checksums, trusting local connections."""
        for path in (self.datadir, self.rundir):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        proc = subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", USER,
                               "--auth=trust", "--data-checksums", "-E", "UTF8",
                               "--locale=C"], capture_output=True, text=True,
                              **self.as_user())
        if proc.returncode != 0:
            raise Failure(f"initdb failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        """Start the server (crash recovery, if due, happens here); stopped at the end
        of the block unless it was crashed in it."""
        argv = [str(PG_BIN / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
                "-k", str(self.rundir), "-c", "listen_addresses=127.0.0.1",
                "-c", "logging_collector=off",
                # Dynamic shared memory in the data directory (on the mount), not in
                # /dev/shm, where a SIGKILLed server would leave its segments behind.
                "-c", "dynamic_shared_memory_type=mmap"]
        log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log, \
                started("postgres", argv, session=True, stdout=log, stderr=log,
                        **self.as_user()) as child:
            server = Server(self, child, self._wait_ready(child))
            server.recovered = CRASH_RECOVERY in self.log.read_text()[log_start:]
            yield server

    def _wait_ready(self, child: Child) -> float:
        """Seconds from start until the server accepts connections."""
        t0 = time.perf_counter()
        while True:
            try:
                Connection(self.conninfo).close()
                return time.perf_counter() - t0
            except PgError as e:
                if not child.running():
                    raise Failure(f"postgres exited {child.proc.returncode}: "
                                  f"{self.log_tail()}") from None
                if time.perf_counter() - t0 > READY_TIMEOUT:
                    raise Failure(f"postgres not ready after {READY_TIMEOUT:.0f} s: {e}") from None
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Server:
    """A running postmaster we started, leader of its own process group."""

    cluster: Cluster
    child: Child
    ready_s: float  # from start to accepting connections (crash recovery included)
    recovered: bool = False  # the log says crash recovery ran

    def crash(self) -> None:
        """SIGKILL the postmaster and every backend at once, as the old kernel would."""
        self.child.kill()


def pgbench(cluster: Cluster, *args: str, timeout: float | None = None) -> str:
    """Run pgbench against the cluster; its output, or `Failure`."""
    proc = subprocess.run([str(PG_BIN / "pgbench"), *cluster.client_args(), *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise Failure(f"pgbench {' '.join(args)} exited {proc.returncode}:\n"
                      f"{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def tps(pgbench_output: str) -> float:
    """The TPS pgbench reports (without connection time)."""
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", pgbench_output)
    if match is None:
        raise Failure(f"no TPS in pgbench output:\n{pgbench_output[-1000:]}")
    return float(match.group(1))
