"""A daemon SIGKILLed under load: `guestfs mount` of the machine clears the dead FUSE
mount, recovers the metadata from the arena by itself, and every file a writer saw
acknowledged (written, fsynced, renamed into place) is there, whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import Mount, MountFactory, is_mounted, wait_pid_gone

WRITER = textwrap.dedent("""
    import os, sys
    top = sys.argv[1]
    for i in range(100000):
        d = os.path.join(top, "d%d" % (i % 7))
        os.makedirs(d, exist_ok=True)
        tmp, final = os.path.join(d, ".tmp%d" % i), os.path.join(d, "f%d" % i)
        with open(tmp, "wb") as f:
            f.write(b"%d:" % i * (1 + i % 3000))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        print(i, flush=True)
""")


@pytest.mark.fuse
@pytest.mark.parametrize("acked_before_kill", [1, 40, 250])
def test_sigkill_of_the_daemon_loses_nothing_acknowledged(mount_factory: MountFactory,
                                                          acked_before_kill: int) -> None:
    m: Mount = mount_factory(memory="128M")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, os.fspath(m.mountpoint)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    acked = []
    try:
        for line in writer.stdout:
            acked.append(int(line))
            if len(acked) >= acked_before_kill:
                os.kill(m.pid, signal.SIGKILL)      # this mount's daemon, by its PID
                break
        assert wait_pid_gone(m.pid, 10)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    for line in writer.stdout:          # what it printed before the kill reached it
        acked.append(int(line))
    writer.stdout.close()
    assert is_mounted(m.mountpoint), "the dead mount should still be there"
    started = time.monotonic()
    again = m.cli("mount", "--machine", m.machine, os.fspath(m.mountpoint))
    recovery_s = time.monotonic() - started
    m.pid = m.status()["pid"]
    assert "dead mount" in again.stderr
    for i in acked:
        path = m.mountpoint / f"d{i % 7}" / f"f{i}"
        assert path.read_bytes() == b"%d:" % i * (1 + i % 3000), path
    assert m.fsck() == []
    print(f"recovered {len(acked)} acknowledged files; mount took {recovery_s:.2f} s")
