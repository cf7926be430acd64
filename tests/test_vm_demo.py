"""tools/vm-demo with a small guest: after a guestfs kexec the guest goes on with the
next tick, the same boot id, unbroken uptime and the same RAM checksum."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

TOOL = Path(__file__).resolve().parents[1] / "tools" / "vm-demo"


def test_vm_continues_across_kexec(cli_env: dict[str, str], machine_dir: Path) -> None:
    # About 15 s on these machines; the first run may install QEMU and a kernel.
    proc = subprocess.run([str(TOOL), "--memory", "256M"], env=cli_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "guest continued: ok" in proc.stdout, proc.stdout
    assert not list(machine_dir.glob("vmdemo-*")), "the demo left its machine behind"
