"""QEMU for the VM demo: the command line, its QMP monitor, and its serial console.

Guest RAM is a ``memory-backend-file`` with ``share=on`` on the guestfs mount, so the
RAM lives in the filesystem and is left out of the migration stream
(``x-ignore-shared``): saving the VM writes only device state.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import Failure
from clients.procs import Child

QMP_TIMEOUT = 60.0
POLL = 0.005  # seconds between two status polls (the pause is measured in ms)


@dataclass(frozen=True)
class VmConfig:
    """What both QEMU processes (before and after the kexec) share."""

    kernel: Path
    initrd: Path
    ram_mb: int
    ram_path: Path  # the memory-backend file, on the mount
    fill_mb: int  # random data the guest writes to (and checks in) its RAM

    @property
    def state_path(self) -> Path:
        """Where the device state is saved, beside the RAM on the mount."""
        return self.ram_path.with_name("vm0.state")

    def argv(self, qmp: Path, *, incoming: bool) -> list[str]:
        """The QEMU command line; `incoming` waits (paused) for a deferred migration."""
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-smp", "1", "-nodefaults",
                "-machine", "q35,memory-backend=mem", "-m", f"{self.ram_mb}M",
                "-object", f"memory-backend-file,id=mem,size={self.ram_mb}M,"
                           f"mem-path={self.ram_path},share=on",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", f"console=ttyS0 quiet panic=-1 fill_mb={self.fill_mb}",
                "-display", "none", "-serial", "stdio", "-no-reboot",
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        return argv + (["-incoming", "defer", "-S"] if incoming else [])


class Qmp:
    """A QMP connection: one command at a time, events skipped."""

    def __init__(self, path: Path, child: Child) -> None:
        deadline = time.monotonic() + QMP_TIMEOUT
        while True:  # QEMU creates the socket shortly after it starts
            try:
                self._sock = socket.socket(socket.AF_UNIX)
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if not child.running() or time.monotonic() > deadline:
                    raise Failure(f"QEMU's QMP socket {path} did not open") from None
                time.sleep(0.02)
        self._sock.settimeout(QMP_TIMEOUT)
        self._file = self._sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise Failure("QEMU closed its QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command`; its ``return`` value, or `Failure` with QEMU's error."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise Failure(f"QMP {command}: {reply['error'].get('desc')}")

    def leave_out_shared_ram(self) -> None:
        """Keep the shared, file-backed guest RAM out of the migration stream."""
        self.execute("migrate-set-capabilities",
                     capabilities=[{"capability": "x-ignore-shared", "state": True}])

    def wait(self, query: str, key: str, wanted: str, timeout: float = QMP_TIMEOUT) -> None:
        """Poll ``query`` until its `key` is `wanted`; `Failure` on failed or timeout."""
        deadline = time.monotonic() + timeout
        while (value := self.execute(query).get(key)) != wanted:
            if value == "failed" or time.monotonic() > deadline:
                raise Failure(f"{query}: {key} is {value!r}, waiting for {wanted!r}")
            time.sleep(POLL)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class SerialConsole:
    """The guest's serial console as one stream of lines across QEMU processes: each
    QEMU's stdout is read by a thread, and a line cut by a QEMU's exit is completed by
    the next one's output."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        #: When each line arrived (time.monotonic), for the gaps between the guest's ticks.
        self.arrived: list[float] = []
        self._partial = ""
        self._cond = threading.Condition()
        self._child: Child | None = None

    def attach(self, child: Child) -> threading.Thread:
        """Start reading `child`'s stdout; the thread ends at its EOF."""
        self._child = child
        thread = threading.Thread(target=self._pump, args=(child,), daemon=True)
        thread.start()
        return thread

    def _pump(self, child: Child) -> None:
        assert child.proc.stdout is not None
        while chunk := os.read(child.proc.stdout.fileno(), 65536):
            text = self._partial + chunk.decode(errors="replace").replace("\r", "")
            *complete, self._partial = text.split("\n")
            with self._cond:
                self.lines += complete
                self.arrived += [time.monotonic()] * len(complete)
                self._cond.notify_all()

    def send(self, line: str) -> None:
        """Type `line` on the guest's console."""
        assert self._child is not None and self._child.proc.stdin is not None
        self._child.proc.stdin.write(line.encode() + b"\n")
        self._child.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, re.Match[str]]:
        """The first line from index `start` on matching `pattern` (index, match)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                for index in range(index, len(self.lines)):
                    if match := regex.search(self.lines[index]):
                        return index, match
                index = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"the guest did not print /{pattern}/ within {timeout:.0f} s;"
                                  f" last lines: {self.lines[-5:]}")
                self._cond.wait(left)
