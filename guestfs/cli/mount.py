"""``guestfs mount``: boot a kernel on a machine and mount its filesystem; and the
form ``mount(8)`` uses, ``guestfs MACHINE MOUNTPOINT -o OPTIONS``.

``mount -t fuse.guestfs MACHINE DIR -o memory=1G,allow_other`` (or the same line in
/etc/fstab) runs ``mount.fuse3``, which runs ``guestfs MACHINE DIR -o rw,memory=1G,...``
through ``/bin/sh`` with the shell's default search path (so set-up links ``guestfs``
into /usr/local/bin). `helper_argv` turns that into ``guestfs mount``.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from guestfs import background, control, mounts
from guestfs.cli.common import (STATUS_TIMEOUT, CarriesOn, CliError, Subparsers,
                                machine_option, memory_size, mount_options, positive, say,
                                unmount_dead)
from guestfs.config import DEFAULT_MEMORY, DaemonConfig, MountOptions, control_path
from kho_backend import machine as kmachine
from kho_backend.units import format_size

#: ``-o`` words of the mount(8) form that are ``guestfs mount`` options, not mount options.
HELPER_WORDS = {"memory": "--memory", "nodes": "--nodes"}
HELPER_USAGE = "guestfs MACHINE MOUNTPOINT -o OPTIONS"
STOPPING_TIMEOUT = 10.0  # seconds a mount waits for the machine's last daemon to end


def add(sub: Subparsers) -> None:
    p = sub.add_parser("mount", help="boot a kernel on a machine and mount its filesystem",
                       description="Boot a kernel on the machine (creating its arena on first "
                       "use) and mount its filesystem. Returns once the mount is live; the "
                       "daemon runs in the background unless -f.")
    machine_option(p)
    p.add_argument("--memory", type=memory_size, metavar="SIZE",
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
    _check_mountpoint(args.mountpoint)
    _warn_above_ram(config)
    _await_stopping_daemon(config.machine)    # first: its shield is not a dead mount
    _clear_dead_mount(config)
    try:
        background.start_background(config, progress=say)
    except background.StillStarting as e:
        raise CarriesOn(f"the daemon (pid {e.pid}) goes on mounting {args.mountpoint}; "
                        f"'guestfs status --machine {args.machine}' shows when it is "
                        f"live, 'guestfs umount {args.mountpoint}' stops it") from None
    return 0


def helper_argv(argv: Sequence[str]) -> list[str]:
    """``MACHINE MOUNTPOINT [-o OPTIONS]...`` (what ``mount.fuse3`` runs) as the arguments
    of ``guestfs mount``: ``memory=SIZE`` and ``nodes=N`` become ``--memory`` and
    ``--nodes``, every other word stays a mount option. `CliError` for anything else."""
    positional: list[str] = []
    options: list[str] = []
    words = iter(argv)
    for arg in words:
        if arg == "-o":
            value = next(words, None)
            if value is None:
                raise CliError("-o needs a value")
            options += value.split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg.startswith("-"):
            raise CliError(f"unknown switch {arg!r}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise CliError("expected a machine and a mount point")
    machine, mountpoint = positional
    out = ["mount", "--machine", machine]
    rest = []
    for word in filter(None, (w.strip() for w in options)):
        key, eq, value = word.partition("=")
        if eq and key in HELPER_WORDS:
            out += [HELPER_WORDS[key], value]
        else:
            rest.append(word)
    if rest:
        out += ["-o", ",".join(rest)]
    return out + [mountpoint]


def _check_mountpoint(path: Path) -> None:
    """A missing mount point fails here, before a daemon starts (which checks it again,
    with the rest: that it is no guestfs mount already)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CliError(f"mount point {path} does not exist") from None
    except OSError:
        return     # a dead mount (ENOTCONN) is cleared below, the rest the daemon names
    if not stat.S_ISDIR(st.st_mode):
        raise CliError(f"mount point {path} is not a directory")


def _await_stopping_daemon(machine: str) -> None:
    """After a plain ``umount`` the daemon hands over once the mount is gone, while
    ``umount`` has already returned: give it the moment it needs, rather than refuse
    the machine as in use. A daemon that holds the machine without a mount is one
    that stops (or one that starts: then the daemon's own refusal follows)."""
    started = time.monotonic()
    told = False
    while _held_unmounted(machine):
        waited = time.monotonic() - started
        if waited > STOPPING_TIMEOUT:
            return
        if waited > 1.0 and not told:
            say(f"waiting for the last daemon of machine {machine} to finish its handover…")
            told = True
        time.sleep(0.02)


def _held_unmounted(machine: str) -> bool:
    if not kmachine.machine_exists(machine) or mounts.mount_of_machine(machine) is not None:
        return False
    return any(info.name == machine and info.alive for info in kmachine.list_machines())


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
