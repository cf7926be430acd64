"""Run a tool end to end under a generous bound, for the tests that do so.

The bound stops a runaway tool; it does not time it (timings are no test's business).
So it is minutes, sized for a loaded 2-core machine, and doubled on a machine with
fewer cores. On expiry the tool gets SIGTERM, on which every tool here cleans up what
it made (mounts, machines, servers, QEMU), some time to do that, and only then SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any

GRACE = 120.0  # seconds a tool gets to clean up after SIGTERM


class Runaway(AssertionError):
    """The tool did not end within its bound; the message has its last output."""


def bound(seconds: float) -> float:
    """`seconds` (chosen for a loaded 2-core machine), scaled for this machine."""
    return seconds * max(1.0, 2 / (os.cpu_count() or 1))


def run_bounded(argv: Sequence[str], *, timeout: float, **popen: Any
                ) -> subprocess.CompletedProcess[str]:
    """Run `argv` capturing its output as text; `Runaway` if it outlives `timeout`
    (seconds, already scaled with `bound`)."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr, ended = _stop(proc)
        raise Runaway(f"{' '.join(argv)} ran past its bound of {timeout:.0f} s and {ended}\n"
                      f"stdout: …{stdout[-3000:]}\nstderr: …{stderr[-3000:]}") from None
    except BaseException:  # the test run is interrupted: the tool still cleans up
        _stop(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str, str]:
    """SIGTERM `proc` (by its PID), then SIGKILL after GRACE: its output, and how it ended."""
    proc.terminate()
    try:
        stdout, stderr = proc.communicate(timeout=GRACE)
        return stdout, stderr, f"ended on SIGTERM (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return stdout, stderr, f"did not end within {GRACE:.0f} s of SIGTERM; killed"
