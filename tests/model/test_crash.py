"""Crash consistency: the filesystem process SIGKILLed at random instants (mid-operation,
mid-transaction, during a kexec or an unmount's handover, while booting and recovering),
and every acknowledged operation found by the next boot, on a tree that passes the full
check and holds nothing else (tests/helpers/crash.py). 4 × 60 cases here (a quarter in a
quick run); `tools/crash-stress` runs as many as asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest_machine import QUICK, machine_env, unique_name  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from crash import CrashRun  # noqa: E402

CASES = 15 if QUICK else 60


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_random_instants_loses_nothing_acknowledged(seed: int,
                                                               machine_env: Path) -> None:
    run = CrashRun(unique_name("crash"), seed)
    outcomes = [run.case() for _ in range(CASES)]
    run.case()                          # the last kill's recovery is checked too
    assert sum(o.acked for o in outcomes) > CASES, "too few operations were acknowledged"
    assert any(o.unacked for o in outcomes), "no kill landed before the batch ended"
