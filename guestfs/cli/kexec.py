"""``guestfs kexec``: hand the mounted filesystem over to the next kernel."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from guestfs import control
from guestfs.blackout import Blackout
from guestfs.cli.common import (STATUS_TIMEOUT, CarriesOn, CliError, Subparsers,
                                kernel_cmdline, machine_at, say)
from guestfs.config import control_path, log_path

KEXEC_TIMEOUT = 300.0  # seconds to wait for the next kernel to mount (a huge restore)


def add(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kexec", help="hand the mounted filesystem over to a new kernel (simulated kexec)",
        description="Quiesce the mount (flush the kernel's dirty pages, hold new requests, "
        "let in-flight ones finish), finalize KHO (the filesystem lives in a preserved pool "
        "already: nothing is serialized or copied), then boot the next kernel in the "
        "daemon's own process (same PID, modules already loaded): it boots from scratch "
        "memory, takes the pool back, opens the filesystem where it is and takes the FUSE "
        "connection over, so the mount stays, open files keep working and requests wait "
        "instead of failing. With --exec (or when the code on disk changed) the mount is "
        "dropped and the next kernel image is exec'd instead, and mounts again. Returns "
        "when the next kernel serves and prints the blackout by phase. Any failure before "
        "the handover aborts: the filesystem serves as before.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--load-only", action="store_true",
                      help="only stage the next kernel (like kexec -l); a later plain "
                      "'guestfs kexec' executes it")
    mode.add_argument("--abort", action="store_true",
                      help="unstage a kernel staged with --load-only")
    p.add_argument("--poison", action="store_true",
                   help="before the next kernel boots, overwrite every page that is neither "
                   "preserved nor scratch with 0xAA, so that reliance on unpreserved memory "
                   "shows")
    p.add_argument("--exec", action="store_true",
                   help="exec a fresh next kernel image (new interpreter, modules loaded "
                   "anew) and mount again, instead of booting it in the daemon's process")
    p.add_argument("--force", action="store_true",
                   help="with --exec: go on although processes use files on the mount "
                   "(they then see errors)")
    p.add_argument("--cmdline", metavar="ARGS", type=kernel_cmdline,
                   help="the next kernel's command line: kho=on|off, kho_scratch=N%% or "
                   "LOW,GLOBAL,PERNODE, kho_poison")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=run_kexec)


def run_kexec(args: argparse.Namespace) -> int:
    """``guestfs kexec``."""
    machine = machine_at(args.mountpoint)
    try:
        return _kexec(args, control_path(machine))
    except control.NoDaemon:
        raise CliError(f"{args.mountpoint} is a guestfs mount of machine {machine}, but its "
                       f"daemon is gone: 'guestfs umount {args.mountpoint}' clears the dead "
                       "mount and 'guestfs mount' brings the files back") from None


def _kexec(args: argparse.Namespace, sock: Path) -> int:
    extra = {"cmdline": args.cmdline} if args.cmdline is not None else {}
    if args.load_only:
        control.request(sock, {"op": "kexec-load", **extra})
        say("next kernel loaded; 'guestfs kexec' executes it")
        return 0
    if args.abort:
        control.request(sock, {"op": "kexec-unload"})
        say("next kernel unloaded")
        return 0
    before = control.request(sock, {"op": "status"}, timeout=STATUS_TIMEOUT)
    started = time.monotonic()
    say(f"kexec of machine {before['machine']} (generation {before['generation']})…")
    try:
        for warning in _request_kexec(sock, {"op": "kexec", "poison": args.poison,
                                             "exec": args.exec, "force": args.force,
                                             **extra}):
            say(f"warning: {warning}")
        after = _await_next_kernel(sock, before)
    except KeyboardInterrupt:
        raise CarriesOn(f"the kexec of {args.mountpoint} carries on in daemon pid "
                        f"{before['pid']}; 'guestfs status {args.mountpoint}' shows its "
                        "generation and last blackout once it is done") from None
    os.stat(args.mountpoint)          # the new mount answers
    after["client_ms"] = round((time.monotonic() - started) * 1e3, 3)
    if args.json:
        print(json.dumps({"generation": after["generation"], "pid": after["pid"],
                          "blackout_ms": after["last_blackout"]["total_ms"],
                          "phases": after["last_blackout"]["phases"],
                          "client_ms": after["client_ms"]}))
    else:
        print(_blackout_table(after))
    return 0


def _request_kexec(sock: Path, request: dict[str, Any]) -> list[str]:
    """Ask for the kexec; the warnings of its quiesce (none if no answer came)."""
    try:
        return list(control.request(sock, request, timeout=KEXEC_TIMEOUT).get("warnings", []))
    except control.DaemonRefused:
        raise
    except control.ControlError:
        # The daemon may exec before its answer is out: the next kernel's status tells.
        return []


def _await_next_kernel(sock: Path, before: dict[str, Any]) -> dict[str, Any]:
    """The next kernel's status once it serves the mount (same PID, next generation)."""
    deadline = time.monotonic() + KEXEC_TIMEOUT
    while time.monotonic() < deadline:
        try:
            status = control.request(sock, {"op": "status"}, timeout=STATUS_TIMEOUT)
        except control.ControlError:
            status = None
        if status and status["generation"] > before["generation"] and status["last_blackout"]:
            if status["pid"] != before["pid"]:
                raise CliError(f"the next kernel runs as pid {status['pid']}, not "
                               f"{before['pid']}")
            return status
        if status is None and not _alive(before["pid"]):
            raise CliError(f"the daemon (pid {before['pid']}) ended during the kexec; see "
                           f"{log_path(before['machine'])}")
        time.sleep(0.005)
    raise CliError(f"the next kernel did not mount within {KEXEC_TIMEOUT:.0f} s; see "
                   f"{log_path(before['machine'])}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _blackout_table(status: dict[str, Any]) -> str:
    blackout = status["last_blackout"]
    return "\n".join([
        f"kexec done: machine {status['machine']}, pid {status['pid']}, generation "
        f"{status['generation']}",
        f"blackout {blackout['total_ms']:.1f} ms (as seen by this command: "
        f"{status['client_ms']:.1f} ms)",
        Blackout(blackout["phases"]).table()])
