"""How big and how often: the full run, ``--quick``, and the tiny one the tests use."""

from __future__ import annotations

from dataclasses import dataclass

from benchlib.trees import Layout, TreeSpec
from benchlib.units import GiB, KiB, MiB

SMALL_FILE = 512          # bytes of a "small file" in the inode-count sweep
BYTES_SWEEP_FILES = 64    # the fixed file count of the bytes sweep
HEADLINE = (10 * KiB, 1 * GiB)  # the kexec issue's "10 Ki files and 1 GiB" target
HEADLINE_SPEC = (HEADLINE[0], -(-HEADLINE[1] // HEADLINE[0]))  # files, bytes per file
PAGES_SWEEP_FROM = 64 * MiB     # the 4 KiB-page sweep: from this to reference_bytes


@dataclass(frozen=True)
class Profile:
    """Sizes, counts and repeats of one benchmark run."""

    name: str
    runs: int                   # repeats of every data-path and metadata figure
    seq_size: int               # sequential-I/O file
    rand_size: int              # random-I/O file
    rand_runtime_s: float       # each random-I/O job runs this long
    example_file_size: int      # caps for pyfuse3's example: its writes and reads copy the
    example_meta_files: int     # whole file, its readdir reads the whole folder each call
    meta_files: int             # files of the metadata driver
    forget_settle_s: float       # settle time after dropping caches (see metadata.py)
    kexec_runs: int             # kexecs per tree
    baseline_runs: int          # tar out and back per tree
    inode_counts: tuple[int, ...]
    byte_sizes: tuple[int, ...]
    reference_bytes: int        # the bytes-sweep tree also written as 4 KiB pages / fragmented
    headline: bool              # measure the 10 Ki files / 1 GiB tree
    exec_runs: int              # kexecs with --exec (the old path) on the "exec" tree
    poison_bytes: int           # arena of the poison probe (benchlib.poison)
    poison_runs: int            # poisoning kexecs, each against a dd of the same size

    def trees(self) -> dict[TreeSpec, set[str]]:
        """Every kexec tree of this run, each with the sweeps it belongs to."""
        trees: dict[TreeSpec, set[str]] = {}

        def add(spec: TreeSpec, role: str) -> None:
            trees.setdefault(spec, set()).add(role)

        for count in self.inode_counts:
            add(TreeSpec(count, SMALL_FILE), "inodes")
        for size in self.byte_sizes:
            add(TreeSpec(BYTES_SWEEP_FILES, size // BYTES_SWEEP_FILES), "bytes")
        reference = TreeSpec(BYTES_SWEEP_FILES, self.reference_bytes // BYTES_SWEEP_FILES)
        add(reference, "layout")
        add(TreeSpec(reference.files, reference.file_size, Layout.PAGES), "layout")
        add(reference, "fragmentation")
        add(TreeSpec(reference.files, reference.file_size, fragmented=True), "fragmentation")
        for size in {min(PAGES_SWEEP_FROM, self.reference_bytes), self.reference_bytes}:
            add(TreeSpec(BYTES_SWEEP_FILES, size // BYTES_SWEEP_FILES, Layout.PAGES), "pages")
        if self.headline:
            add(TreeSpec(*HEADLINE_SPEC), "headline")
        # The tree also kexec'd with --exec: the headline tree, or the largest of the
        # inode sweep in a run without it.
        add(TreeSpec(*HEADLINE_SPEC) if self.headline else
            TreeSpec(max(self.inode_counts), SMALL_FILE), "exec")
        return trees


FULL = Profile(
    name="full", runs=5, seq_size=1 * GiB, rand_size=256 * MiB, rand_runtime_s=10,
    example_file_size=32 * MiB, example_meta_files=4 * KiB, meta_files=10 * KiB,
    forget_settle_s=0.3, kexec_runs=5, baseline_runs=3,
    inode_counts=(1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB),
    byte_sizes=(8 * MiB, 64 * MiB, 512 * MiB, 4 * GiB, 8 * GiB),
    reference_bytes=4 * GiB, headline=True, exec_runs=3, poison_bytes=1 * GiB, poison_runs=3)

QUICK = Profile(
    name="quick", runs=3, seq_size=256 * MiB, rand_size=64 * MiB, rand_runtime_s=1,
    example_file_size=16 * MiB, example_meta_files=2 * KiB, meta_files=10 * KiB,
    forget_settle_s=0.3, kexec_runs=3, baseline_runs=2,
    inode_counts=(1 * KiB, 4 * KiB, 16 * KiB),
    byte_sizes=(8 * MiB, 64 * MiB, 256 * MiB),
    reference_bytes=256 * MiB, headline=True, exec_runs=2, poison_bytes=1 * GiB,
    poison_runs=2)

# For tests/bench/test_bench.py: every code path, in seconds; the figures mean nothing.
TINY = Profile(
    name="tiny", runs=1, seq_size=8 * MiB, rand_size=4 * MiB, rand_runtime_s=0.3,
    example_file_size=1 * MiB, example_meta_files=50, meta_files=100, forget_settle_s=0,
    kexec_runs=1, baseline_runs=1,
    inode_counts=(64, 256), byte_sizes=(1 * MiB, 4 * MiB),
    reference_bytes=4 * MiB, headline=False, exec_runs=1, poison_bytes=16 * MiB,
    poison_runs=1)

PROFILES = {p.name: p for p in (FULL, QUICK, TINY)}
