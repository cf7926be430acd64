"""PNG plots of a run (matplotlib, Agg backend: no display needed).

Every plot is a median with error bars from the lowest to the highest sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.axes import Axes  # noqa: E402

from benchlib import analysis  # noqa: E402
from benchlib.datapath import workloads  # noqa: E402
from benchlib.kexec import TreeResult  # noqa: E402
from benchlib.metadata import TITLES as META_TITLES  # noqa: E402
from benchlib.model import Series, Table  # noqa: E402
from benchlib.results import SYSTEMS, Results  # noqa: E402
from benchlib.units import GiB  # noqa: E402

DPI = 110


def _errors(series: Sequence[Series | None]) -> tuple[list[float], list[list[float]]]:
    """Medians and (below, above) error bar lengths; zeros for what was not measured."""
    medians, below, above = [], [], []
    for s in series:
        summary = s.summary if s is not None else None
        medians.append(summary.median if summary else 0.0)
        below.append(summary.median - summary.low if summary else 0.0)
        above.append(summary.high - summary.median if summary else 0.0)
    return medians, [below, above]


def _bars(ax: Axes, table: Table, titles: dict[str, str], unit: str) -> None:
    """Grouped bars: one group per workload, one bar per system, log scale."""
    keys = [k for k in titles if any(s.unit == unit for s in table.series.get(k, {}).values())]
    width = 0.8 / len(SYSTEMS)
    for i, (system, label) in enumerate(SYSTEMS.items()):
        medians, errors = _errors([table.series.get(k, {}).get(system) for k in keys])
        ax.bar([x + i * width for x in range(len(keys))], medians, width, yerr=errors,
               label=label, capsize=2)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([titles[k].replace(", ", "\n", 1) for k in keys], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(unit)
    ax.grid(axis="y", alpha=0.3)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_datapath(results: Results, path: Path) -> Path:
    titles = {w.key: w.title for w in workloads(results.profile)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 4]})
    _bars(axes[0], results.datapath, titles, "MiB/s")
    _bars(axes[1], results.datapath, titles, "IOPS")
    axes[0].set_title("sequential I/O (fio)")
    axes[1].set_title("random 4 KiB I/O, O_DIRECT (fio)")
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def plot_metadata(results: Results, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _bars(ax, results.metadata, META_TITLES, "ops/s")
    ax.set_title(f"metadata, {results.profile.meta_files:,} small files")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _sweep_plot(ax: Axes, trees: list[TreeResult], x_of: Callable[[TreeResult], float],
                xlabel: str) -> None:
    x = [x_of(t) for t in trees]
    for label, get in (("guestfs kexec", lambda t: t.blackout),
                       ("copy to disk and back (tar)", lambda t: t.baseline)):
        medians, errors = _errors([get(t) for t in trees])
        ax.errorbar(x, medians, yerr=errors, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("blackout (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_blackout(results: Results, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _sweep_plot(axes[0], analysis.sweep(results.trees, "inodes"), lambda t: t.spec.inodes,
                "inodes (small files)")
    axes[0].set_title("blackout against inode count")
    bytes_sweep = analysis.sweep(results.trees, "bytes")
    _sweep_plot(axes[1], bytes_sweep, lambda t: t.spec.bytes / GiB, "GiB of data")
    files = bytes_sweep[0].spec.files if bytes_sweep else 0
    axes[1].set_title(f"blackout against bytes stored ({files} files)")
    return _save(fig, path)


def plot_phases(results: Results, path: Path) -> Path:
    """Stacked median phases of every tree's blackout (and of its ``--exec`` kexecs)."""
    rows: list[tuple[str, dict[str, float]]] = []
    for t in results.trees:
        if t.phases:
            rows.append((t.spec.label, t.phase_medians()))
        if t.exec_phases:
            rows.append((f"{t.spec.label}, --exec", t.exec_phase_medians()))
    names: list[str] = []
    for _, medians in rows:
        names += [n for n in medians if n not in names]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for name in names:
        widths = [medians.get(name, 0.0) for _, medians in rows]
        ax.barh(range(len(rows)), widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows], fontsize=7)
    ax.set_xlabel("ms (median of each phase)")
    ax.set_title("where the blackout goes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_memory(results: Results, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, role, x_of, xlabel in (
            (axes[0], "inodes", lambda t: t.spec.inodes, "inodes (small files)"),
            (axes[1], "bytes", lambda t: t.spec.bytes / GiB, "GiB of data")):
        trees = [t for t in analysis.sweep(results.trees, role) if t.memory]
        for field in analysis.MEMORY_FIELDS:
            ax.plot([x_of(t) for t in trees], [t.memory[field] / (1 << 20) for t in trees],
                    marker="o", label=field)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("daemon memory (MiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("daemon memory against inodes")
    axes[1].set_title("daemon memory against bytes stored")
    return _save(fig, path)


def write_plots(results: Results, outdir: Path) -> list[Path]:
    """Every plot that has data, as PNG files in `outdir`."""
    made = []
    if results.datapath.series:
        made.append(plot_datapath(results, outdir / "datapath.png"))
    if results.metadata.series:
        made.append(plot_metadata(results, outdir / "metadata.png"))
    if results.trees:
        made += [plot_blackout(results, outdir / "blackout.png"),
                 plot_phases(results, outdir / "blackout_phases.png"),
                 plot_memory(results, outdir / "memory.png")]
    return made
