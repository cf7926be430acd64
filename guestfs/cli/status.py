"""``guestfs status``: a machine's state, from its daemon or from its header."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from guestfs import control
from guestfs.cli.common import (STATUS_TIMEOUT, CliError, Subparsers,
                                handed_over_generation, machine_at, machine_info,
                                machine_name)
from guestfs.config import control_path
from kho_backend.units import PAGE_SIZE, format_size


def add(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="show a machine's state",
                       description="Show machine, daemon, generation, arena use and inodes "
                       "of a mount, or of a machine (from its header when no daemon runs).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("mountpoint", type=Path, nargs="?", metavar="MOUNTPOINT")
    which.add_argument("--machine", type=machine_name,
                       help="a machine, mounted or not (its header when no daemon runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    """``guestfs status``."""
    machine = args.machine or machine_at(args.mountpoint)
    try:
        status = control.request(control_path(machine), {"op": "status"},
                                 timeout=STATUS_TIMEOUT)
        status.pop("ok")
    except control.ControlError:
        if args.mountpoint is not None:
            raise CliError(f"{args.mountpoint} is a guestfs mount of machine {machine}, "
                           f"but its daemon does not answer") from None
        status = _offline_status(machine)
    print(json.dumps(status, indent=2) if args.json else _format_status(status))
    return 0


def _offline_status(machine: str) -> dict[str, Any]:
    return {"machine": machine, "pid": None, "mountpoint": None,
            "generation": handed_over_generation(machine),
            "arena": machine_info(machine), "inodes": None, "boot_timings_ns": None,
            "last_blackout": None}


def _pages(n: int) -> str:
    return f"{n} pages ({format_size(n * PAGE_SIZE)})"


def _format_status(s: dict[str, Any]) -> str:
    rows = [("machine", s["machine"])]
    if s["pid"] is None:
        rows.append(("daemon", "not running"))
    else:
        rows.append(("daemon", f"pid {s['pid']}, mounted at {s['mountpoint']} ({s['options']}), "
                               f"up {s['uptime_s']} s"))
    rows.append(("generation", "-" if s["generation"] is None else str(s["generation"])))
    arena = s["arena"]
    if s["pid"] is not None:
        rows.append(("arena", f"{arena['path']}, {format_size(arena['size'])}, "
                              f"{arena['nodes']} node(s)"))
        rows.append(("memory", f"{_pages(arena['used_pages'])} used, "
                               f"{_pages(arena['free_pages'])} free for files"))
        rows.append(("inodes", f"{s['inodes']['used']} used, {s['inodes']['free']} free"))
        timings = s["boot_timings_ns"]
        rows.append(("boot", ", ".join(f"{k} {v / 1e6:.1f} ms" for k, v in timings.items())
                     or "-"))
        rows.append(("last blackout", _format_blackout(s["last_blackout"])))
    else:
        rows.append(("arena", f"{arena['path']}, {format_size(arena['size'])}, "
                              f"{arena['nodes']} node(s)"))
        rows.append(("header", f"state {arena['state']}, boot count {arena['boot_count']}, "
                               f"last pid {arena['pid']}"))
        if arena["error"]:
            rows.append(("error", arena["error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _format_blackout(blackout: dict[str, Any] | None) -> str:
    if not blackout:
        return "none"
    phases = ", ".join(f"{k} {v:.1f}" for k, v in blackout["phases"].items())
    return f"{blackout['total_ms']:.1f} ms ({phases})"
