"""The shell part: metadata-heavy shell work on guestfs against kernel tmpfs (issue 14).

A real tree (``/usr/share/doc``; the tiny profile makes a small one) is worked on with
the commands people run on trees, one system after the other, each step timed on its
own in seconds (lower is better):

    cp -a SRC cp          tar xf SRC.tar (made once, on /dev/shm)    rsync -a SRC/ rsync/
    find cp               du -s cp                                     diff -r SRC cp
    git gc  (of a repository of the tree, committed untimed first)     rm -rf (all of it)

"whole script" is the sum of the timed steps. The targets are guestfs within 5 × tmpfs
for every command and 3 × for the whole script. A command the machine lacks (rsync is
not always installed) is reported missing, with the reason, and left out of the sum on
every system.

The pyfuse3 ceiling runs the steps that write and walk the tree, to show the floor
that the FUSE round trips alone set for the same requests (no pyfuse3 filesystem with
guestfs's cache settings gets nearer to tmpfs). It keeps no data, so the steps that read
contents (diff -r, git gc) and the whole script are not measured on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchlib import analysis
from benchlib.cleanup import quietly
from benchlib.log import say
from benchlib.model import MISSING, Table
from benchlib.proc import run
from benchlib.profiles import Profile
from benchlib.units import MiB
from benchlib.systems import Mounted
from benchlib.targets import TargetResult

UNIT = "s"
WHOLE = "whole script"
SYSTEMS = ("tmpfs", "ceiling", "guestfs")
#: Steps that read back what was written: not on the ceiling, which keeps no data.
READS_DATA = ("diff -r", "git gc")
NO_DATA = f"{MISSING}: the ceiling keeps no data to read back"
REAL_TREE = Path("/usr/share/doc")
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "gc.auto=0"]
TITLES = {"cp -a": "cp -a of the tree", "tar x": "tar x of the tree", "rsync -a": "rsync -a",
          "find": "find", "du": "du -s", "diff -r": "diff -r against the source",
          "git gc": "git gc of a repository of it", "rm -rf": "rm -rf of everything",
          WHOLE: "the whole script"}
NEEDS = {"rsync -a": "rsync", "git gc": "git"}
#: Runs of the script per system, at most (a full run's five would take long).
MAX_RUNS = 3
#: Arena room the script needs on guestfs: three copies of /usr/share/doc (cp, tar,
#: rsync), a git repository of one, and a page at least per small file.
ROOM = 2048 * MiB
#: A bound for a runaway command, not a measure.
STEP_TIMEOUT = 1800.0


def run_shell(profile: Profile, systems: Sequence[Mounted], table: Table) -> None:
    """The script on tmpfs and guestfs, `min(profile.runs, MAX_RUNS)` times each."""
    chosen = [m for m in systems if m.system in SYSTEMS]
    missing = {step: f"{MISSING}: `{tool}` is not installed"
               for step, tool in NEEDS.items() if shutil.which(tool) is None}
    for step, reason in missing.items():
        for m in chosen:
            table.fail(step, m.system, UNIT, reason)
    skipped = {m.system: dict(missing) for m in chosen}
    if "ceiling" in skipped:
        skipped["ceiling"].update((step, NO_DATA) for step in READS_DATA if step not in missing)
        for step in (*READS_DATA, WHOLE):
            table.fail(step, "ceiling", UNIT, NO_DATA)
    with tempfile.TemporaryDirectory(prefix="gb-shell-", dir="/dev/shm") as scratch:
        source = _source(profile, Path(scratch))
        archive = Path(scratch) / "tree.tar"
        _sh("tar", "cf", archive, "-C", source, ".")
        for n in range(min(profile.runs, MAX_RUNS)):
            for m in chosen:
                skip = skipped[m.system]
                times = _script(source, archive, Path(m.path) / f"shell{n}", skip)
                for step, seconds in times.items():
                    table.add(step, m.system, UNIT, seconds)
                if not set(skip) - set(missing):
                    table.add(WHOLE, m.system, UNIT, sum(times.values()))
                say(f"run {n + 1} {m.system:8} shell: " +
                    ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))


def shell_targets(table: Table) -> list[TargetResult]:
    """Each command within 5 × tmpfs, the whole script within 3 ×."""
    return [_at_most(table, step, 3.0 if step == WHOLE else 5.0) for step in TITLES]


def ceiling_note(table: Table) -> str:
    """What the ceiling alone takes against tmpfs, step by step: the floor under
    guestfs's own figures for the same requests ("" if it was not measured)."""
    ratios = [(step, analysis.ratio(table, step, "ceiling", "tmpfs")) for step in TITLES]
    measured = [f"{step} {value:.1f} ×" for step, value in ratios if value is not None]
    if not measured:
        return ""
    return ("The pyfuse3 ceiling alone, with the same requests and nothing stored, takes "
            f"{', '.join(measured)} tmpfs's time: the floor, on this machine, of any "
            "pyfuse3 filesystem with these cache settings.")


def _at_most(table: Table, step: str, times: float) -> TargetResult:
    value = analysis.ratio(table, step, "guestfs", "tmpfs")
    name = f"shell {step}: guestfs ≤ {times:g} × tmpfs (time)"
    if value is None:
        return TargetResult(name, "n/a", None)
    return TargetResult(name, f"{value:.2f} ×", value <= times)


def _source(profile: Profile, scratch: Path) -> Path:
    """The tree to work on: the real one, or a small made one for the tiny profile."""
    if profile.name != "tiny" and REAL_TREE.is_dir():
        return REAL_TREE
    tree = scratch / "tree"
    for d in range(3):
        sub = tree / f"pkg{d}"
        sub.mkdir(parents=True)
        for i in range(10):
            (sub / f"file{i}.txt").write_text(f"package {d}, file {i}\n" * (i + 1))
        (sub / "latest").symlink_to("file9.txt")
    return tree


def _script(source: Path, archive: Path, base: Path,
            missing: dict[str, str]) -> dict[str, float]:
    """Seconds of each step in folder `base` (made, then removed by the last step)."""
    base.mkdir()
    copy, untar, mirror = base / "cp", base / "tar", base / "rsync"
    steps: list[tuple[str, Callable[[], None]]] = [
        ("cp -a", lambda: _sh("cp", "-a", source, copy)),
        ("tar x", lambda: (untar.mkdir(), _sh("tar", "xf", archive, "-C", untar))),
        ("rsync -a", lambda: _sh("rsync", "-a", f"{source}/", f"{mirror}/")),
        ("find", lambda: _sh("find", copy)),
        ("du", lambda: _sh("du", "-s", copy)),
        ("diff -r", lambda: _sh("diff", "-r", "--no-dereference", source, copy)),
        ("git gc", lambda: _sh(*GIT, "-C", untar, "gc", "--quiet")),
        ("rm -rf", lambda: _sh("rm", "-rf", base)),
    ]
    times: dict[str, float] = {}
    try:
        for step, action in steps:
            if step in missing:
                continue
            if step == "git gc":
                _commit(untar)
            t0 = time.perf_counter()
            action()
            times[step] = time.perf_counter() - t0
    finally:
        if base.exists():
            quietly(shutil.rmtree, base)()
    return times


def _commit(folder: Path) -> None:
    """Make `folder` a repository with one commit of everything (not timed)."""
    _sh(*GIT, "-C", folder, "init", "--quiet")
    _sh(*GIT, "-C", folder, "add", "--all")
    _sh(*GIT, "-C", folder, "commit", "--quiet", "--message", "tree")


def _sh(*argv: object) -> None:
    """Run one command of the script (CommandError, with its stderr, if it fails)."""
    run([os.fspath(a) if isinstance(a, Path) else str(a) for a in argv], timeout=STEP_TIMEOUT)
