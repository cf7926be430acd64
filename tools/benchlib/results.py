"""Everything one run measured, and its JSON form (bench.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from benchlib.kexec import TreeResult
from benchlib.model import Table
from benchlib.poison import PoisonResult
from benchlib.profiles import Profile
from benchlib.shell import shell_targets
from benchlib.targets import TargetResult, evaluate

SYSTEMS = {"tmpfs": "kernel tmpfs", "ceiling": "pyfuse3 ceiling",
           "example": "pyfuse3 tmpfs example", "guestfs": "guestfs"}


@dataclass
class Results:
    """One benchmark run."""

    profile: Profile
    command: str
    started: str                        # ISO 8601, UTC
    host: dict[str, Any]
    duration_s: float = 0.0
    python_startup_ms: float | None = None
    datapath: Table = field(default_factory=Table)
    metadata: Table = field(default_factory=Table)
    shell: Table = field(default_factory=Table)
    trees: list[TreeResult] = field(default_factory=list)
    poison: PoisonResult = field(default_factory=PoisonResult)
    errors: list[str] = field(default_factory=list)  # suites that failed, and why

    def targets(self) -> list[TargetResult]:
        return (evaluate(self.profile, self.datapath, self.metadata, self.trees,
                         self.python_startup_ms, self.poison)
                + shell_targets(self.shell))

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command, "started": self.started, "duration_s": self.duration_s,
            "profile": dataclasses.asdict(self.profile), "host": self.host,
            "systems": SYSTEMS, "python_startup_ms": self.python_startup_ms,
            "datapath": self.datapath.to_json(), "metadata": self.metadata.to_json(),
            "shell": self.shell.to_json(),
            "kexec": [t.to_json() for t in self.trees], "poison": self.poison.to_json(),
            "targets": [t.to_json() for t in self.targets()], "errors": self.errors,
        }
