"""The benchmark harness, end to end on tiny sizes, so that it cannot rot.

Runs ``python -m benchlib --tiny`` (what ``tools/bench --tiny`` runs, without the set-up
step) with real mounts of every system and real kexecs, and checks that the JSON and
Markdown outputs hold every expected row with numbers in it, and that nothing is left
mounted. The figures themselves are not judged: timings are no test's business.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
TIMEOUT = 170  # seconds; the run takes well under a minute once pyfuse3's sdist is cached

SYSTEMS_ALWAYS_MEASURED = ("tmpfs", "ceiling", "guestfs")
DATAPATH_ROWS = ("seq-write", "seq-read-cold", "seq-read-warm", "seq-write-small", "rand-read-1j",
                 "rand-write-1j", "rand-read-4j", "rand-write-4j")
METADATA_ROWS = ("create", "stat", "ls -l", "rename", "unlink")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """One tiny run: (results folder, its TMPDIR, exit status)."""
    base = tmp_path_factory.mktemp("bench")
    out, tmp = base / "results", base / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": os.fspath(tmp),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.fspath(TOOLS),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "benchlib", "--tiny", "--output", os.fspath(out)],
                          cwd=REPO, env=env, timeout=TIMEOUT, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    return out, tmp, done.returncode


@pytest.mark.fuse
def test_bench_runs_and_cleans_up(bench_run: tuple[Path, Path, int]) -> None:
    out, tmp, status = bench_run
    assert status == 0, "tools/bench --tiny failed; see the captured stderr"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert os.fspath(tmp) not in mounts
    assert not list(tmp.iterdir()), "the work folder was not removed"


@pytest.mark.fuse
def test_bench_json_has_every_figure(bench_run: tuple[Path, Path, int]) -> None:
    out, _, _ = bench_run
    data = json.loads((out / "bench.json").read_text())
    assert data["errors"] == []
    for part, rows in (("datapath", DATAPATH_ROWS), ("metadata", METADATA_ROWS)):
        assert set(data[part]) == set(rows)
        for row in rows:
            for system in SYSTEMS_ALWAYS_MEASURED:
                assert _number(data[part][row][system]["median"]), (part, row, system)
            example = data[part][row]["example"]
            assert "na" in example or _number(example["median"])
    assert len(data["kexec"]) >= 4
    for tree in data["kexec"]:
        assert _number(tree["blackout"]["median"]) and tree["blackout"]["median"] > 0
        assert _number(tree["baseline"]["median"])
        assert tree["phases_median_ms"] and all(map(_number, tree["phases_median_ms"].values()))
        assert tree["daemon_memory"]["RssAnon"] > 0
    assert {"inodes", "bytes", "layout", "fragmentation"} <= {
        role for tree in data["kexec"] for role in tree["roles"]}
    assert len(data["targets"]) >= 15
    assert all(t["met"] in (True, False, None) for t in data["targets"])
    assert data["host"]["nproc"] >= 1 and data["host"]["pyfuse3"]


@pytest.mark.fuse
def test_bench_markdown_has_every_table(bench_run: tuple[Path, Path, int]) -> None:
    out, _, _ = bench_run
    text = (out / "bench.md").read_text()
    for heading in ("## Machine", "## Targets", "## Data path", "## Metadata",
                    "## Kexec blackout against copy-to-disk", "### Blackout phases",
                    "## Daemon memory"):
        assert heading in text
    for title in ("sequential write, 1 MiB", "random write, 4 KiB, O_DIRECT, 4 jobs",
                  "ls -l of the folder", "64 files × 64 KiB, fragmented",
                  "64 files × 64 KiB, 4 KiB pages", "256 files × 512 B"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
        assert any(ch.isdigit() for ch in row.split("|")[3]), row
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("datapath", "metadata", "blackout", "blackout_phases", "memory"):
            assert (out / f"{png}.png").stat().st_size > 1000
            assert f"({png}.png)" in text
