"""What the figures were measured on: machine, versions, commit, Python start-up."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchlib.proc import CommandError, run

REPO = Path(__file__).resolve().parents[2]
STARTUP_RUNS = 5


def describe() -> dict[str, Any]:
    """Machine, software versions and commit, as a flat dict."""
    return {
        "cpu": _cpu_model(), "nproc": os.cpu_count(), "memory_bytes": _mem_total(),
        "kernel": platform.release(), "python": platform.python_version(),
        "pyfuse3": metadata.version("pyfuse3"), "trio": metadata.version("trio"),
        "libfuse": _first_line(["fusermount3", "-V"]), "fio": _first_line(["fio", "--version"]),
        "tar": _first_line(["tar", "--version"]), "commit": _commit(),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _first_line(argv: list[str]) -> str:
    try:
        done = run(argv, timeout=30, check=False)
    except OSError:
        return "missing"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def _commit() -> str:
    """HEAD, marked when the work tree has changes the figures may reflect."""
    try:
        head = run(["git", "-C", os.fspath(REPO), "rev-parse", "--short=12", "HEAD"],
                   timeout=30).stdout.strip()
        dirty = run(["git", "-C", os.fspath(REPO), "status", "--porcelain"],
                    timeout=30).stdout.strip()
    except (OSError, CommandError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def python_startup_ms(env: dict[str, str]) -> float:
    """Median wall time of a Python that imports the guestfs daemon and exits: the next
    image's imports, the least an exec of it costs (the exec phase of ``guestfs kexec
    --exec``), against which the in-process switch is judged."""
    samples = []
    for _ in range(STARTUP_RUNS):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import guestfs.cli, guestfs.daemon"],
                       env=env, check=True)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
