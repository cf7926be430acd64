"""The PostgreSQL experiment of tools/db-experiment.

A cluster is made with ``initdb`` on the mount and loaded with ``pgbench -i``; pgbench
runs for a while to measure TPS. Then each round: pgbench load plus a writer that
records every committed id outside the mount; at a random moment the postmaster and all
its backends are SIGKILLed at once (the old kernel ending every process); ``guestfs
kexec --poison``; the server starts again and must complete crash recovery; then
``pg_amcheck`` (heap and B-tree checks of every relation) is clean, the pgbench balances
agree, the ledger ids run 1..max without a gap, and every acknowledged id is there.
Finally pgbench measures TPS again.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from clients.acklog import read_acks
from clients.guestmount import GuestMount, guest_mount
from clients.libpq import Connection
from clients.pg_server import (PG_BIN, Cluster, ensure_installed, ensure_user, free_port,
                               pgbench, tps)
from clients.procs import check_running, client, started
from clients.report import progress, table, verdict

MIN_LOAD = 1.0  # seconds of load at least before the kill
BALANCES = """SELECT (SELECT sum(abalance) FROM pgbench_accounts),
                     (SELECT sum(bbalance) FROM pgbench_branches),
                     (SELECT sum(tbalance) FROM pgbench_tellers),
                     (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"""


@dataclass(frozen=True)
class Settings:
    """The command line of ``db-experiment postgres``."""

    rounds: int
    clients: int
    load: float  # seconds of each TPS measurement, and at most before a kill
    scale: int
    seed: int
    memory: str


@dataclass
class Round:
    """What one kill/kexec/recovery round found."""

    number: int
    commits: int  # acknowledged by the writer in this round
    blackout_ms: float
    recovery_s: float
    recovered: bool  # the server log says crash recovery ran
    missing: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check(cluster: Cluster, acked: list[int]) -> tuple[list[int], list[str]]:
    """(acknowledged ids missing, other problems) of the recovered cluster."""
    problems = []
    amcheck = subprocess.run([str(PG_BIN / "pg_amcheck"), *cluster.client_args(),
                              "--install-missing", "--heapallindexed", "--database=postgres"],
                             capture_output=True, text=True)
    if amcheck.returncode != 0:
        problems.append(f"pg_amcheck: {(amcheck.stdout + amcheck.stderr).strip()[-1500:]}")
    with Connection(cluster.conninfo) as conn:
        balances = set(conn.execute(BALANCES)[0])
        ids = {int(str(r[0])) for r in conn.execute("SELECT id FROM ledger")}
    if len(balances) != 1:
        problems.append(f"pgbench balances disagree: {sorted(map(str, balances))}")
    if len(ids) != max(ids, default=0):
        problems.append(f"{max(ids) - len(ids)} ledger ids missing below {max(ids)}")
    return [i for i in acked if i not in ids], problems


def prepare(cluster: Cluster, settings: Settings) -> float:
    """initdb, pgbench -i, the ledger table; returns the TPS before any crash."""
    progress("initdb on the mount")
    cluster.initdb()
    with cluster.running():
        progress(f"pgbench -i -s {settings.scale}")
        pgbench(cluster, "-i", "-q", "-s", str(settings.scale), "postgres")
        with Connection(cluster.conninfo) as conn:
            conn.execute("CREATE TABLE ledger (id bigint PRIMARY KEY, digest text NOT NULL)")
        return measure_tps(cluster, settings)


def load_args(settings: Settings) -> list[str]:
    """pgbench's TPC-B-like load. -n: no vacuum before, which would also TRUNCATE
    pgbench_history and so break the balance check across runs."""
    return ["-n", "-c", str(settings.clients), "-j", "2", "postgres"]


def measure_tps(cluster: Cluster, settings: Settings) -> float:
    progress(f"pgbench: {settings.clients} clients for {settings.load:.0f} s")
    return tps(pgbench(cluster, *load_args(settings), "-T", str(int(settings.load))))


def crash_under_load(cluster: Cluster, settings: Settings, acks: Path, run_s: float) -> None:
    """pgbench plus the writer; after `run_s` s SIGKILL the server and its backends."""
    bench = [str(PG_BIN / "pgbench"), *cluster.client_args(), *load_args(settings),
             "-T", str(int(run_s) + 600)]  # the crash ends it long before
    with (cluster.running() as server,
          # pgbench's output goes nowhere: its errors at the crash are expected.
          started("pgbench", bench, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as load,
          client("postgres writer", "pg_writer", cluster.conninfo, str(acks)) as writer):
        time.sleep(run_s)
        check_running(load, writer)
        server.crash()


def run_round(number: int, gm: GuestMount, cluster: Cluster, settings: Settings,
              acks: Path, rng: random.Random) -> Round:
    """One round: load, crash, kexec, recover, check."""
    before = len(read_acks(acks))
    run_s = rng.uniform(MIN_LOAD, settings.load)
    progress(f"round {number}: load for {run_s:.2f} s, then SIGKILL of the server and kexec")
    crash_under_load(cluster, settings, acks, run_s)
    kexec = gm.kexec(poison=True)
    progress(f"round {number}: kexec blackout {kexec.blackout_ms:.1f} ms "
             f"({kexec.largest_phases()}); starting postgres")
    acked = read_acks(acks)
    with cluster.running() as server:
        result = Round(number, len(acked) - before, kexec.blackout_ms, server.ready_s,
                       server.recovered)
        result.missing, result.problems = check(cluster, acked)
    if not result.recovered:
        result.problems.append("the server log does not show crash recovery")
    return result


def run(settings: Settings) -> int:
    """The whole experiment; prints the table and returns the exit code."""
    ensure_installed()
    user = ensure_user()
    rng = random.Random(settings.seed)
    progress(f"{settings.rounds} round(s), seed {settings.seed}")
    rundir = Path(tempfile.mkdtemp(prefix="dbexp-pg-"))
    try:
        with guest_mount("pgexp", settings.memory, allow_other=True) as gm:
            cluster = Cluster(gm / "pgdata", rundir, free_port(), user)
            tps_before = prepare(cluster, settings)
            rounds = [run_round(n, gm, cluster, settings, rundir / "acks", rng)
                      for n in range(1, settings.rounds + 1)]
            with cluster.running():
                tps_after = measure_tps(cluster, settings)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return report(rounds, tps_before, tps_after)


def report(rounds: list[Round], tps_before: float, tps_after: float) -> int:
    """Print the table and the summary; 0 when nothing was lost or wrong."""
    print(table(["round", "commits", "lost", "check", "blackout ms", "recovery s"],
                [(r.number, r.commits, len(r.missing), "FAIL" if r.problems else "ok",
                  f"{r.blackout_ms:.1f}", f"{r.recovery_s:.2f}") for r in rounds]))
    lost = sum(len(r.missing) for r in rounds)
    problems = [f"round {r.number}: {p}" for r in rounds for p in r.problems]
    print(f"postgres: {len(rounds)} round(s), {sum(r.commits for r in rounds)} acknowledged "
          f"commits, lost {lost}, mismatches {len(problems)}, "
          f"TPS before {tps_before:.0f}, after {tps_after:.0f}")
    return verdict(problems, {f"round {r.number}": r.missing for r in rounds})
