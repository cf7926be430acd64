"""``guestfs machine list|destroy``."""

from __future__ import annotations

import argparse
import json
import os

from guestfs import mounts
from guestfs.cli.common import (CliError, Parser, Subparsers, info_dict, machine_name,
                                no_machine, say)
from guestfs.config import control_path, log_path
from kho_backend import machine as kmachine
from kho_backend.units import format_size


def add(sub: Subparsers) -> None:
    p = sub.add_parser("machine", help="list or destroy machines",
                       description="Machines are arenas in the machine folder "
                       f"({kmachine.machine_dir()}); their files live there until destroyed.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    ls = verbs.add_parser("list", help="list the machines and where they are mounted",
                          description="List every machine with its size, state and mount.")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(func=run_machine_list)
    rm = verbs.add_parser("destroy", help="delete a machine and every file in it",
                          description="Delete a machine's arena, and with it every file "
                          "it holds. Refused while the machine is mounted or in use.")
    rm.add_argument("name", type=machine_name, metavar="NAME")
    rm.set_defaults(func=run_machine_destroy)


def run_machine_list(args: argparse.Namespace) -> int:
    """``guestfs machine list``."""
    rows = []
    for info in kmachine.list_machines():
        entry = mounts.mount_of_machine(info.name)
        rows.append({"machine": info.name, **info_dict(info),
                     "mountpoint": os.fspath(entry.mountpoint) if entry else None})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        say(f"no machines in {kmachine.machine_dir()}")
    else:
        print(f"{'MACHINE':<24} {'SIZE':>8} {'STATE':<12} {'PID':>8}  MOUNTPOINT")
        for r in rows:
            pid = r["pid"] if r["in_use"] else None     # not the pid of an ended kernel
            print(f"{r['machine']:<24} {format_size(r['size']):>8} {r['state'] or '?':<12} "
                  f"{pid or '-':>8}  {r['mountpoint'] or '-'}")
    return 0


def run_machine_destroy(args: argparse.Namespace) -> int:
    """``guestfs machine destroy``."""
    entry = mounts.mount_of_machine(args.name)
    if entry is not None:
        raise CliError(f"machine {args.name} is mounted at {entry.mountpoint}; "
                       f"run 'guestfs umount {entry.mountpoint}' first")
    leftovers = [p for p in (log_path(args.name), control_path(args.name))
                 if os.path.lexists(p)]
    if kmachine.machine_exists(args.name):
        kmachine.destroy_machine(args.name)
    elif not leftovers:
        raise CliError(no_machine(args.name))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    say(f"machine {args.name} destroyed")
    return 0
