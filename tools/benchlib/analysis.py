"""Figures derived from the measurements: ratios, sweeps, memory slopes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from benchlib.kexec import TreeResult
from benchlib.model import Table
from benchlib.units import GiB

MEMORY_FIELDS = ("RssAnon", "VmRSS")


def ratio(table: Table, workload: str, system: str, other: str) -> float | None:
    """Median of `system` over median of `other` (None if either is missing)."""
    a, b = table.median(workload, system), table.median(workload, other)
    return a / b if a is not None and b else None


def sweep(trees: Sequence[TreeResult], role: str) -> list[TreeResult]:
    """The trees of one sweep that were measured, smallest first."""
    found = [t for t in trees if role in t.roles and t.blackout.summary is not None]
    return sorted(found, key=lambda t: (t.spec.bytes, t.spec.files))


def speedup(tree: TreeResult) -> float | None:
    """Copy-to-disk blackout over guestfs blackout (medians)."""
    g, b = tree.blackout.summary, tree.baseline.summary
    return b.median / g.median if g is not None and b is not None and g.median else None


@dataclass(frozen=True)
class Slope:
    """Daemon memory growth: bytes per unit (inode, or GiB), fitted over a sweep."""

    field: str
    per_unit: float
    points: int


def memory_slope(trees: Sequence[TreeResult], role: str, field: str) -> Slope | None:
    """Least-squares slope of the daemon's `field` memory over inodes ("inodes" sweep)
    or over GiB of data ("bytes" sweep); None with fewer than two points."""
    points = [t for t in sweep(trees, role) if field in t.memory]
    if len(points) < 2:
        return None
    x = [t.spec.inodes if role == "inodes" else t.spec.bytes / GiB for t in points]
    y = [t.memory[field] for t in points]
    return Slope(field, float(np.polyfit(x, y, 1)[0]), len(points))
