"""Poison against ``dd``: ``guestfs kexec --poison`` against ``dd`` writing as many bytes
into /dev/shm, in the same run.

An empty machine of the profile's size is mounted and kexec'd with ``--poison`` a few
times; the daemon records the ``poison`` phase (the mask of pages neither preserved nor
scratch, and writing 0xAA over them through the arena's file descriptor) and logs how
many pages it wrote. Each poison is paired with ``dd if=/dev/zero bs=1M`` of that many
bytes: the first into a new file, as the first poison of a sparse arena also allocates
its pages, the later ones over the same file again (``conv=notrunc``), as later poisons
overwrite pages already there. dd's own timing (its "copied, S s") is used, so neither
side pays for a process start. A kexec with ``--poison`` boots in the daemon's process
like any other (it poisons between the handover and the switch); each run records
which path it took.
"""

from __future__ import annotations

import os
import re
import statistics
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.cleanup import quietly, undo_stack
from benchlib.guestfs_cli import GuestfsCli
from benchlib.log import say
from benchlib.proc import CommandError, run
from benchlib.profiles import Profile
from benchlib.systems import Guestfs
from benchlib.units import MiB

PAGE_SIZE = 4096
POISONED = re.compile(r"kexec: poisoned (\d+) pages")
DD_TIME = re.compile(r"copied, ([\d.]+) s")
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class PoisonRun:
    """One poisoning kexec and the dd of the same size after it."""

    pages: int              # pages the daemon poisoned
    poison_ms: float        # its ``poison`` phase
    dd_bytes: int           # whole MiB, the nearest to the poisoned bytes
    dd_ms: float
    in_process: bool        # the kexec booted the next kernel in the daemon's process

    @property
    def ratio(self) -> float:
        """Poison time over dd time."""
        return self.poison_ms / self.dd_ms if self.dd_ms else float("inf")


@dataclass
class PoisonResult:
    """The poison probe of one run."""

    arena_bytes: int = 0
    runs: list[PoisonRun] = field(default_factory=list)

    def median_ratio(self) -> float | None:
        """Median of poison over dd across the runs; None if nothing was measured."""
        return statistics.median(r.ratio for r in self.runs) if self.runs else None

    def to_json(self) -> dict[str, Any]:
        return {"arena_bytes": self.arena_bytes, "median_ratio": self.median_ratio(),
                "runs": [{**asdict(r), "ratio": r.ratio} for r in self.runs]}


def run_poison_probe(profile: Profile, cli: GuestfsCli, workdir: Path,
                     result: PoisonResult) -> None:
    """Measure `profile.poison_runs` poisoning kexecs of an empty machine of
    `profile.poison_bytes`, each against dd, into `result`."""
    result.arena_bytes = profile.poison_bytes
    with undo_stack() as stack:
        system = Guestfs(cli, "poison", memory=profile.poison_bytes)
        system.claim_machine(stack)
        mounted = system.mount(stack, workdir)
        target = SHM / f"gb-dd-{uuid.uuid4().hex[:12]}"
        stack.callback(quietly(_remove, target))
        log = cli.machine_dir / f"{system.machine}.log"
        for index in range(profile.poison_runs):
            seen = _poisoned_counts(log)
            out = cli.kexec(mounted.path, "--poison")
            counts = _poisoned_counts(log)
            if len(counts) <= len(seen):
                raise CommandError(f"{log}: no 'poisoned N pages' line after the kexec")
            pages = counts[-1]
            dd_bytes = max(1, round(pages * PAGE_SIZE / MiB)) * MiB
            dd_ms = _dd(target, dd_bytes, fresh=index == 0)
            run_ = PoisonRun(pages, out["phases"]["poison"], dd_bytes, dd_ms,
                             "unmount" not in out["phases"])
            result.runs.append(run_)
            say(f"  poison {index + 1}/{profile.poison_runs}: {pages * PAGE_SIZE / MiB:.0f} MiB "
                f"in {run_.poison_ms:.0f} ms, dd {dd_ms:.0f} ms ({run_.ratio:.2f} ×)")


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _poisoned_counts(log: Path) -> list[int]:
    """Every page count the daemon's log reports poisoned so far."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(m.group(1)) for m in POISONED.finditer(text)]


def _dd(target: Path, nbytes: int, *, fresh: bool) -> float:
    """Milliseconds dd takes to write `nbytes` of zeros to `target` (by its own count)."""
    if fresh:
        _remove(target)
    done = run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={nbytes // MiB}",
                "conv=notrunc,fsync"], timeout=600, env={**os.environ, "LC_ALL": "C"})
    match = DD_TIME.search(done.stderr)
    if match is None:
        raise CommandError(f"dd printed no time: {done.stderr.strip()}")
    return float(match.group(1)) * 1e3
