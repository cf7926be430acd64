"""The targets of issues 4, 5, 12 and 13, checked against one run's figures.

A target is *met* or *missed* only where this run measured exactly what it names (a
``--quick`` run has no 4 GiB tree and no 1 Mi inodes): otherwise it shows the nearest
figure it did measure, marked "not measured".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchlib import analysis
from benchlib.datapath import workloads
from benchlib.kexec import TreeResult
from benchlib.metadata import PHASES
from benchlib.model import Table
from benchlib.poison import PoisonResult
from benchlib.profiles import Profile
from benchlib.units import GiB, KiB, MiB


@dataclass(frozen=True)
class TargetResult:
    """One target, the figure it is judged on, and the verdict (None: not measured)."""

    target: str
    measured: str
    met: bool | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ratio_target(table: Table, workload: str, other: str, at_least: float,
                  label: str) -> TargetResult:
    value = analysis.ratio(table, workload, "guestfs", other)
    name = f"{label}: guestfs ≥ {at_least:g} × {other}"
    if value is None:
        return TargetResult(name, "n/a", None)
    return TargetResult(name, f"{value:.2f} ×", value >= at_least)


def data_targets(profile: Profile, data: Table, meta: Table) -> list[TargetResult]:
    """Throughput, IOPS and metadata ratios."""
    titles = {w.key: w.title for w in workloads(profile)}
    out = [_ratio_target(data, "seq-write", "tmpfs", 0.4, titles["seq-write"]),
           _ratio_target(data, "seq-read-cold", "tmpfs", 0.3, titles["seq-read-cold"]),
           _ratio_target(data, "seq-read-warm", "tmpfs", 0.8, titles["seq-read-warm"])]
    out += [_ratio_target(data, key, "ceiling", 0.7, title)
            for key, title in titles.items() if key.startswith("rand-")]
    out += [_ratio_target(meta, phase, "ceiling", 0.7, f"metadata {phase}") for phase in PHASES]
    out.append(_ratio_target(data, "seq-write-small", "example", 50, titles["seq-write-small"]))
    return out


def _blackout(tree: TreeResult) -> float:
    summary = tree.blackout.summary
    assert summary is not None  # sweeps hold measured trees only
    return summary.median


def _judged(name: str, tree: TreeResult, text: str, ok: bool, exact: bool) -> TargetResult:
    """A verdict on `tree` if it is the tree the target names, else "not measured"."""
    if exact:
        return TargetResult(name, text, ok)
    return TargetResult(name, f"{text} at {tree.spec.label} (target size not measured)", None)


def _speedup_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "kexec ≥ 20 × faster than copy-to-disk, 4 GiB tree"
    found = [t for t in analysis.sweep(trees, "bytes")
             if t.spec.bytes <= 4 * GiB and analysis.speedup(t) is not None]
    if not found:
        return TargetResult(name, "n/a", None)
    tree = found[-1]
    speed = analysis.speedup(tree) or 0.0
    return _judged(name, tree, f"{speed:.1f} ×", speed >= 20, tree.spec.bytes == 4 * GiB)


def _headline_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "blackout ≤ 100 ms at 10 Ki files and 1 GiB"
    found = analysis.sweep(trees, "headline")
    if not found:
        return TargetResult(name, "not measured", None)
    tree = found[0]
    ms = _blackout(tree)
    text = f"{ms:.0f} ms"
    if tree.exec_blackout.summary is not None:
        text += f" (with --exec: {tree.exec_blackout.summary.median:.0f} ms)"
    return TargetResult(name, text, ms <= 100)


def _inode_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "blackout < 2 s at 1 Mi inodes"
    found = analysis.sweep(trees, "inodes")
    if not found:
        return TargetResult(name, "n/a", None)
    tree = found[-1]
    ms = _blackout(tree)
    return _judged(name, tree, f"{ms:.0f} ms", ms < 2000, tree.spec.files >= 1 * MiB)


def _flatness_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "blackout at 8 GiB ≤ 1.2 × at 8 MiB (fixed file count)"
    found = analysis.sweep(trees, "bytes")
    if len(found) < 2:
        return TargetResult(name, "n/a", None)
    small, large = found[0], found[-1]
    value = _blackout(large) / _blackout(small)
    return _judged(name, large, f"{value:.2f} × the {small.spec.label} tree", value <= 1.2,
                   small.spec.bytes == 8 * MiB and large.spec.bytes == 8 * GiB)


def kexec_targets(trees: Sequence[TreeResult]) -> list[TargetResult]:
    """Blackout targets, and the speed-up over the copy-to-disk baseline."""
    return [_speedup_target(trees), _inode_target(trees), _flatness_target(trees)]


def _exec_phase_target(trees: Sequence[TreeResult], imports_ms: float | None) -> TargetResult:
    """The in-process switch against what an exec of the next image costs at least."""
    name = ("exec phase ≤ 0.15 × the next image's imports (Python start-up with the "
            "daemon's imports), every tree")
    measured = [t for t in trees if t.blackout.summary is not None and "exec" in t.phases]
    if not measured or not imports_ms:
        return TargetResult(name, "n/a", None)
    worst = max(measured, key=lambda t: t.phase_medians()["exec"])
    ms = worst.phase_medians()["exec"]
    text = (f"{ms / imports_ms:.2g} × ({ms:.2f} ms at {worst.spec.label}, the largest median "
            f"of {len(measured)} trees; imports {imports_ms:.0f} ms)")
    fallbacks = sum(t.exec_fallbacks for t in measured)
    if fallbacks:
        text += f"; {fallbacks} kexecs took the exec path"
    return TargetResult(name, text, ms <= 0.15 * imports_ms)


def _poison_target(poison: PoisonResult) -> TargetResult:
    name = "poison ≤ 1.5 × dd writing the same size into /dev/shm"
    ratio = poison.median_ratio()
    if ratio is None:
        return TargetResult(name, "n/a", None)
    runs = poison.runs
    text = (f"{ratio:.2f} × (median of {len(runs)}; "
            + "; ".join(f"{r.pages * 4096 / MiB:.0f} MiB in {r.poison_ms:.0f} ms, dd "
                        f"{r.dd_ms:.0f} ms" for r in runs)
            + f"; arena {poison.arena_bytes / MiB:.0f} MiB)")
    return TargetResult(name, text, ratio <= 1.5)


def switch_targets(trees: Sequence[TreeResult], imports_ms: float | None,
                   poison: PoisonResult) -> list[TargetResult]:
    """Issue 13: the next kernel in the daemon's process, the blackout under 100 ms,
    poison at memory speed."""
    return [_exec_phase_target(trees, imports_ms), _headline_target(trees),
            _poison_target(poison)]


def _per_inode_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "daemon memory ≤ 600 B per small-file inode"
    slope = analysis.memory_slope(trees, "inodes", "RssAnon")
    if slope is None:
        return TargetResult(name, "n/a", None)
    return TargetResult(name, f"{slope.per_unit:.0f} B (RssAnon slope over {slope.points} trees)",
                        slope.per_unit <= 600)


def _per_gib_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "daemon memory ≤ 1 MiB per GiB of large-file data"
    slope = analysis.memory_slope(trees, "bytes", "RssAnon")
    if slope is None:
        return TargetResult(name, "n/a", None)
    largest = analysis.sweep(trees, "bytes")[-1]
    text = f"{slope.per_unit / KiB:.0f} KiB (RssAnon slope over {slope.points} trees)"
    # Below a GiB of data the growth is smaller than the heap's own wobble (an MiB or so).
    return _judged(name, largest, text, slope.per_unit <= 1 * MiB, largest.spec.bytes >= 1 * GiB)


def _core(tree: TreeResult) -> float:
    summary = tree.core_blackout().summary
    assert summary is not None
    return summary.median


def _core_ratio_target(trees: Sequence[TreeResult], role: str, name: str, limit: float,
                       exact: Callable[[TreeResult, TreeResult], bool]) -> TargetResult:
    found = analysis.sweep(trees, role)
    if len(found) < 2:
        return TargetResult(name, "n/a", None)
    small, large = found[0], found[-1]
    value = _core(large) / _core(small)
    text = (f"{value:.2f} × ({_core(large):.1f} ms at {large.spec.label}, "
            f"{_core(small):.1f} ms at {small.spec.label})")
    return _judged(name, large, text, value <= limit, exact(small, large))


def _core_headline_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "blackout without exec and poison ≤ 50 ms at 10 Ki files and 1 GiB"
    found = analysis.sweep(trees, "headline")
    if not found:
        return TargetResult(name, "not measured", None)
    ms = _core(found[0])
    return TargetResult(name, f"{ms:.1f} ms", ms <= 50)


def _rss_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = ("daemon memory ≤ 128 MiB at 1 Mi inodes (RssAnon after a stat of every file; "
            "the arena pages it maps are RssShmem)")
    found = [t for t in analysis.sweep(trees, "inodes") if "RssAnon" in t.memory]
    if not found:
        return TargetResult(name, "n/a", None)
    tree = found[-1]
    text = ", ".join(f"{t.memory['RssAnon'] / MiB:.0f} MiB at {t.spec.inodes:,}"
                     for t in found)
    return _judged(name, tree, text, tree.memory["RssAnon"] <= 128 * MiB,
                   tree.spec.files >= 1 * MiB)


def _recovery_target(trees: Sequence[TreeResult]) -> TargetResult:
    name = "recovery after SIGKILL ≤ 1 s at 1 Mi inodes (boot and restore)"
    found = [t for t in analysis.sweep(trees, "inodes") if t.recovery.summary is not None]
    if not found:
        return TargetResult(name, "n/a", None)
    tree = found[-1]
    ms = tree.recovery.summary.median
    mount = tree.recovery_mount.summary
    text = f"{ms:.1f} ms (the whole guestfs mount: {mount.median:.0f} ms)" if mount else \
        f"{ms:.1f} ms"
    return _judged(name, tree, text, ms <= 1000, tree.spec.files >= 1 * MiB)


def arena_targets(trees: Sequence[TreeResult]) -> list[TargetResult]:
    """Issue 12: the blackout flat in inodes and bytes, flat memory, fast recovery."""
    return [
        _core_ratio_target(trees, "inodes", "blackout without exec and poison at 1 Mi "
                           "inodes ≤ 1.5 × at 1 Ki", 1.5,
                           lambda s, l: s.spec.files == 1 * KiB and l.spec.files >= 1 * MiB),
        _core_ratio_target(trees, "pages", "blackout without exec and poison at 4 GiB of "
                           "4 KiB pages ≤ 1.2 × at 64 MiB", 1.2,
                           lambda s, l: s.spec.bytes == 64 * MiB and l.spec.bytes == 4 * GiB),
        _core_headline_target(trees), _rss_target(trees), _recovery_target(trees)]


def evaluate(profile: Profile, data: Table, meta: Table, trees: Sequence[TreeResult],
             imports_ms: float | None, poison: PoisonResult) -> list[TargetResult]:
    """Every target, in the issues' order (issue 13's blackout target replaces issue 5's
    "< 300 ms" one)."""
    return (data_targets(profile, data, meta) + kexec_targets(trees)
            + [_per_inode_target(trees), _per_gib_target(trees)] + arena_targets(trees)
            + switch_targets(trees, imports_ms, poison))

