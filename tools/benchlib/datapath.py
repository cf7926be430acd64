"""The data-path workloads (fio) run on every system, interleaved run by run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from benchlib.fio import FioJob, FioOutcome, run_fio
from benchlib.log import say
from benchlib.model import Table
from benchlib.profiles import Profile
from benchlib.systems import Mounted
from benchlib.units import KiB, MiB, size_text

FIO_TIMEOUT = 900.0
WARM_UP = ("seq-write", "seq-read-cold")


@dataclass(frozen=True)
class Workload:
    """A named fio job on a named file of the system under test."""

    key: str
    title: str
    file: str
    job: FioJob
    fresh: bool = False   # remove the file first (a write into a new file)


def workloads(profile: Profile) -> list[Workload]:
    """The data-path workloads, in the order they run (each read follows the write
    that made its file; the warm read follows the cold one that filled the cache)."""
    seq = FioJob("write", MiB, profile.seq_size)
    rand = FioJob("randread", 4 * KiB, profile.rand_size, direct=True,
                  runtime_s=profile.rand_runtime_s)
    return [
        Workload("seq-write", "sequential write, 1 MiB", "seq.dat",
                 replace(seq, end_fsync=True), fresh=True),
        Workload("seq-read-cold", "sequential read, 1 MiB, cold cache", "seq.dat",
                 replace(seq, rw="read")),
        Workload("seq-read-warm", "sequential read, 1 MiB, warm cache", "seq.dat",
                 replace(seq, rw="read", invalidate=False)),
        # The size every system can do, pyfuse3's example included: its ratio is judged here.
        Workload("seq-write-small", f"sequential write, 1 MiB, "
                 f"{size_text(profile.example_file_size)} file", "small.dat",
                 replace(seq, size=profile.example_file_size, end_fsync=True), fresh=True),
        *(Workload(f"rand-{rw}-{jobs}j", f"random {rw}, 4 KiB, O_DIRECT, {jobs} job"
                   + ("s" if jobs > 1 else ""), "rand.dat",
                   replace(rand, rw=f"rand{rw}", numjobs=jobs))
          for jobs in (1, 4) for rw in ("read", "write")),
    ]


def run_datapath(profile: Profile, systems: Sequence[Mounted], table: Table) -> None:
    """Every workload on every system, `profile.runs` times, systems interleaved so that
    a drift of the machine touches all of them alike.

    Each system first writes and reads its sequential file once, unmeasured: the first
    touch of memory the machine has not used since it booted is several times slower (a
    virtual machine's host backs the pages only then), and would otherwise make the
    first run of whichever system comes first an outlier."""
    warm_up = [w for w in workloads(profile) if w.key in WARM_UP]
    for mounted in systems:
        for workload in warm_up:
            _measure(workload, mounted)
    say("warmed up: every system wrote and read its sequential file once")
    for run in range(profile.runs):
        for mounted in systems:
            for workload in workloads(profile):
                _run_one(workload, mounted, table, f"run {run + 1}/{profile.runs}")


def _capped(job: FioJob, mounted: Mounted) -> FioJob:
    cap = mounted.caps.file_size
    return replace(job, size=cap) if cap is not None and job.size > cap else job


def _measure(workload: Workload, mounted: Mounted) -> FioOutcome:
    path = mounted.path / workload.file
    if workload.fresh and path.exists():
        os.unlink(path)
    return run_fio(_capped(workload.job, mounted), path, FIO_TIMEOUT)


def _run_one(workload: Workload, mounted: Mounted, table: Table, when: str) -> None:
    unit = workload.job.unit
    series = table.get(workload.key, mounted.system, unit)
    if series.na is not None:
        return  # failed in an earlier run: it will fail again
    size = _capped(workload.job, mounted).size
    if size < workload.job.size:
        series.note = (f"{mounted.system}: on a {size_text(size)} file, not "
                       f"{size_text(workload.job.size)}: at the full size it would take hours")
    outcome = _measure(workload, mounted)
    if outcome.value is None:
        table.fail(workload.key, mounted.system, unit, f"n/a: {outcome.error}")
        say(f"{when} {mounted.system:8} {workload.key:15} n/a: {outcome.error}")
        return
    table.add(workload.key, mounted.system, unit, outcome.value)
    say(f"{when} {mounted.system:8} {workload.key:15} {outcome.value:10.1f} {unit}")
