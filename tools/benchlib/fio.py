"""fio jobs: how each data-path workload is run, and what its JSON output says."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from benchlib.proc import last_lines, run

MiB = 1 << 20


@dataclass(frozen=True)
class FioJob:
    """One fio job over one file. Throughput in MiB/s for sequential jobs, IOPS for
    random ones."""

    rw: str                        # write, read, randread, randwrite
    block_size: int
    size: int
    direct: bool = False           # O_DIRECT
    numjobs: int = 1               # processes sharing the one file
    runtime_s: float | None = None  # time-based run of this length
    invalidate: bool = True        # drop the file's page cache first (a cold read)
    end_fsync: bool = False        # a write counts until it is flushed

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def unit(self) -> str:
        return "IOPS" if self.random else "MiB/s"

    def argv(self, filename: Path) -> list[str]:
        """The fio command line."""
        argv = ["fio", "--name=bench", f"--filename={filename}", f"--rw={self.rw}",
                f"--bs={self.block_size}", f"--size={self.size}", "--ioengine=psync",
                f"--direct={int(self.direct)}", f"--numjobs={self.numjobs}",
                "--group_reporting", f"--invalidate={int(self.invalidate)}",
                f"--end_fsync={int(self.end_fsync)}", "--output-format=json"]
        if self.runtime_s is not None:
            argv += ["--time_based", f"--runtime={self.runtime_s}s"]
        return argv


@dataclass(frozen=True)
class FioOutcome:
    """A figure, or the reason there is none."""

    value: float | None
    error: str | None = None


def run_fio(job: FioJob, filename: Path, timeout: float) -> FioOutcome:
    """Run `job` on `filename`; a failure (e.g. O_DIRECT refused) is an outcome too."""
    done = run(job.argv(filename), timeout=timeout, check=False)
    result = _parse(done.stdout)
    if done.returncode != 0 or result is None or result.get("error"):
        reason = last_lines(done.stderr or done.stdout, 2) or f"fio exit {done.returncode}"
        if result is not None and result.get("error"):
            reason = f"{os.strerror(result['error'])}: {reason}"
        return FioOutcome(None, reason)
    side = result["write" if "write" in job.rw else "read"]
    return FioOutcome(side["iops"] if job.random else side["bw_bytes"] / MiB)


def _parse(stdout: str) -> dict | None:
    # fio prints notes before the JSON document when something goes wrong.
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        return json.loads(stdout[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return None
