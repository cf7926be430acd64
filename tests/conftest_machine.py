"""Fixtures for the emulated-machine tests; import the ones a test module uses:

    from conftest_machine import machine_env, machine_name, boot_kernel  # noqa: F401

Every test gets its own machine folder under /dev/shm (``GUESTFS_MACHINE_DIR`` points at
it), machine names are unique, and the finalizers shut kernels down and delete the folder
with every arena in it.
"""

from __future__ import annotations

import cProfile
import gc
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.fake_pool import FakePool

from guestfs.filesystem import Filesystem
from kho_backend.boot import Kernel, boot

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
QUICK = os.environ.get("GUESTFS_QUICK_TESTS") == "1"


def python_calls(fn: Callable[[], object]) -> int:
    """The function calls (Python and built-in) `fn` makes: a measure of its work that,
    unlike a clock, does not depend on the machine's speed or load. The garbage collector
    is kept out: finalizers of earlier tests' objects would count as calls."""
    gc.collect()
    gc.disable()
    profile = cProfile.Profile()
    profile.enable()
    try:
        fn()
    finally:
        profile.disable()
        gc.enable()
    return sum(entry.callcount for entry in profile.getstats())


def examples(full: int) -> int:
    """How many hypothesis examples (or rounds) a property test runs: all of them, or a
    quarter in a quick run (``tools/test --quick``)."""
    return max(3, full // 4) if QUICK else full


def unique_name(prefix: str = "t") -> str:
    """A machine name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def machine_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private machine folder, also set as ``$GUESTFS_MACHINE_DIR``; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="gfs-mach-", dir=SHM))
    monkeypatch.setenv("GUESTFS_MACHINE_DIR", os.fspath(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def machine_name() -> str:
    """A unique machine name."""
    return unique_name()


BootKernel = Callable[..., Kernel]


@pytest.fixture
def boot_kernel(machine_env: Path) -> Iterator[BootKernel]:
    """``boot_kernel(name, **boot_kwargs)``: boot() whose kernels are shut down at teardown."""
    kernels: list[Kernel] = []

    def make(name: str, **kwargs: object) -> Kernel:
        kernel = boot(name, **kwargs)
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.shutdown()


def new_fs(kernel: Kernel, **kwargs: object) -> Filesystem:
    """A fresh filesystem on `kernel`'s arena, in a pool of its own (no handover)."""
    return Filesystem.format(kernel.arena, FakePool(kernel.buddy), **kwargs)


def gone(fs: Filesystem, ino: int) -> bool:
    """Whether inode `ino` no longer exists (freed, its record cleared)."""
    return fs.store.get(ino) is None
