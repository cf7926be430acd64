"""``guestfs mount``: boot a kernel on a machine and mount its filesystem."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from guestfs import background, control, mounts
from guestfs.cli.common import (STATUS_TIMEOUT, CarriesOn, Subparsers, machine_option,
                                mount_options, positive, say, size, unmount_dead)
from guestfs.config import DEFAULT_MEMORY, DaemonConfig, MountOptions, control_path
from kho_backend import machine as kmachine
from kho_backend.units import format_size


def add(sub: Subparsers) -> None:
    p = sub.add_parser("mount", help="boot a kernel on a machine and mount its filesystem",
                       description="Boot a kernel on the machine (creating its arena on first "
                       "use) and mount its filesystem. Returns once the mount is live; the "
                       "daemon runs in the background unless -f.")
    machine_option(p)
    p.add_argument("--memory", type=size, metavar="SIZE",
                   help=f"arena size when the machine is created, e.g. 256M, 4G "
                        f"(default {format_size(DEFAULT_MEMORY)})")
    p.add_argument("--nodes", type=positive, metavar="N",
                   help="NUMA nodes when the machine is created (default 1)")
    p.add_argument("-o", dest="options", type=mount_options, default=MountOptions(),
                   metavar="OPTIONS", help="comma-separated mount options: allow_other, ro, "
                   "rw, nosuid, nodev, noexec, noatime, ... (default_permissions is always on)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="run the daemon in this process, logging to stderr")
    p.add_argument("-d", "--debug", action="store_true",
                   help="debug logging, including FUSE requests (implies -f)")
    p.add_argument("--format", action="store_true",
                   help="format a fresh filesystem even over an arena whose last kernel crashed")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by start_background
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=run_mount)


def run_mount(args: argparse.Namespace) -> int:
    """``guestfs mount``."""
    config = DaemonConfig(machine=args.machine, mountpoint=args.mountpoint,
                          memory=args.memory, nodes=args.nodes, options=args.options,
                          format=args.format, debug=args.debug)
    if args.foreground or args.debug:
        _log_to_stderr(args.debug)
        if args.ready_fd is None:
            background.check_machine_files(config)
        from guestfs import daemon   # the daemon's own imports (pyfuse3, trio): only here
        return daemon.run_foreground(config, args.ready_fd)
    _warn_above_ram(config)
    _clear_dead_mount(config)
    try:
        background.start_background(config, progress=say)
    except background.StillStarting as e:
        raise CarriesOn(f"the daemon (pid {e.pid}) goes on mounting {args.mountpoint}; "
                        f"'guestfs status --machine {args.machine}' shows when it is "
                        f"live, 'guestfs umount {args.mountpoint}' stops it") from None
    return 0


def _clear_dead_mount(config: DaemonConfig) -> None:
    """The machine's last daemon died (SIGKILL, OOM) and left its FUSE mount behind,
    answering ENOTCONN: unmount it, so that the new daemon mounts there and recovers."""
    entry = mounts.mount_at(config.mountpoint)
    if entry is None or config.machine not in (entry.machine, entry.shield_of):
        return
    try:
        control.request(control_path(config.machine), {"op": "status"},
                        timeout=STATUS_TIMEOUT)
    except control.NoDaemon:
        say(f"the last daemon of machine {config.machine} is gone; unmounting its dead "
            f"mount {config.mountpoint}")
        unmount_dead(config.mountpoint, config.machine)


def _warn_above_ram(config: DaemonConfig) -> None:
    """An arena larger than RAM works (it is a sparse file) until it is filled."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if config.memory and config.memory > ram and not kmachine.machine_exists(config.machine):
        say(f"warning: {format_size(config.memory)} of memory is more than this machine's "
            f"{format_size(ram)} of RAM; filling it will fail")


def _log_to_stderr(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
