"""The benchmark harness, end to end on tiny sizes, so that it cannot rot.

Runs ``python -m benchlib --tiny`` (what ``tools/bench --tiny`` runs, without the set-up
step) with real mounts of every system and real kexecs, and checks that the JSON and
Markdown outputs hold every expected row with numbers in it, and that nothing is left
mounted. The figures themselves are not judged: timings are no test's business.

The run downloads nothing: pyfuse3's example peer comes from the sdist tools/setup.sh
put in the cache. Without it the peer is reported missing, with the reason, and the run
still succeeds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
sys.path.insert(0, os.fspath(TOOLS))

import setup_status  # noqa: E402
from benchlib import example, report  # noqa: E402
from benchlib.model import MISSING, Table  # noqa: E402
from bounded import bound, run_bounded  # noqa: E402

# A bound for a runaway run, not a measure: it takes well under a minute here.
BOUND = bound(900)

SYSTEMS_ALWAYS_MEASURED = ("tmpfs", "ceiling", "guestfs")
DATAPATH_ROWS = ("seq-write", "seq-read-cold", "seq-read-warm", "seq-write-small", "rand-read-1j",
                 "rand-write-1j", "rand-read-4j", "rand-write-4j")
METADATA_ROWS = ("create", "stat", "ls -l", "rename", "unlink")
SHELL_ROWS = ("cp -a", "tar x", "rsync -a", "find", "du", "diff -r", "git gc", "rm -rf",
              "whole script")


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
    done = run_bounded([sys.executable, "-m", "benchlib", "--tiny", "--output", os.fspath(out)],
                       cwd=REPO, env=env, timeout=BOUND)
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
    # The example peer is measured whenever set-up got its sdist, else reported missing.
    example_there = example.sdist_path().exists()
    for part, rows in (("datapath", DATAPATH_ROWS), ("metadata", METADATA_ROWS)):
        assert set(data[part]) == set(rows)
        for row in rows:
            for system in SYSTEMS_ALWAYS_MEASURED:
                assert _number(data[part][row][system]["median"]), (part, row, system)
            peer = data[part][row]["example"]
            if example_there:
                assert _number(peer.get("median")), (part, row, peer)
            else:
                assert peer["na"].startswith(MISSING), (part, row, peer)
    assert set(data["shell"]) == set(SHELL_ROWS)
    for row in SHELL_ROWS:               # a command the machine lacks is missing, said why
        for system in ("tmpfs", "ceiling", "guestfs"):
            figure = data["shell"][row][system]
            assert _number(figure.get("median")) or figure["na"].startswith(MISSING), \
                (row, system, figure)
    assert _number(data["shell"]["whole script"]["guestfs"]["median"])
    assert len(data["kexec"]) >= 4
    for tree in data["kexec"]:
        assert _number(tree["blackout"]["median"]) and tree["blackout"]["median"] > 0
        assert _number(tree["baseline"]["median"])
        assert tree["phases_median_ms"] and all(map(_number, tree["phases_median_ms"].values()))
        assert tree["daemon_memory"]["RssAnon"] > 0
    assert {"inodes", "bytes", "layout", "fragmentation", "exec"} <= {
        role for tree in data["kexec"] for role in tree["roles"]}
    for tree in data["kexec"]:     # the old path, on the "exec" tree only
        exec_path = tree["exec_path"]
        if "exec" in tree["roles"]:
            assert _number(exec_path["blackout"]["median"])
            assert {"unmount", "exec"} <= set(exec_path["phases_median_ms"])
        else:
            assert not exec_path["blackout"]["samples"]
    poison = data["poison"]
    assert poison["runs"] and _number(poison["median_ratio"])
    for run in poison["runs"]:
        assert run["pages"] > 0 and run["poison_ms"] > 0 and run["dd_ms"] > 0
    assert len(data["targets"]) >= 15
    assert all(t["met"] in (True, False, None) for t in data["targets"])
    assert data["host"]["nproc"] >= 1 and data["host"]["pyfuse3"]


@pytest.mark.fuse
def test_bench_markdown_has_every_table(bench_run: tuple[Path, Path, int]) -> None:
    out, _, _ = bench_run
    text = (out / "bench.md").read_text()
    for heading in ("## Machine", "## Targets", "## Data path", "## Metadata", "## Shell work",
                    "## Kexec blackout against copy-to-disk", "### Blackout phases",
                    "### The in-process switch against --exec", "## Poison against dd",
                    "## Daemon memory"):
        assert heading in text
    for target in ("exec phase ≤ 0.15 ×", "poison ≤ 1.5 × dd"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {target}"))
        assert "✅ met" in row or "❌ missed" in row, row    # judged, whichever way
    for title in ("sequential write, 1 MiB", "random write, 4 KiB, O_DIRECT, 4 jobs",
                  "ls -l of the folder", "the whole script", "64 files × 64 KiB, fragmented",
                  "64 files × 64 KiB, 4 KiB pages", "256 files × 512 B"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
        assert any(ch.isdigit() for ch in row.split("|")[3]), row
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("datapath", "metadata", "blackout", "blackout_phases", "memory"):
            assert (out / f"{png}.png").stat().st_size > 1000
            assert f"({png}.png)" in text


def test_missing_example_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No sdist in the cache: the peer is unavailable, and the reason names the file, the
    folder and what set-up recorded (nothing is downloaded here)."""
    monkeypatch.setenv(example.CACHE_ENV, os.fspath(tmp_path / "cache"))
    monkeypatch.setattr(setup_status, "STATUS_DIR", tmp_path / "status")
    with pytest.raises(example.ExampleUnavailable, match="tools/setup.sh downloads it"):
        example.extract_example(tmp_path)
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "example.missing").write_text("pip download: no network\n")
    with pytest.raises(example.ExampleUnavailable) as caught:
        example.extract_example(tmp_path)
    text = str(caught.value)
    assert example.sdist_path().name in text and os.fspath(tmp_path / "cache") in text
    assert "set-up could not download it: pip download: no network" in text
    assert not (tmp_path / "cache").exists()


def test_report_marks_missing_peer() -> None:
    """A missing peer reads "missing" in the table, with the reason in a footnote."""
    table = Table()
    table.add("create", "guestfs", "ops/s", 1000.0)
    table.fail("create", "example", "ops/s", f"{MISSING}: pyfuse3 tmpfs example: no sdist")
    lines = report.comparison_table(table, {"create": "create files"})
    row = next(line for line in lines if line.startswith("| create files |"))
    assert "missing [1]" in row
    assert "[1] missing: pyfuse3 tmpfs example: no sdist  " in lines


def test_kho_bench_runs_every_case() -> None:
    """tools/kho-bench through real kexecs: both headline cases and the sweep print."""
    done = run_bounded([sys.executable, os.fspath(TOOLS / "kho-bench"), "--quick"],
                       cwd=REPO, timeout=BOUND)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [r[0] for r in rows if r and r[0].startswith("order-")] == ["order-0", "order-9"]
    sweep = [r for r in rows if len(r) > 2 and r[1] in ("MiB", "GiB") and r[2].isdigit()]
    assert len(sweep) == 3 and all(int(r[2]) > 0 for r in sweep)
