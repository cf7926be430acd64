"""tools/db-experiment against real mounts: short SQLite (both journal modes, 2 rounds)
and PostgreSQL (1 round) runs must lose nothing and leave nothing behind.

PostgreSQL comes from tools/setup.sh (tools/test runs it first); the PostgreSQL test is
skipped, with set-up's reason, only when set-up recorded that it could not get it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import setup_status  # noqa: E402
from bounded import bound, run_bounded  # noqa: E402

pytestmark = pytest.mark.fuse

TOOL = TOOLS / "db-experiment"
# Bounds for a runaway run, not measures: each takes about a minute here.
SQLITE_BOUND = bound(900)
POSTGRES_BOUND = bound(1200)
POSTGRES_MISSING = setup_status.skip_reason("postgres")


def run_experiment(env: dict[str, str], machine_dir: Path, *args: str,
                   timeout: float) -> str:
    """Run the tool; check it succeeded, lost nothing and cleaned up; return stdout."""
    proc = run_bounded([str(TOOL), *args], env=env, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "lost 0," in proc.stdout and "mismatches 0," in proc.stdout, proc.stdout
    assert not list(machine_dir.glob("*exp-*")), "the experiment left its machine behind"
    with open("/proc/mounts") as f:
        assert "exp-" not in f.read(), "the experiment left its mount behind"
    return proc.stdout


def test_sqlite_both_modes(cli_env: dict[str, str], machine_dir: Path) -> None:
    out = run_experiment(cli_env, machine_dir, "sqlite", "--rounds", "2", "--mode", "both",
                         "--max-run", "1.5", "--memory", "256M", timeout=SQLITE_BOUND)
    assert "sqlite: 2 rounds" in out
    for mode in ("wal", "rollback"):
        assert out.count(f" {mode} ") == 2, out


@pytest.mark.skipif(POSTGRES_MISSING is not None, reason=str(POSTGRES_MISSING))
def test_postgres_one_round(cli_env: dict[str, str], machine_dir: Path) -> None:
    out = run_experiment(cli_env, machine_dir, "postgres", "--rounds", "1", "--load", "3",
                         "--scale", "1", "--memory", "512M", timeout=POSTGRES_BOUND)
    assert "postgres: 1 round(s)" in out
