"""tools/vm-demo with a small guest: after a guestfs kexec the guest goes on with the
next tick, the same boot id, unbroken uptime and the same RAM checksum.

QEMU, the guest kernel and busybox come from tools/setup.sh (tools/test runs it first);
the test is skipped, with set-up's reason, only when set-up recorded that it could not
get them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import setup_status  # noqa: E402
from bounded import bound, run_bounded  # noqa: E402

SETUP_MISSING = setup_status.skip_reason("vm")
pytestmark = [pytest.mark.fuse, pytest.mark.slow,
              pytest.mark.skipif(SETUP_MISSING is not None, reason=str(SETUP_MISSING))]

TOOL = TOOLS / "vm-demo"
BOUND = bound(1200)  # for a runaway run, not a measure: it takes about 15 s here


def _result(stdout: str, mode: str) -> dict:
    """The JSON result on the last line, checked for the figures the lead quotes."""
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["mode"] == mode and result["memory_mib"] == 256
    assert result["guest_continued"] and not result["problems"]
    # The heartbeat resolves the pause: many beats, a period of a few ms, a pause of at
    # least one period (no figure is judged: a 256 MiB guest has no target).
    assert result["beats"] >= 40 and 0 < result["beat_period_ms"] < 50
    assert result["pause_ms"] >= result["beat_period_ms"]
    assert result["target_met"] is None
    assert f"target: VM pause <= {result['target_ms']} ms for a 1 GiB guest ({mode})" in stdout
    return result


def test_vm_continues_across_kexec(cli_env: dict[str, str], machine_dir: Path) -> None:
    proc = run_bounded([str(TOOL), "--memory", "256M"], env=cli_env, timeout=BOUND)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "guest continued: ok" in proc.stdout, proc.stdout
    result = _result(proc.stdout, "restart")
    # The guest's pause spans the host's stop-to-cont (less a beat's period at most).
    assert result["pause_ms"] + result["beat_period_ms"] >= result["host_pause_ms"]["total"]
    assert not list(machine_dir.glob("vmdemo-*")), "the demo left its machine behind"


def test_vm_runs_on_through_a_kexec_that_keeps_the_mount(cli_env: dict[str, str],
                                                         machine_dir: Path) -> None:
    proc = run_bounded([str(TOOL), "--memory", "256M", "--live"], env=cli_env, timeout=BOUND)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "live: VM pause" in proc.stdout and "guest continued: ok" in proc.stdout, \
        proc.stdout
    _result(proc.stdout, "live")
    assert not list(machine_dir.glob("vmdemo-*")), "the demo left its machine behind"
