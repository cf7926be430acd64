"""Fixtures for the emulated-machine tests; import the ones a test module uses:

    from conftest_machine import machine_env, machine_name, boot_kernel  # noqa: F401

Every test gets its own machine folder under /dev/shm (``GUESTFS_MACHINE_DIR`` points at
it), machine names are unique, and the finalizers shut kernels down and delete the folder
with every arena in it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kho_backend.boot import Kernel, boot

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


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
