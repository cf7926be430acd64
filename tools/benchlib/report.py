"""The Markdown report (bench.md): tables of every figure, the ratios and the targets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchlib import analysis
from benchlib.datapath import workloads
from benchlib.kexec import TreeResult
from benchlib.metadata import TITLES as META_TITLES
from benchlib.model import MISSING, Series, Table
from benchlib.poison import PoisonResult
from benchlib.results import SYSTEMS, Results
from benchlib.shell import TITLES as SHELL_TITLES
from benchlib.shell import ceiling_note
from benchlib.targets import TargetResult
from benchlib.units import size_text

VERDICT = {True: "✅ met", False: "❌ missed", None: "— not measured"}


def number(x: float) -> str:
    """Three significant figures, thousands separated."""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


class Notes:
    """Footnotes: long reasons (why a figure is n/a, what was capped) out of the cells."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"

    def render(self) -> list[str]:
        if not self.items:
            return []
        return [""] + [f"[{i}] {text}  " for i, text in enumerate(self.items, 1)]


def cell(series: Series | None, notes: Notes) -> str:
    """``median [low–high]``, or n/a (missing, for a system that could not be had) with
    a footnote saying why."""
    if series is None:
        return "—"
    if series.na is not None:
        label = MISSING if series.na.startswith(MISSING) else "n/a"
        return f"{label} " + notes.ref(series.na)
    summary = series.summary
    if summary is None:
        return "—"
    text = f"{number(summary.median)}"
    if summary.n > 1:
        text += f" [{number(summary.low)}–{number(summary.high)}]"
    if series.note:
        text += " " + notes.ref(series.note)
    return text


def _ratio_cell(table: Table, workload: str, other: str) -> str:
    value = analysis.ratio(table, workload, "guestfs", other)
    return f"{value:.2f}" if value is not None else "—"


def comparison_table(table: Table, titles: dict[str, str]) -> list[str]:
    """Workloads against systems, with guestfs's ratios to the others."""
    notes = Notes()
    head = ["workload", "unit", *SYSTEMS.values(), "guestfs / tmpfs", "guestfs / ceiling",
            "guestfs / example"]
    lines = [_row(head), _row(["---"] * len(head))]
    for key, title in titles.items():
        row = table.series.get(key, {})
        unit = next((s.unit for s in row.values()), "")
        lines.append(_row([title, unit, *(cell(row.get(s), notes) for s in SYSTEMS),
                           *(_ratio_cell(table, key, o) for o in ("tmpfs", "ceiling", "example"))]))
    return lines + notes.render()


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _layout(tree: TreeResult) -> str:
    lay = tree.layout
    if not lay:
        return "—"
    return f"{lay['order0_pages']:,} pages, {lay['folios']:,} folios, {lay['extents']:,} extents"


def kexec_table(trees: Sequence[TreeResult]) -> list[str]:
    """Blackout of every tree against the copy-to-disk baseline."""
    notes = Notes()
    head = ["tree", "sweeps", "inodes", "data", "arena layout", "guestfs blackout (ms)",
            "without exec and poison (ms)", "recovery after SIGKILL (ms)",
            "copy-to-disk (ms)", "save + restore (ms)", "copy-to-disk / guestfs"]
    lines = [_row(head), _row(["---"] * len(head))]
    for t in trees:
        speed = analysis.speedup(t)
        trips = t.baseline_runs
        split = (f"{number(sum(r.save_ms for r in trips) / len(trips))} + "
                 f"{number(sum(r.restore_ms for r in trips) / len(trips))}") if trips else "—"
        lines.append(_row([t.spec.label, ", ".join(t.roles), f"{t.spec.inodes:,}",
                           size_text(t.spec.bytes), _layout(t), cell(t.blackout, notes),
                           cell(t.core_blackout(), notes), cell(t.recovery, notes),
                           cell(t.baseline, notes), split,
                           f"{number(speed)} ×" if speed is not None else "—"]))
    return lines + notes.render()


def phases_table(trees: Sequence[TreeResult], imports_ms: float | None) -> list[str]:
    """Median milliseconds of each blackout phase, per tree (and of the ``--exec``
    kexecs where measured), with the exec phase against the next image's imports.

    ``exec`` is the switch to the next kernel inside the daemon's process (the old
    kernel closed, the exec time stamped); with ``--exec`` it is the next image's
    Python start-up and imports, and ``unmount`` and ``teardown`` appear."""
    rows = []
    for t in trees:
        rows.append((t.spec.label, t.phase_medians(), t.blackout))
        if t.exec_blackout.summary is not None:
            rows.append((f"{t.spec.label}, --exec", t.exec_phase_medians(), t.exec_blackout))
    names: list[str] = []
    for _, medians, _ in rows:
        names += [n for n in medians if n not in names]
    lines = [_row(["tree", *names, "blackout", "exec / imports"]),
             _row(["---"] * (len(names) + 3))]
    for label, medians, blackout in rows:
        summary = blackout.summary
        share = (f"{medians['exec'] / imports_ms:.2g}" if imports_ms and "exec" in medians
                 else "—")
        lines.append(_row([label, *(number(medians[n]) if n in medians else "—"
                                    for n in names),
                           number(summary.median) if summary else "—", share]))
    return lines


def exec_path_table(trees: Sequence[TreeResult], imports_ms: float | None) -> list[str]:
    """The in-process switch against ``--exec`` (the old path) on the same tree."""
    lines = [_row(["tree", "path", "blackout (ms)", "exec phase (ms)", "exec / imports"]),
             _row(["---"] * 5)]
    for t in trees:
        if t.exec_blackout.summary is None:
            continue
        notes = Notes()
        for path, medians, blackout in (("in process (default)", t.phase_medians(), t.blackout),
                                        ("--exec", t.exec_phase_medians(), t.exec_blackout)):
            ms = medians.get("exec")
            lines.append(_row([t.spec.label, path, cell(blackout, notes),
                               number(ms) if ms is not None else "—",
                               f"{ms / imports_ms:.2g}" if ms is not None and imports_ms
                               else "—"]))
    if imports_ms:
        lines += ["", f"imports: Python start-up with the daemon's imports, {imports_ms:.0f} ms "
                      "in this run (what an exec of the next image costs at least)."]
    return lines


def poison_table(poison: PoisonResult) -> list[str]:
    """Each poisoning kexec against dd of the same size into /dev/shm."""
    lines = [_row(["run", "poisoned", "poison (ms)", "dd (ms)", "poison / dd", "path"]),
             _row(["---"] * 6)]
    for i, r in enumerate(poison.runs, 1):
        lines.append(_row([str(i), size_text(r.pages * 4096), number(r.poison_ms),
                           number(r.dd_ms), f"{r.ratio:.2f}",
                           "in process" if r.in_process else "exec"]))
    return lines + ["", "Run 1 is the first poison of a fresh sparse arena and dd into a new "
                    "file (both allocate their pages); later runs overwrite pages already "
                    "there, on both sides. dd: `dd if=/dev/zero bs=1M conv=notrunc,fsync`, "
                    "by its own timing."]


def memory_table(trees: Sequence[TreeResult]) -> list[str]:
    """The daemon's memory per tree, and the slopes the targets are judged on."""
    lines = [_row(["tree", "inodes", "data", *analysis.MEMORY_FIELDS]), _row(["---"] * 5)]
    for t in trees:
        if t.memory:
            lines.append(_row([t.spec.label, f"{t.spec.inodes:,}", size_text(t.spec.bytes),
                               *(size_text(t.memory[f]) for f in analysis.MEMORY_FIELDS)]))
    lines.append("")
    for field in analysis.MEMORY_FIELDS:
        per_inode = analysis.memory_slope(trees, "inodes", field)
        per_gib = analysis.memory_slope(trees, "bytes", field)
        parts = []
        if per_inode is not None:
            parts.append(f"{per_inode.per_unit:,.0f} B per inode (small-file sweep)")
        if per_gib is not None:
            parts.append(f"{per_gib.per_unit / 1024:,.0f} KiB per GiB of data (bytes sweep)")
        if parts:
            lines.append(f"- {field}: " + "; ".join(parts))
    return lines


def targets_table(targets: Sequence[TargetResult]) -> list[str]:
    lines = [_row(["target", "measured", "verdict"]), _row(["---"] * 3)]
    return lines + [_row([t.target, t.measured, VERDICT[t.met]]) for t in targets]


def _section(heading: str, body: list[str], measured: bool) -> list[str]:
    """A heading and its body, or nothing if this run did not measure it."""
    return ["", heading, "", *body] if measured else []


def _times(n: int, what: str) -> str:
    return f"{n} {what}" + ("s" if n != 1 else "")


def render(results: Results, plots: Sequence[str] = ()) -> str:
    """The whole report, showing the PNG files named in `plots` (beside it)."""
    p, h = results.profile, results.host
    shell_note = ceiling_note(results.shell)
    out = [f"# guestfs benchmark ({p.name} run)", "",
           f"Command: `{results.command}`  ",
           f"Started {results.started}, took {results.duration_s / 60:.1f} min; "
           f"commit {h['commit']}.  ",
           f"Each data-path and metadata figure is the median of {_times(p.runs, 'run')} "
           f"[lowest–highest]; each blackout the median of {_times(p.kexec_runs, 'kexec')}, "
           f"each copy-to-disk figure of {_times(p.baseline_runs, 'round trip')}.", "",
           "## Machine", "", _row(["what", "value"]), _row(["---", "---"])]
    out += [_row([k, size_text(v) if k == "memory_bytes" else str(v)]) for k, v in h.items()]
    if results.python_startup_ms is not None:
        out.append(_row(["Python start-up with the daemon's imports (the next image's "
                         "imports: what an exec costs at least)",
                         f"{results.python_startup_ms:.0f} ms"]))
    out += ["", "## Targets", "", *targets_table(results.targets())]
    if results.errors:
        out += ["", "## Errors", "", *(f"- {e}" for e in results.errors)]
    out += ["", f"## Data path (fio; {size_text(p.seq_size)} sequential file, "
            f"{size_text(p.rand_size)} random-I/O file, {p.rand_runtime_s:g} s per random job)", "",
            *comparison_table(results.datapath, {w.key: w.title for w in workloads(p)}),
            "", "tmpfs has no cold cache (its page cache is the data): its cold and warm "
            "reads are the same thing.",
            "", f"## Metadata ({p.meta_files:,} files in one folder)", "",
            *comparison_table(results.metadata, META_TITLES),
            "", "## Shell work (seconds, lower is better; the ratio is how many times "
            "tmpfs's time)", "", *comparison_table(results.shell, SHELL_TITLES),
            *(["", shell_note] if shell_note else []),
            "", "## Kexec blackout against copy-to-disk", "", *kexec_table(results.trees),
            "", "### Blackout phases (median ms)", "",
            *phases_table(results.trees, results.python_startup_ms),
            "", "`exec` is the switch to the next kernel in the daemon's process (the old "
            "kernel closed, the exec time stamped), judged against the next image's imports; "
            "in the `--exec` rows it is the exec of a fresh next image (Python start-up and "
            "imports), and `unmount` and `teardown` appear.",
            *_section("### The in-process switch against --exec",
                      exec_path_table(results.trees, results.python_startup_ms),
                      any(t.exec_blackout.summary for t in results.trees)),
            *_section(f"## Poison against dd ({size_text(results.poison.arena_bytes)} arena)",
                      poison_table(results.poison), bool(results.poison.runs)),
            "", "## Daemon memory (after the kexecs)", "", *memory_table(results.trees)]
    if plots:
        out += ["", "## Plots", "", *(f"![{Path(name).stem}]({name})" for name in plots)]
    return "\n".join(out) + "\n"
