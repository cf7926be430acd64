"""Figures: repeated samples of one workload on one system, and their summary."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median of the samples, and their spread as lowest and highest."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Summary:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    @property
    def spread_pct(self) -> float:
        """Half the range, in per cent of the median."""
        return 50.0 * (self.high - self.low) / self.median if self.median else 0.0


MISSING = "missing"  # how the reason of a figure starts whose system could not be had


@dataclass
class Series:
    """Samples of one figure, or why there are none (``na``)."""

    unit: str
    samples: list[float] = field(default_factory=list)
    na: str | None = None
    note: str | None = None

    @property
    def summary(self) -> Summary | None:
        """None when nothing was measured."""
        return Summary.of(self.samples) if self.samples and self.na is None else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unit": self.unit, "samples": self.samples}
        if self.summary is not None:
            s = self.summary
            out.update(median=s.median, low=s.low, high=s.high, spread_pct=s.spread_pct)
        if self.na is not None:
            out["na"] = self.na
        if self.note is not None:
            out["note"] = self.note
        return out


@dataclass
class Table:
    """Figures by workload and system, in the order first recorded."""

    series: dict[str, dict[str, Series]] = field(default_factory=dict)

    def get(self, workload: str, system: str, unit: str) -> Series:
        """The series of `workload` on `system`, made empty on first use."""
        return self.series.setdefault(workload, {}).setdefault(system, Series(unit))

    def add(self, workload: str, system: str, unit: str, value: float) -> None:
        """One more sample."""
        self.get(workload, system, unit).samples.append(value)

    def fail(self, workload: str, system: str, unit: str, reason: str) -> None:
        """The figure cannot be had on this system (the first reason is kept)."""
        series = self.get(workload, system, unit)
        if series.na is None:
            series.na = reason

    def median(self, workload: str, system: str) -> float | None:
        """The median, or None if not measured."""
        series = self.series.get(workload, {}).get(system)
        summary = series.summary if series is not None else None
        return summary.median if summary is not None else None

    def to_json(self) -> dict[str, Any]:
        return {w: {s: series.to_json() for s, series in row.items()}
                for w, row in self.series.items()}
