"""``tools/bench``: measure guestfs against kernel tmpfs, the pyfuse3 ceiling, pyfuse3's
example and a copy-to-disk baseline, all in one run.

Writes bench.json, bench.md and PNG plots into ``results/<UTC timestamp>/`` (or
``--output``), progress on stderr; prints the results folder on stdout. Everything it
mounts, starts or creates is undone on the way out, also on Ctrl-C or SIGTERM. Exit
status: 0 all measured, 1 some part failed (see the report's Errors), 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from benchlib import report, shell
from benchlib.cleanup import quietly, signals_interrupt, undo_stack
from benchlib.datapath import run_datapath, workloads
from benchlib.example import ExampleUnavailable, extract_example
from benchlib.guestfs_cli import GuestfsCli
from benchlib.host import REPO, describe, python_startup_ms
from benchlib.kexec import run_kexec_suite
from benchlib.log import say
from benchlib.metadata import PHASES, UNIT, run_metadata
from benchlib.model import MISSING
from benchlib.poison import run_poison_probe
from benchlib.proc import remove_tree_unless_mounted
from benchlib.profiles import FULL, QUICK, TINY, Profile
from benchlib.results import Results
from benchlib.shell import run_shell
from benchlib.systems import Caps, Guestfs, Mounted, PyfuseScript, System, Tmpfs, ceiling
from benchlib.units import MiB

SUITES = ("datapath", "metadata", "shell", "kexec", "poison")
TOOLS_NEEDED = ("fio", "fusermount3", "tar", "ls")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a run of a few minutes: smaller files, trees up to 16 Ki inodes "
                           "and 256 MiB (plus the 10 Ki files / 1 GiB target tree)")
    size.add_argument("--tiny", action="store_true",
                      help="the smallest sizes, to check the harness itself (the test suite "
                           "runs this); its figures mean nothing")
    parser.add_argument("--only", choices=SUITES, action="append", metavar="PART",
                        help=f"run only this part (repeatable): {', '.join(SUITES)}")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="results folder (default: results/<UTC timestamp>/ in the repository)")
    return parser.parse_args(argv)


def _profile(args: argparse.Namespace) -> Profile:
    return TINY if args.tiny else QUICK if args.quick else FULL


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "the benchmark mounts FUSE filesystems and needs root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    missing = [tool for tool in TOOLS_NEEDED if shutil.which(tool) is None]
    return f"missing commands: {', '.join(missing)} (tools/setup.sh installs them)" if missing \
        else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status."""
    args = parse_args(argv)
    problem = _missing_prerequisite()
    if problem:
        say(problem)
        return 1
    profile = _profile(args)
    started = datetime.datetime.now(datetime.UTC)
    outdir = args.output or REPO / "results" / started.strftime("%Y%m%dT%H%M%SZ")
    outdir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["tools/bench", *(argv if argv is not None else sys.argv[1:])])
    results = Results(profile, command, started.isoformat(timespec="seconds"), describe())
    say(f"{profile.name} run; results go to {outdir}")
    t0 = time.monotonic()
    status = 0
    try:
        with signals_interrupt(), undo_stack() as stack:
            _run(args.only or SUITES, results, stack, outdir)
    except KeyboardInterrupt as e:
        say(f"interrupted ({e or 'SIGINT'}); everything made has been cleaned up")
        results.errors.append("interrupted: the figures are incomplete")
        status = 130
    except Exception as e:  # still write what was measured, and say what went wrong
        say(f"failed:\n{traceback.format_exc()}")
        results.errors.append(f"bench: {e}")
    results.duration_s = time.monotonic() - t0
    _write(results, outdir)
    print(outdir)
    return status or (1 if results.errors else 0)


def _run(suites: Sequence[str], results: Results, stack: ExitStack, outdir: Path) -> None:
    """Every part asked for, each guarded so that the others still run if one fails."""
    profile = results.profile
    machine_dir = Path(tempfile.mkdtemp(prefix="gb-", dir="/dev/shm"))  # short: sockets
    stack.callback(quietly(shutil.rmtree, machine_dir))
    workdir = Path(tempfile.mkdtemp(prefix="guestfs-bench-"))
    stack.callback(quietly(remove_tree_unless_mounted, workdir))
    cli = GuestfsCli(machine_dir)
    results.python_startup_ms = python_startup_ms(cli.env)
    if {"datapath", "metadata", "shell"} & set(suites):
        _guarded(results, "mounting the systems",
                 lambda: _compare_systems(suites, results, cli, workdir, outdir))
    if "kexec" in suites:
        if cli.has_kexec():
            run_kexec_suite(profile, cli, workdir, results.trees, results.errors)
        else:
            results.errors.append("kexec: this guestfs has no `guestfs kexec` command yet")
    if "poison" in suites:
        say(f"poison against dd, {profile.poison_bytes // MiB} MiB arena")
        _guarded(results, "poison", lambda: run_poison_probe(profile, cli, workdir,
                                                              results.poison))


def _compare_systems(suites: Sequence[str], results: Results, cli: GuestfsCli, workdir: Path,
                     outdir: Path) -> None:
    """The data-path, metadata and shell parts, on all systems mounted side by side."""
    profile = results.profile
    with undo_stack() as mounts:
        mounted = _mount_systems(mounts, profile, cli, workdir, outdir, results)
        if "datapath" in suites:
            _guarded(results, "data path", lambda: run_datapath(profile, mounted, results.datapath))
        if "metadata" in suites:
            _guarded(results, "metadata", lambda: run_metadata(profile, mounted, results.metadata))
        if "shell" in suites:
            _guarded(results, "shell", lambda: run_shell(profile, mounted, results.shell))


def _guarded(results: Results, part: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as e:  # noted in the report; the other parts still run
        say(f"{part} failed:\n{traceback.format_exc()}")
        results.errors.append(f"{part}: {e}")


def _mount_systems(stack: ExitStack, profile: Profile, cli: GuestfsCli, workdir: Path,
                   outdir: Path, results: Results) -> list[Mounted]:
    """Mount every system the data path and metadata parts compare, in report order."""
    logs = outdir / "logs"
    logs.mkdir(exist_ok=True)
    guestfs = Guestfs(cli, "data",
                      memory=profile.seq_size + profile.rand_size + 512 * MiB + shell.ROOM)
    guestfs.claim_machine(stack)
    systems: list[System] = [Tmpfs(), ceiling(logs)]
    try:
        systems.append(PyfuseScript("example", "pyfuse3 tmpfs example", extract_example(workdir),
                                    logs, Caps(profile.example_file_size,
                                               profile.example_meta_files)))
    except ExampleUnavailable as e:  # a missing peer: the report says why; no error
        say(f"pyfuse3 tmpfs example missing: {e}")
        _mark_unavailable(results, profile, "example",
                          f"{MISSING}: pyfuse3 tmpfs example: {e}")
    systems.append(guestfs)
    mounted = []
    for system in systems:
        say(f"mounting {system.title}")
        mounted.append(system.mount(stack, workdir))
    return mounted


def _mark_unavailable(results: Results, profile: Profile, system: str, reason: str) -> None:
    for w in workloads(profile):
        results.datapath.fail(w.key, system, w.job.unit, reason)
    for phase in PHASES:
        results.metadata.fail(phase, system, UNIT, reason)


def _write(results: Results, outdir: Path) -> None:
    """bench.json, the plots, and bench.md (which shows the plots)."""
    (outdir / "bench.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    try:
        from benchlib.plots import write_plots
    except ImportError as e:
        say(f"no plots: {e} (tools/bench installs matplotlib with guestfs[bench])")
        plots = []
    else:
        plots = write_plots(results, outdir)
    (outdir / "bench.md").write_text(report.render(results, [p.name for p in plots]))
    say(f"wrote {outdir}/bench.json, bench.md and {len(plots)} plots")
