"""``guestfs umount``: hand the filesystem over into the arena, unmount, wait for the
daemon to end."""

from __future__ import annotations

import argparse
import os
import select
import time
from pathlib import Path

from guestfs import control, mounts
from guestfs.cli.common import (STATUS_TIMEOUT, CarriesOn, CliError, Subparsers, machine_at,
                                say, unmount_dead)
from guestfs.config import control_path

DAEMON_EXIT_TIMEOUT = 120.0  # seconds `umount` waits for the daemon once unmounted


def add(sub: Subparsers) -> None:
    p = sub.add_parser("umount", help="unmount cleanly and wait for the daemon to end",
                       description="Unmount a guestfs mount (refused while files are open "
                       "there) and wait until its daemon has ended.")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=run_umount)


def run_umount(args: argparse.Namespace) -> int:
    """``guestfs umount``."""
    entry = mounts.mount_at(args.mountpoint)
    if entry is not None and entry.shield_of is not None:
        # A shield whose daemon ended before its next kernel could mount over it.
        mounts.uncover(args.mountpoint, entry.shield_of)
        say(f"removed the shield of machine {entry.shield_of} left at {args.mountpoint}")
        return 0
    machine = machine_at(args.mountpoint)
    sock = control_path(machine)
    try:
        pid = control.request(sock, {"op": "status"}, timeout=STATUS_TIMEOUT)["pid"]
    except control.NoDaemon:
        say(f"no daemon answers for machine {machine}; unmounting the dead mount "
            f"{args.mountpoint}")
        unmount_dead(args.mountpoint, machine)
        return 0
    # Opened before asking, so the wait cannot pick up another process that reuses the PID.
    pidfd = os.pidfd_open(pid)
    try:
        try:
            control.request(sock, {"op": "umount"}, timeout=None)
        except control.ControlError:
            if _still_mounted(args.mountpoint, machine):
                raise
            # Unmounted, and the daemon left before it could answer: that is fine.
        _wait_exit(pidfd, pid)
    except KeyboardInterrupt:
        raise CarriesOn(f"the unmount of {args.mountpoint} carries on in daemon pid {pid}; "
                        f"'guestfs status --machine {machine}' shows when it is done") from None
    finally:
        os.close(pidfd)
    return 0


def _wait_exit(pidfd: int, pid: int) -> None:
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
    told = False
    while not select.select([pidfd], [], [], 1.0)[0]:
        if time.monotonic() > deadline:
            raise CliError(f"unmounted, but daemon {pid} has not ended after "
                           f"{DAEMON_EXIT_TIMEOUT:.0f} s")
        if not told:
            say(f"waiting for daemon {pid} to end…")
            told = True


def _still_mounted(mountpoint: Path, machine: str) -> bool:
    entry = mounts.mount_at(mountpoint)
    return entry is not None and entry.machine == machine

