"""tools/db-experiment against real mounts: short SQLite (both journal modes, 2 rounds)
and PostgreSQL (1 round) runs must lose nothing and leave nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

TOOL = Path(__file__).resolve().parents[1] / "tools" / "db-experiment"


def run_experiment(env: dict[str, str], machine_dir: Path, *args: str,
                   timeout: float) -> str:
    """Run the tool; check it succeeded, lost nothing and cleaned up; return stdout."""
    proc = subprocess.run([str(TOOL), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "lost 0," in proc.stdout and "mismatches 0," in proc.stdout, proc.stdout
    assert not list(machine_dir.glob("*exp-*")), "the experiment left its machine behind"
    with open("/proc/mounts") as f:
        assert "exp-" not in f.read(), "the experiment left its mount behind"
    return proc.stdout


def test_sqlite_both_modes(cli_env: dict[str, str], machine_dir: Path) -> None:
    out = run_experiment(cli_env, machine_dir, "sqlite", "--rounds", "2", "--mode", "both",
                         "--max-run", "1.5", "--memory", "256M", timeout=300)
    assert "sqlite: 2 rounds" in out
    for mode in ("wal", "rollback"):
        assert out.count(f" {mode} ") == 2, out


def test_postgres_one_round(cli_env: dict[str, str], machine_dir: Path) -> None:
    # The first run on a machine may install PostgreSQL from Debian's packages.
    out = run_experiment(cli_env, machine_dir, "postgres", "--rounds", "1", "--load", "3",
                         "--scale", "1", "--memory", "512M", timeout=900)
    assert "postgres: 1 round(s)" in out
