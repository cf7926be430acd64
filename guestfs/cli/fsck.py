"""``guestfs fsck``: check every structure of a machine's filesystem."""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Callable

from guestfs import control
from guestfs.cli.common import CliError, Subparsers, machine_option, no_machine, say
from guestfs.config import control_path
from kho_backend import machine as kmachine
from kho_backend.errors import HandoverError

#: As fsck(8): 0 no problem found, 4 problems left uncorrected.
EXIT_PROBLEMS = 4


def add(sub: Subparsers) -> None:
    p = sub.add_parser("fsck", help="check every structure of a machine's filesystem",
                       description="Read and check every page of the filesystem's metadata "
                       "(checksums, the inode table, directories, link counts, page maps, "
                       "which pages the pool owns) and report what is wrong; nothing is "
                       "repaired. A mounted machine is checked by its daemon, live; an "
                       "unmounted one is booted, recovered as a mount would, checked and "
                       "handed over again. Exit status 0: clean; 4: problems found; 1: the "
                       "check could not run.")
    machine_option(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run_fsck)


def run_fsck(args: argparse.Namespace) -> int:
    """``guestfs fsck``."""
    try:
        problems = control.request(control_path(args.machine), {"op": "check"}, timeout=None)[
            "problems"]
        where = "mounted"
    except control.NoDaemon:
        problems = _check_offline(args.machine)
        where = "not mounted"
    if args.json:
        print(json.dumps({"machine": args.machine, "problems": problems}))
    else:
        for problem in problems:
            print(problem)
        print(f"machine {args.machine} ({where}): "
              f"{len(problems) or 'no'} problem{'s' if len(problems) != 1 else ''}")
    return EXIT_PROBLEMS if problems else 0


def _check_offline(machine: str) -> list[str]:
    if not kmachine.machine_exists(machine):
        raise CliError(no_machine(machine))
    say(f"booting machine {machine} to check its filesystem…")
    from guestfs.session import Options, Session   # heavy: only when no daemon runs

    ctrl_c = _CtrlC()
    previous = signal.signal(signal.SIGINT, ctrl_c.handle)
    try:
        try:
            session = Session.open(Options(machine, restore_only=True))
        except HandoverError as e:
            raise CliError(f"the filesystem of machine {machine} cannot be opened: {e}") from None
        try:
            problems = ctrl_c.cancellable(session.fs.check)
            session.hand_over({}, for_exec=False)
        finally:
            session.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    if problems is None:
        raise KeyboardInterrupt     # the check was cancelled; the arena is as it was
    return problems


class _CheckCancelled(BaseException):
    """Raised by Ctrl-C in the check only (a BaseException, as KeyboardInterrupt)."""


class _CtrlC:
    """Ctrl-C during an offline check cancels the check itself, which only reads; one
    during the boot or the handover that follows waits for it, so that the machine is
    left handed over as it was, never as a kernel that crashed."""

    def __init__(self) -> None:
        self.pressed = False
        self._cancellable = False

    def handle(self, signum: int, frame: object) -> None:
        self.pressed = True
        if self._cancellable:
            self._cancellable = False
            raise _CheckCancelled

    def cancellable(self, check: Callable[[], list[str]]) -> list[str] | None:
        """`check`'s result, or None if Ctrl-C cancelled it (or came before it)."""
        try:
            self._cancellable = not self.pressed
            if not self._cancellable:
                return None
            problems = check()
            self._cancellable = False
            return problems
        except _CheckCancelled:
            return None
