"""Sizes, errors, the arena file and machines (folder, lock, list, destroy)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest_machine import machine_env, machine_name  # noqa: F401
from kho_backend.arena import Arena, node_starts
from kho_backend.errors import (
    ArenaError,
    BootError,
    HandoverError,
    HeaderError,
    KexecError,
    KhoBusy,
    MachineError,
    OutOfMemory,
)
from kho_backend.header import MachineHeader, MachineState
from kho_backend.machine import (
    create_machine,
    destroy_machine,
    list_machines,
    machine_dir,
    machine_path,
    open_machine,
    validate_name,
)
from kho_backend.units import MAX_ORDER, PAGE_SHIFT, PAGE_SIZE, format_size, parse_size

MiB = 1 << 20

# -- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1048576", 1 << 20),
        ("256M", 256 << 20),
        ("4G", 4 << 30),
        ("2GiB", 2 << 30),
        ("64k", 64 << 10),
        ("16MB", 16 << 20),
        ("1.5G", 3 << 29),
        (" 8 M ", 8 << 20),
        ("1T", 1 << 40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12Q", "-4G", "1.0000001K", "four", "10iB", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size|whole number"):
        parse_size(text)


def test_page_geometry() -> None:
    assert PAGE_SIZE == 4096 == 1 << PAGE_SHIFT
    assert MAX_ORDER == 10


@given(st.integers(min_value=0, max_value=1 << 62))
def test_compact_format_round_trips(n: int) -> None:
    assert parse_size(format_size(n, compact=True)) == n


def test_format_size_for_people() -> None:
    assert format_size(16 << 20) == "16 MiB"
    assert format_size(3 << 29) == "1.50 GiB"
    assert format_size(512) == "512 B"


# -- errors ---------------------------------------------------------------------------------


def test_error_tree() -> None:
    for cls in (ArenaError, HeaderError, OutOfMemory, BootError, HandoverError, KhoBusy, KexecError):
        assert issubclass(cls, MachineError)
    e = KexecError("KHO finalize failed: no memory.", "finalize")
    assert e.phase == "finalize" and str(e) == "KHO finalize failed: no memory."


# -- the arena --------------------------------------------------------------------------------


def test_arena_create_is_sparse_private_and_mapped(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    with Arena.create(path, 64 * MiB, nodes=2) as arena:
        st_ = os.stat(path)
        assert stat.S_IMODE(st_.st_mode) == 0o600
        assert st_.st_size == 64 * MiB and st_.st_blocks * 512 < MiB  # sparse
        assert arena.npages == 64 * MiB // PAGE_SIZE
        arena.view(5, 2)[:3] = b"abc"
        assert bytes(arena.phys_view(5 * PAGE_SIZE, 3)) == b"abc"
        assert arena.array()[5 * PAGE_SIZE] == ord("a")
    with Arena.open(path) as again:  # MAP_SHARED: another mapping sees it
        assert bytes(again.view(5)[:3]) == b"abc"


def test_views_do_not_copy(tmp_path: Path) -> None:
    with Arena.create(tmp_path / "a.mem", 4 * MiB) as arena:
        view = arena.view(1)
        arena.array()[PAGE_SIZE] = 7
        assert view[0] == 7
        view.release()


def test_a_kept_mapping_goes_to_the_next_arena_of_that_file_only(tmp_path: Path) -> None:
    """close(keep_mapping=True) (the in-process kexec) leaves the mapping to the next
    Arena of the same file, which sees what was written; any other file's Arena, or a
    file replaced meanwhile, gets a mapping of its own and the kept one is dropped."""
    import kho_backend.arena as arena_module
    first = Arena.create(tmp_path / "a.mem", 4 * MiB)
    first.array()[:4] = 7
    mapping = first._mm
    first.close(keep_mapping=True)
    again = Arena.open(tmp_path / "a.mem")
    assert again._mm is mapping and list(again.array()[:4]) == [7] * 4
    again.close(keep_mapping=True)
    other = Arena.create(tmp_path / "b.mem", 4 * MiB)
    assert other._mm is not mapping and arena_module._kept is None and mapping.closed
    other.close(keep_mapping=True)
    (tmp_path / "b.mem").unlink()
    Arena.create(tmp_path / "b.mem", 4 * MiB).close()     # a new file of that name
    assert arena_module._kept is None
    arena_module.drop_kept_mapping()


def test_views_are_bounds_checked(tmp_path: Path) -> None:
    with Arena.create(tmp_path / "a.mem", 4 * MiB) as arena:
        with pytest.raises(ArenaError, match="outside the arena"):
            arena.view(arena.npages - 1, 2)
        with pytest.raises(ArenaError, match="outside the arena"):
            arena.phys_view(arena.size - 10, 11)
        with pytest.raises(ArenaError, match="outside the arena"):
            arena.node_of(arena.npages)


def test_numa_layout(tmp_path: Path) -> None:
    with Arena.create(tmp_path / "a.mem", 100 * MiB, nodes=3) as arena:
        ranges = arena.node_ranges()
        assert ranges[0][0] == 0 and ranges[-1][1] == arena.npages
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % (1 << MAX_ORDER) == 0 for lo, _ in ranges)  # no block straddles nodes
        for node, (lo, hi) in enumerate(ranges):
            assert arena.node_of(lo) == node == arena.node_of(hi - 1)
        pfns = np.array([0, ranges[1][0], arena.npages - 1])
        assert arena.nodes_of(pfns).tolist() == [0, 1, 2]


@given(st.integers(1, 1 << 22), st.integers(1, 64))
def test_node_starts_cover_everything(npages: int, nodes: int) -> None:
    starts = node_starts(npages, nodes)
    assert starts[0] == 0 and starts[-1] == npages and starts == sorted(starts)


@pytest.mark.parametrize(
    "size, nodes, match",
    [(4 * MiB + 1, 1, "multiple of the page size"), (2 * MiB, 1, "too small"),
     (8 * MiB, 3, "too small"), (64 * MiB, 0, "1 to 64"), (64 * MiB, 65, "1 to 64")],
)  # fmt: skip
def test_arena_geometry_refused(tmp_path: Path, size: int, nodes: int, match: str) -> None:
    with pytest.raises(ArenaError, match=match):
        Arena.create(tmp_path / "a.mem", size, nodes)
    assert not (tmp_path / "a.mem").exists()


def test_arena_create_refuses_existing(tmp_path: Path) -> None:
    (tmp_path / "a.mem").write_bytes(b"precious")
    with pytest.raises(ArenaError, match="Cannot create"):
        Arena.create(tmp_path / "a.mem", 4 * MiB)
    assert (tmp_path / "a.mem").read_bytes() == b"precious"


def test_close_releases_even_with_live_views(tmp_path: Path) -> None:
    arena = Arena.create(tmp_path / "a.mem", 4 * MiB)
    kept = np.frombuffer(arena.view(1), dtype=np.uint8)
    arena.close()  # must not raise although `kept` still maps the file
    arena.close()  # idempotent
    assert kept.size == PAGE_SIZE


# -- machines -----------------------------------------------------------------------------------


def test_machine_dir_from_env(machine_env: Path) -> None:
    assert machine_dir() == machine_env
    assert machine_dir(Path("/x")) == Path("/x")
    assert machine_path("vm1") == machine_env / "vm1.mem"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "x" * 65, "ü"])
def test_bad_machine_names(name: str) -> None:
    with pytest.raises(ArenaError, match="not a valid machine name"):
        validate_name(name)


def test_machine_folder_is_private(machine_env: Path, machine_name: str) -> None:
    folder = machine_env / "sub"
    arena, _ = create_machine(machine_name, 4 * MiB, directory=folder)
    arena.close()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(machine_path(machine_name, folder).stat().st_mode) == 0o600


def test_create_open_list_destroy(machine_env: Path, machine_name: str) -> None:
    arena, header = create_machine(machine_name, 8 * MiB, nodes=2)
    assert header.state is MachineState.FRESH and header.nr_nodes == 2
    with pytest.raises(ArenaError, match="already exists"):
        create_machine(machine_name, 8 * MiB)
    info = {m.name: m for m in list_machines()}[machine_name]
    assert (info.size, info.nodes, info.state, info.alive, info.pid, info.boot_count) == (
        8 * MiB, 2, MachineState.FRESH, True, os.getpid(), 0)  # fmt: skip
    arena.close()
    info = {m.name: m for m in list_machines()}[machine_name]
    assert not info.alive
    arena, header = open_machine(machine_name, memory=8 * MiB)
    assert arena.nodes == 2 and header.arena_size == 8 * MiB
    arena.close()
    destroy_machine(machine_name)
    assert not machine_path(machine_name).exists()
    assert not any(machine_env.iterdir())  # no temporary file left behind
    with pytest.raises(ArenaError, match="no machine named"):
        destroy_machine(machine_name)
    with pytest.raises(ArenaError, match="no machine named"):
        open_machine(machine_name)


def test_lock_is_exclusive(machine_env: Path, machine_name: str) -> None:
    arena, _ = create_machine(machine_name, 4 * MiB)
    try:
        with pytest.raises(ArenaError, match=f"in use by pid {os.getpid()}"):
            open_machine(machine_name)
        with pytest.raises(ArenaError, match="in use"):
            destroy_machine(machine_name)
    finally:
        arena.close()
    open_machine(machine_name)[0].close()  # free again once closed


def test_lock_held_by_another_process(machine_env: Path, machine_name: str) -> None:
    create_machine(machine_name, 4 * MiB)[0].close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kho_backend.machine import open_machine; "
         f"a = open_machine({machine_name!r}); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArenaError, match=f"in use by pid {holder.pid}"):
            destroy_machine(machine_name)
        info = {m.name: m for m in list_machines()}[machine_name]
        assert info.alive and info.pid == holder.pid
    finally:
        holder.communicate("", timeout=30)
    destroy_machine(machine_name)  # the lock died with the process


def test_lock_is_released_by_exec(machine_env: Path, machine_name: str) -> None:
    """A kernel that execs the next one in the same process must not keep its own lock."""
    create_machine(machine_name, 4 * MiB)[0].close()
    code = (
        "import os, sys\n"
        "from kho_backend.machine import open_machine\n"
        "if sys.argv[1] == 'first':\n"
        f"    a = open_machine({machine_name!r})\n"
        "    os.execv(sys.executable, [sys.executable, '-c', sys.argv[2], 'second', sys.argv[2]])\n"
        f"a = open_machine({machine_name!r}); print('relocked', os.getpid())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, "first", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("relocked")


def test_open_refuses_wrong_size(machine_env: Path, machine_name: str) -> None:
    create_machine(machine_name, 4 * MiB)[0].close()
    with pytest.raises(ArenaError, match="has 4 MiB of memory, not the 8 MiB asked for"):
        open_machine(machine_name, memory=8 * MiB)


def test_file_that_is_not_an_arena(machine_env: Path) -> None:
    (machine_env / "junk.mem").write_bytes(b"hello world\n" * 1000)
    (machine_env / "zero.mem").write_bytes(bytes(8 * MiB))
    with pytest.raises(ArenaError, match="not a guestfs arena"):
        open_machine("junk")
    with pytest.raises(HeaderError, match="not a guestfs arena"):
        open_machine("zero")
    assert (machine_env / "junk.mem").read_bytes() == b"hello world\n" * 1000
    listed = {m.name: m for m in list_machines()}
    assert listed["junk"].state is None and "not a guestfs arena" in listed["junk"].error
    assert listed["zero"].state is None and listed["zero"].error


def test_truncated_arena_is_refused_untouched(machine_env: Path, machine_name: str) -> None:
    create_machine(machine_name, 8 * MiB)[0].close()
    path = machine_path(machine_name)
    os.truncate(path, 4 * MiB)
    before = path.read_bytes()
    with pytest.raises(ArenaError, match="but its header says 8 MiB"):
        open_machine(machine_name)
    assert path.read_bytes() == before


def test_list_empty_folder(tmp_path: Path) -> None:
    assert list_machines(tmp_path / "nothing") == []


def test_header_matches_file(machine_env: Path, machine_name: str) -> None:
    arena, _ = create_machine(machine_name, 4 * MiB)
    with arena:
        assert MachineHeader.read(arena).arena_size == arena.size


def test_an_arena_knows_when_its_path_no_longer_leads_to_it(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    size = 4 << 20
    with Arena.create(path, size) as arena:
        assert arena.detached() is None
        os.truncate(path, size - PAGE_SIZE)
        assert "truncated" in arena.detached()
        os.truncate(path, size)
        os.rename(path, tmp_path / "moved.mem")
        assert "was deleted" in arena.detached()
        path.write_bytes(bytes(size))            # another file in its place
        assert "replaced" in arena.detached()
