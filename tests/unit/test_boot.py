"""The kernel command line, and booting: cold boot, crash detection, lock, machine list."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest_machine import boot_kernel, machine_env, machine_name, python_calls  # noqa: F401
from kho_backend import __version__
from kho_backend.cmdline import Cmdline, ScratchPolicy
from kho_backend.errors import ArenaError, BootError, HandoverError
from kho_backend.header import MachineHeader, MachineState
from kho_backend.machine import destroy_machine, list_machines, machine_path
from kho_backend.memmap import Memmap, PageState
from kho_backend.units import parse_size

MiB = 1 << 20

# -- command line ---------------------------------------------------------------------------------


def test_cmdline_defaults() -> None:
    c = Cmdline.parse("")
    assert c.kho and not c.kho_poison and c.kho_scratch == ScratchPolicy(percent=200)
    assert str(c) == ""


def test_cmdline_options() -> None:
    c = Cmdline.parse("quiet kho=off kho_scratch=150% loglevel=7 kho_poison")
    assert not c.kho and c.kho_poison and c.kho_scratch.percent == 150
    assert c.extra == ("quiet", "loglevel=7")
    assert str(c) == "kho=off kho_scratch=150% kho_poison quiet loglevel=7"


def test_cmdline_explicit_scratch_and_last_one_wins() -> None:
    c = Cmdline.parse("kho_scratch=50% kho=0 kho=y kho_scratch=16M,64M,32M")
    assert c.kho
    assert c.kho_scratch == ScratchPolicy(percent=None, lowmem=16 * MiB, global_=64 * MiB, pernode=32 * MiB)
    assert str(c) == "kho_scratch=16M,64M,32M"


@pytest.mark.parametrize(
    "text, match",
    [("kho=maybe", "use on or off"), ("kho_scratch=abc%", "percentage"), ("kho_scratch=0%", "percentage"),
     ("kho_scratch=1M,2M", "three sizes"), ("kho_scratch=1M,2X,3M", "not a size")],
)  # fmt: skip
def test_cmdline_errors(text: str, match: str) -> None:
    with pytest.raises(BootError, match=match):
        Cmdline.parse(text)


WORDS = st.text(st.characters(whitelist_categories=("Ll", "Nd"), whitelist_characters="_=.,%"), min_size=1, max_size=12)
POLICIES = st.one_of(
    st.builds(ScratchPolicy, percent=st.integers(1, 1000)),
    st.builds(ScratchPolicy, percent=st.none(), lowmem=st.integers(0, 1 << 40),
              global_=st.integers(0, 1 << 40), pernode=st.integers(0, 1 << 40)),
)  # fmt: skip


@given(kho=st.booleans(), policy=POLICIES, poison=st.booleans(), extra=st.lists(WORDS, max_size=5))
def test_cmdline_round_trips(kho: bool, policy: ScratchPolicy, poison: bool, extra: list[str]) -> None:
    extra = [w for w in extra if w.partition("=")[0] not in ("kho", "kho_scratch") and w != "kho_poison"]
    c = Cmdline(kho=kho, kho_scratch=policy, kho_poison=poison, extra=tuple(extra))
    assert Cmdline.parse(str(c)) == c
    assert str(Cmdline.parse(str(c))) == str(c)


# -- cold boot ------------------------------------------------------------------------------------


def test_cold_boot(boot_kernel, machine_name: str) -> None:
    k = boot_kernel(machine_name, memory=64 * MiB, nodes=2, cmdline="quiet")
    assert k.name == machine_name and k.kho_in is None and k.arena.nodes == 2
    assert k.cmdline.extra == ("quiet",)
    h = k.header
    assert (h.state, h.pid, h.boot_count, h.release) == (MachineState.RUNNING, os.getpid(), 1, f"guestfs {__version__}")
    assert (h.memmap_pfn, h.memmap_npages) == (k.memmap.first_pfn, Memmap.pages_needed(k.arena.npages))
    assert MachineHeader.read(k.arena) == h  # written to page 0
    for phase in ("open", "memblock", "memmap", "scratch", "reserve", "page-alloc", "total"):
        assert k.boot_timings[phase] >= 0
    assert "handover-parse" not in k.boot_timings
    # The memmap lives in the arena, reserved, at the place the header says.
    states = k.memmap.block_states()
    assert (states[h.memmap_pfn : h.memmap_pfn + h.memmap_npages] == PageState.RESERVED).all()
    assert states[0] == PageState.RESERVED
    s = k.buddy.stats()
    assert s.reserved_pages == 1 + h.memmap_npages and s.used_pages == 0 and s.preserved_pages == 0
    assert s.free_pages == k.arena.npages - s.reserved_pages
    assert k.finish_boot() == 0
    assert not MachineHeader.read(k.arena).boot_params.valid
    k.buddy.check()


def test_reboot_after_a_crash_needs_format(boot_kernel, machine_name: str) -> None:
    k = boot_kernel(machine_name, memory=16 * MiB)
    pid = k.header.pid
    k.finish_boot()
    k.shutdown()  # stops without handing over: like a crash
    path = machine_path(machine_name)
    before = path.read_bytes()
    with pytest.raises(BootError, match=rf"previous kernel \(pid {pid}\) .* ended without handing over"):
        boot_kernel(machine_name)
    assert path.read_bytes() == before  # refused: nothing written
    k = boot_kernel(machine_name, format=True)
    assert k.header.boot_count == 2 and k.header.state is MachineState.RUNNING


def test_second_boot_while_running_is_refused(boot_kernel, machine_name: str) -> None:
    k = boot_kernel(machine_name, memory=16 * MiB)
    with pytest.raises(ArenaError, match=f"in use by pid {os.getpid()}"):
        boot_kernel(machine_name, format=True)
    assert k.buddy.alloc(0)  # the running kernel is unaffected


def test_machine_list_and_destroy_with_kernels(boot_kernel, machine_name: str) -> None:
    k = boot_kernel(machine_name, memory=16 * MiB, nodes=2)
    info = {m.name: m for m in list_machines()}[machine_name]
    assert info.alive and info.pid == os.getpid() and info.state is MachineState.RUNNING
    assert (info.size, info.nodes, info.boot_count) == (16 * MiB, 2, 1)
    with pytest.raises(ArenaError, match="in use"):
        destroy_machine(machine_name)
    k.shutdown()
    info = {m.name: m for m in list_machines()}[machine_name]
    assert not info.alive and info.state is MachineState.RUNNING
    destroy_machine(machine_name)
    assert machine_name not in {m.name for m in list_machines()}


def test_open_errors(boot_kernel, machine_name: str, machine_env: Path) -> None:
    with pytest.raises(ArenaError, match="no machine named"):
        boot_kernel(machine_name, create=False)
    with pytest.raises(ArenaError, match="give a memory size"):
        boot_kernel(machine_name)
    with pytest.raises(ArenaError, match="not a valid machine name"):
        boot_kernel("../evil", memory=16 * MiB)
    boot_kernel(machine_name, memory=16 * MiB).shutdown()
    with pytest.raises(ArenaError, match="has 16 MiB of memory, not the 32 MiB asked for"):
        boot_kernel(machine_name, memory=32 * MiB, format=True)
    with pytest.raises(ArenaError, match="has 1 NUMA node"):
        boot_kernel(machine_name, nodes=2, format=True)
    k = boot_kernel(machine_name, memory=16 * MiB, format=True, machine_dir=machine_env)
    assert k.arena.path == machine_env / f"{machine_name}.mem"


def test_failed_boot_releases_the_lock(boot_kernel, machine_name: str) -> None:
    boot_kernel(machine_name, memory=16 * MiB).shutdown()
    with pytest.raises(BootError):
        boot_kernel(machine_name)  # crash detected
    boot_kernel(machine_name, format=True)  # not locked out by the failed attempt


def test_big_arena_boots_without_work_per_page(boot_kernel, machine_name: str) -> None:
    """Booting 4 GiB (a million pages) makes as few calls as booting 16 MiB: the memmap
    and the allocator are set up in bulk, never page by page."""
    kernels = {}

    def booting(name: str, size: str) -> Callable[[], None]:
        return lambda: kernels.setdefault(name, boot_kernel(name, memory=parse_size(size),
                                                            nodes=2))
    small = python_calls(booting(machine_name + "-s", "16M"))
    big = python_calls(booting(machine_name + "-b", "4G"))
    assert big < 2 * small + 5000, (small, big)
    assert kernels[machine_name + "-b"].buddy.stats().free_pages > (4 << 30) // 4096 - 2000


# -- the boot-parameter slot ------------------------------------------------------------------------


def hand_over_garbage(kernel, cmdline: str = "") -> None:
    """Fill the boot-parameter slot with an FDT address where there is no FDT."""
    kernel.header.set_boot_params(fdt_phys=1 << 20, fdt_size=4096, cmdline=cmdline)
    kernel.header.state = MachineState.HANDED_OVER
    kernel.write_header()
    kernel.shutdown()


def test_untrustworthy_handover_is_refused_and_arena_untouched(boot_kernel, machine_name: str) -> None:
    k = boot_kernel(machine_name, memory=16 * MiB)
    k.arena.view(300)[:5] = b"files"
    hand_over_garbage(k)
    path = machine_path(machine_name)
    before = path.read_bytes()
    with pytest.raises(HandoverError):
        boot_kernel(machine_name)
    assert path.read_bytes() == before
    with pytest.raises(HandoverError):  # and again: nothing was consumed
        boot_kernel(machine_name)
    assert path.read_bytes() == before


def test_handover_with_kho_off_is_refused(boot_kernel, machine_name: str) -> None:
    hand_over_garbage(boot_kernel(machine_name, memory=16 * MiB), cmdline="kho=off")
    before = machine_path(machine_name).read_bytes()
    with pytest.raises(BootError, match="says kho=off"):
        boot_kernel(machine_name, cmdline="kho=on")  # the slot's command line wins
    assert machine_path(machine_name).read_bytes() == before


def test_format_discards_a_handover(boot_kernel, machine_name: str) -> None:
    hand_over_garbage(boot_kernel(machine_name, memory=16 * MiB))
    k = boot_kernel(machine_name, format=True, cmdline="quiet")
    assert k.kho_in is None and k.cmdline.extra == ("quiet",)
    assert not MachineHeader.read(k.arena).boot_params.valid  # never picked up later


def test_scratch_too_small_for_a_kho_boot(boot_kernel, machine_name: str) -> None:
    k = boot_kernel(machine_name, memory=64 * MiB, cmdline="kho_scratch=4K,4K,4K")
    assert sorted(a.npages for a in k.header.scratch) == [1, 1, 1]
    k.finish_boot()
    pfn = k.buddy.alloc(0)
    k.kho.preserve_folio(pfn, 0)
    k.kexec.prepare({})
    k.shutdown()
    before = machine_path(machine_name).read_bytes()
    with pytest.raises(BootError, match=r"Scratch is too small.*memmap needs 4 pages \(16 KiB\).*largest free scratch range is 1 pages"):
        boot_kernel(machine_name)
    assert machine_path(machine_name).read_bytes() == before


def test_kho_boot_reserves_preserved_pages(boot_kernel, machine_name: str) -> None:
    """The boot side of a handover: scratch-only memblock, preserved pages reserved."""
    k = boot_kernel(machine_name, memory=64 * MiB, nodes=2)
    k.finish_boot()
    folio = k.buddy.alloc(4)
    k.arena.view(folio)[:4] = b"keep"
    k.kho.preserve_folio(folio, 4)
    scratch_before = list(k.header.scratch)
    k.kexec.prepare({})
    k.shutdown()

    k = boot_kernel(machine_name, cmdline="this is ignored")
    assert k.kho_in is not None and k.boot_timings["handover-parse"] > 0
    assert k.header.scratch == scratch_before
    mm = k.header.memmap_pfn
    assert any(a.start_pfn <= mm < a.end_pfn for a in k.header.scratch)  # memmap came from scratch
    assert k.memmap.head(folio) == (PageState.PRESERVED, 4)
    assert k.buddy.stats().preserved_pages >= 16
    assert k.kho_in.restore_folio(folio) == 4
    assert bytes(k.arena.view(folio)[:4]) == b"keep"
    k.finish_boot()
    s = k.buddy.stats()
    assert s.preserved_pages == 0 and s.used_pages == 16 + k.kho.own_pages
    assert not MachineHeader.read(k.arena).boot_params.valid
    k.buddy.check()
    unmovable = np.array([k.buddy.alloc(0) for _ in range(50)])
    in_scratch = np.zeros(k.arena.npages, bool)
    for start, n in k.scratch_ranges():
        in_scratch[start : start + n] = True
    assert not in_scratch[unmovable].any()
