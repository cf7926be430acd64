"""Kexec blackout of trees of every shape, against the copy-to-disk baseline.

For each tree of the profile: build it on a machine of its own (`benchlib.trees`),
mount it with ``guestfs mount`` (which restores it), check that every inode came back,
run ``guestfs kexec --json`` several times (the next kernel boots in the daemon's
process and keeps the mount), stat every file and read the daemon's memory, on the
"exec" tree also ``guestfs kexec --exec`` (the old path: unmount, exec of a fresh next
image, mount again) for comparison, SIGKILL the daemon and time the next ``guestfs
mount``'s recovery, unmount and destroy the machine. Then the same files, written to kernel tmpfs, go through the tar
round trip of `benchlib.baseline` (once per distinct set of files: the guestfs page
layout does not change what tar copies).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib.baseline import RoundTrip, round_trip
from benchlib.cleanup import quietly, undo_stack
from benchlib.guestfs_cli import GuestfsCli
from benchlib.log import say
from benchlib.model import Series
from benchlib.proc import CommandError, kill_and_wait, memory_of
from benchlib.profiles import Profile
from benchlib.systems import Guestfs
from benchlib.trees import TreeSpec

DISK_DIR = Path("/var/tmp")


@dataclass
class TreeResult:
    """Everything measured on one tree."""

    spec: TreeSpec
    roles: list[str]
    layout: dict[str, Any] = field(default_factory=dict)   # from the builder
    blackout: Series = field(default_factory=lambda: Series("ms"))
    phases: dict[str, list[float]] = field(default_factory=dict)
    #: Default kexecs that did not boot in the daemon's process (an ``unmount`` phase
    #: shows the exec path: the code on disk changed, or the in-process boot failed).
    exec_fallbacks: int = 0
    #: ``guestfs kexec --exec`` on the "exec" tree: the old path, for comparison.
    exec_blackout: Series = field(default_factory=lambda: Series("ms"))
    exec_phases: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)  # of the daemon after the kexecs
    #: After a SIGKILL of the daemon: the next kernel's boot and restore (in process),
    #: and the whole ``guestfs mount`` command (Python start-up and the FUSE mount too).
    recovery: Series = field(default_factory=lambda: Series("ms"))
    recovery_mount: Series = field(default_factory=lambda: Series("ms"))
    baseline: Series = field(default_factory=lambda: Series("ms"))
    baseline_runs: list[RoundTrip] = field(default_factory=list)

    def core_blackout(self) -> Series:
        """The blackout of each kexec without its exec and poison phases (the switch to
        the next kernel, and a debugging aid): what the handover costs."""
        out = Series("ms")
        for i, total in enumerate(self.blackout.samples):
            out.samples.append(total - sum(self.phases.get(p, [0.0] * (i + 1))[i]
                                           for p in ("exec", "poison")))
        return out

    def phase_medians(self) -> dict[str, float]:
        """Median milliseconds of each blackout phase."""
        return {name: statistics.median(values) for name, values in self.phases.items()}

    def exec_phase_medians(self) -> dict[str, float]:
        """Median milliseconds of each phase of the ``--exec`` kexecs."""
        return {name: statistics.median(values) for name, values in self.exec_phases.items()}

    def to_json(self) -> dict[str, Any]:
        return {"label": self.spec.label, "files": self.spec.files,
                "file_size": self.spec.file_size, "bytes": self.spec.bytes,
                "inodes": self.spec.inodes, "layout": self.spec.layout.value,
                "fragmented": self.spec.fragmented, "roles": sorted(self.roles),
                "arena_layout": self.layout, "blackout": self.blackout.to_json(),
                "phases_median_ms": self.phase_medians(), "phases_ms": self.phases,
                "exec_fallbacks": self.exec_fallbacks,
                "exec_path": {"blackout": self.exec_blackout.to_json(),
                              "phases_median_ms": self.exec_phase_medians(),
                              "phases_ms": self.exec_phases},
                "daemon_memory": self.memory, "baseline": self.baseline.to_json(),
                "core_blackout": self.core_blackout().to_json(),
                "recovery": self.recovery.to_json(),
                "recovery_mount": self.recovery_mount.to_json(),
                "baseline_runs": [{"save_ms": r.save_ms, "restore_ms": r.restore_ms}
                                  for r in self.baseline_runs]}


def run_kexec_suite(profile: Profile, cli: GuestfsCli, workdir: Path,
                    results: list[TreeResult], errors: list[str]) -> None:
    """Measure every tree of `profile`, smallest first, into `results`; a tree that
    fails is noted in `errors` and the others go on."""
    trees = sorted(profile.trees().items(), key=lambda item: (item[0].bytes, item[0].files))
    baselines: dict[tuple[int, int], TreeResult] = {}
    for index, (spec, roles) in enumerate(trees):
        result = TreeResult(spec, sorted(roles))
        say(f"kexec tree {index + 1}/{len(trees)}: {spec.label}")
        try:
            _measure_guestfs(profile, cli, workdir, f"k{index}", result)
            done = baselines.setdefault(spec.baseline_key, result)
            if done is result:
                _measure_baseline(profile, cli, result)
            else:
                result.baseline, result.baseline_runs = done.baseline, done.baseline_runs
        except Exception as e:  # one tree's failure must not lose the others' figures
            errors.append(f"kexec tree {spec.label}: {e}")
            say(f"  failed: {e}")
        results.append(result)


def _measure_guestfs(profile: Profile, cli: GuestfsCli, workdir: Path, machine: str,
                     result: TreeResult) -> None:
    spec = result.spec
    with undo_stack() as stack:
        system = Guestfs(cli, machine)
        system.claim_machine(stack)
        result.layout = json.loads(cli.python("-m", "benchlib.trees", "guestfs", machine,
                                              spec.to_json()))
        say(f"  built in {result.layout['build_s']:.1f} s: {result.layout}")
        mounted = system.mount(stack, workdir)
        _check_restored(cli, mounted.path, spec)
        for run in range(profile.kexec_runs):
            out = cli.kexec(mounted.path)
            result.blackout.samples.append(out["blackout_ms"])
            for name, ms in out["phases"].items():
                result.phases.setdefault(name, []).append(ms)
            if "unmount" in out["phases"]:
                result.exec_fallbacks += 1
            say(f"  kexec {run + 1}/{profile.kexec_runs}: blackout {out['blackout_ms']:.1f} ms "
                f"(generation {out['generation']}"
                f"{'' if 'unmount' not in out['phases'] else ', exec path'})")
        _stat_every_file(mounted.path, spec)
        result.memory = memory_of(mounted.pid) if mounted.pid else {}
        if "exec" in result.roles:
            _measure_exec_path(profile, cli, mounted.path, result)
        _measure_recovery(cli, system, mounted.path, mounted.pid, result)


def _measure_exec_path(profile: Profile, cli: GuestfsCli, mountpoint: Path,
                       result: TreeResult) -> None:
    """``guestfs kexec --exec``: unmount, exec a fresh next image (its Python start-up
    and imports), mount again; what the in-process switch saves. After the memory
    figures, which a fresh process would change."""
    for run in range(profile.exec_runs):
        out = cli.kexec(mountpoint, "--exec")
        result.exec_blackout.samples.append(out["blackout_ms"])
        for name, ms in out["phases"].items():
            result.exec_phases.setdefault(name, []).append(ms)
        say(f"  kexec --exec {run + 1}/{profile.exec_runs}: blackout "
            f"{out['blackout_ms']:.1f} ms, of which exec {out['phases'].get('exec', 0):.1f} ms")
    _check_restored(cli, mountpoint, result.spec)


def _stat_every_file(mountpoint: Path, spec: TreeSpec) -> None:
    """Look up and stat every file (the daemon's inode cache fills as it would in use),
    and check that all of them are there."""
    seen = 0
    for top, dirs, files in os.walk(mountpoint):
        for name in dirs + files:
            os.lstat(os.path.join(top, name))
            seen += 1
    if seen + 1 != spec.inodes:
        raise CommandError(f"{mountpoint}: a walk finds {seen + 1} inodes, the tree has "
                           f"{spec.inodes}")


def _measure_recovery(cli: GuestfsCli, system: Guestfs, mountpoint: Path, pid: int,
                      result: TreeResult) -> None:
    """SIGKILL the daemon, mount again (which clears the dead mount and recovers), and
    record the new kernel's boot and restore, and the mount command's wall time."""
    kill_and_wait(pid)                  # the daemon of this tree's machine, by its PID
    started = time.monotonic()
    status = system.recover(mountpoint)
    result.recovery_mount.samples.append((time.monotonic() - started) * 1000)
    ns = status["boot_timings_ns"].get("total", 0) + status["restore_ns"]
    result.recovery.samples.append(ns / 1e6)
    _check_restored(cli, mountpoint, result.spec)
    say(f"  after SIGKILL: boot and restore {ns / 1e6:.1f} ms, guestfs mount "
        f"{result.recovery_mount.samples[-1]:.0f} ms")


def _check_restored(cli: GuestfsCli, mountpoint: Path, spec: TreeSpec) -> None:
    """A mount that did not restore the tree would make every figure meaningless."""
    used = cli.status(mountpoint)["inodes"]["used"]
    if used != spec.inodes:
        raise CommandError(f"{mountpoint}: {used} inodes after mount, the tree has "
                           f"{spec.inodes}")


def _measure_baseline(profile: Profile, cli: GuestfsCli, result: TreeResult) -> None:
    with undo_stack() as stack:
        tree = _temp_dir(stack, "gb-tree-", Path("/dev/shm"))
        disk = _temp_dir(stack, "guestfs-bench-", DISK_DIR)
        cli.python("-m", "benchlib.trees", "dir", str(tree), result.spec.to_json())
        for run in range(profile.baseline_runs):
            trip = round_trip(tree, disk)
            result.baseline_runs.append(trip)
            result.baseline.samples.append(trip.total_ms)
            say(f"  copy-to-disk {run + 1}/{profile.baseline_runs}: save {trip.save_ms:.0f} ms"
                f" + restore {trip.restore_ms:.0f} ms")


def _temp_dir(stack: ExitStack, prefix: str, parent: Path) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    stack.callback(quietly(shutil.rmtree, path))
    return path
