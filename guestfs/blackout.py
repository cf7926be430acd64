"""The blackout of a kexec: how long the filesystem did not answer, by phase.

The old kernel records its phases in the ``kexec-metadata`` subtree; the next one adds
the exec (from the exec time across it), its boot, restore and mount. When the next
kernel boots in the same process (the mount kept), there is no unmount or teardown,
``exec`` is the switch (the old kernel closed, the exec time stamped) and ``mount`` the
FUSE connection's adoption; with an exec, ``exec`` is the next image's Python start-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # `guestfs kexec` prints a Blackout without loading the kernel's code
    from kho_backend.kexec_metadata import KexecMetadata

# Every phase of a kexec, in the order they happen; up to poison in the old kernel.
PHASES = ("quiesce", "serialize", "finalize", "boot-params", "unmount", "teardown",
          "poison", "exec", "boot", "restore", "mount")


@dataclass(frozen=True)
class Blackout:
    """How long the filesystem did not answer across one kexec, by phase (ms)."""

    phases: dict[str, float]

    @property
    def total_ms(self) -> float:
        return sum(self.phases.values())

    @classmethod
    def measure(cls, metadata: KexecMetadata, started_ns: int, boot_ns: int,
                restore_ns: int, mount_ns: int) -> Blackout:
        """The blackout of the kexec that booted this kernel (`metadata`).

        The old kernel's phases come from kexec-metadata; ``exec`` is the time from its
        exec time stamp (wall clock, shared across the exec) to the start of our boot:
        almost all Python start-up after an exec, well under a millisecond in the same
        process; then boot, restore and mount as measured here.
        """
        ms = {name: ns / 1e6 for name, ns in metadata.phases.items() if name in PHASES}
        ms["exec"] = max(0, started_ns - metadata.exec_time_ns) / 1e6
        ms["boot"] = boot_ns / 1e6
        ms["restore"] = restore_ns / 1e6
        ms["mount"] = mount_ns / 1e6
        return cls({name: round(ms[name], 3) for name in PHASES if name in ms})

    def as_dict(self) -> dict:
        return {"total_ms": round(self.total_ms, 3), "phases": self.phases}

    def table(self) -> str:
        """One line per phase with its share of the whole."""
        total = self.total_ms or 1.0
        return "\n".join(f"  {name:<12} {ms:9.1f} ms  {100 * ms / total:5.1f} %"
                         for name, ms in self.phases.items())


def elapsed_ns(since: int) -> int:
    """Nanoseconds since the `time.perf_counter_ns` reading `since`."""
    return time.perf_counter_ns() - since
