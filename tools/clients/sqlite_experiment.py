"""The SQLite experiment of tools/db-experiment.

Each round: one writer per journal mode commits numbered transactions on the mount; at
a random moment all writers are SIGKILLed at once (the old kernel ending every
process), ``guestfs kexec --poison`` runs, and each database is reopened and checked:
``PRAGMA integrity_check`` is ``ok``, every payload matches its CRC, the totals row
matches the rows, ids run 1..max without a gap, and every acknowledged id is there.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import tempfile
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from clients.acklog import read_acks
from clients.guestmount import GuestMount, guest_mount
from clients.procs import check_running, client
from clients.report import progress, table, verdict

MIN_RUN = 0.3  # seconds the writers run at least before the kill


@dataclass(frozen=True)
class Settings:
    """The command line of ``db-experiment sqlite``."""

    rounds: int
    modes: tuple[str, ...]
    max_run: float  # the kill comes at a random moment in [MIN_RUN, max_run] s
    seed: int
    memory: str


@dataclass
class DbCheck:
    """What reopening one database after a kexec found."""

    integrity: str
    rows: int
    max_id: int
    bad_crc: int
    totals_match: bool
    missing: list[int]  # acknowledged ids not in the database

    def problems(self) -> list[str]:
        """Everything wrong besides lost commits (those are `missing`)."""
        found = []
        if self.integrity != "ok":
            found.append(f"integrity_check: {self.integrity}")
        if self.bad_crc:
            found.append(f"{self.bad_crc} payloads do not match their CRC")
        if not self.totals_match:
            found.append("the totals row does not match the rows")
        if self.rows != self.max_id:
            found.append(f"{self.max_id - self.rows} ids missing below {self.max_id}")
        return found


@dataclass
class Row:
    """One line of the result table: one database after one round."""

    round: int
    mode: str
    commits: int  # acknowledged in this round
    check: DbCheck
    blackout_ms: float


@dataclass(frozen=True)
class Database:
    """One writer's database on the mount and its acknowledgement log outside it."""

    mode: str
    path: Path
    acks: Path


def check_db(path: Path, acked: list[int]) -> DbCheck:
    """Reopen `path` (SQLite recovers its journal or WAL here) and check it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        integrity = "; ".join(r[0] for r in db.execute("PRAGMA integrity_check"))
        ids = {r[0] for r in db.execute("SELECT id FROM ledger")}
        bad_crc = sum(zlib.crc32(payload) != crc
                      for crc, payload in db.execute("SELECT crc, payload FROM ledger"))
        totals = db.execute("SELECT rows, bytes FROM totals").fetchone()
        actual = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM ledger"
                            ).fetchone()
    finally:
        db.close()
    return DbCheck(integrity, len(ids), max(ids, default=0), bad_crc,
                   tuple(totals) == tuple(actual), [i for i in acked if i not in ids])


def write_until_killed(dbs: list[Database], run_s: float) -> None:
    """Run one writer per database for `run_s` seconds, then SIGKILL them all at once."""
    with ExitStack() as stack:
        writers = [stack.enter_context(client(f"sqlite writer ({d.mode})", "sqlite_writer",
                                              str(d.path), str(d.acks), "--mode", d.mode))
                   for d in dbs]
        time.sleep(run_s)
        check_running(*writers)
        for w in writers:
            w.signal(signal.SIGKILL)
        for w in writers:
            w.kill()


def run_round(number: int, gm: GuestMount, dbs: list[Database], run_s: float) -> list[Row]:
    """One round: write, kill, kexec, check every database."""
    before = {d.mode: len(read_acks(d.acks)) for d in dbs}
    write_until_killed(dbs, run_s)
    kexec = gm.kexec(poison=True)
    progress(f"round {number}: kexec blackout {kexec.blackout_ms:.1f} ms "
             f"({kexec.largest_phases()})")
    rows = []
    for d in dbs:
        acked = read_acks(d.acks)
        rows.append(Row(number, d.mode, len(acked) - before[d.mode], check_db(d.path, acked),
                        kexec.blackout_ms))
    return rows


def format_rows(rows: list[Row]) -> str:
    """The result table, one line per database and round."""
    return table(["round", "mode", "commits", "rows", "lost", "check", "blackout ms"],
                 [(r.round, r.mode, r.commits, r.check.rows, len(r.check.missing),
                   "ok" if not r.check.problems() else "FAIL", f"{r.blackout_ms:.1f}")
                  for r in rows])


def run(settings: Settings) -> int:
    """The whole experiment; prints the table and returns the exit code."""
    rng = random.Random(settings.seed)
    progress(f"{settings.rounds} rounds, modes {', '.join(settings.modes)}, "
             f"seed {settings.seed}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dbexp-acks-") as ackdir, \
            guest_mount("dbexp", settings.memory) as gm:
        dbs = [Database(m, gm / f"{m}.db", Path(ackdir) / f"{m}.acks") for m in settings.modes]
        for n in range(1, settings.rounds + 1):
            run_s = rng.uniform(MIN_RUN, settings.max_run)
            progress(f"round {n}: writing for {run_s:.2f} s, then SIGKILL and kexec")
            rows += run_round(n, gm, dbs, run_s)
    return report(rows)


def report(rows: list[Row]) -> int:
    """Print the table and the summary; 0 when nothing was lost or wrong."""
    print(format_rows(rows))
    problems = [f"round {r.round} {r.mode}: {p}" for r in rows for p in r.check.problems()]
    lost = sum(len(r.check.missing) for r in rows)
    rounds = len({r.round for r in rows})
    blackouts = sorted({(r.round, r.blackout_ms) for r in rows})
    mean = sum(b for _, b in blackouts) / max(len(blackouts), 1)
    print(f"sqlite: {rounds} rounds, {sum(r.commits for r in rows)} transactions, "
          f"lost {lost}, mismatches {len(problems)}, mean blackout {mean:.1f} ms")
    return verdict(problems, {f"round {r.round} {r.mode}": r.check.missing for r in rows})
