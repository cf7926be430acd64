"""The ``guestfs`` command line: one module per command, each with ``add`` (its parser,
with ``func`` set to what runs it), and the options and errors they share in `common`.

``guestfs MACHINE MOUNTPOINT -o OPTIONS`` (the form ``mount.fuse3`` runs for
``mount -t fuse.guestfs``) is ``guestfs mount``; see `mount.helper_argv`.

Exit codes: 0 success, 1 failure (the reason on stderr as ``guestfs: <message>``),
2 usage error, 4 problems found (``fsck``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from guestfs import __version__, control
from guestfs.cli import filefrag, fsck, kexec, kho, machine, mount, status, umount
from guestfs.cli.common import CarriesOn, CliError, Parser, say
from guestfs.config import StartError
from kho_backend.errors import MachineError

COMMANDS = (mount, umount, status, kexec, filefrag, fsck, machine, kho)
COMMAND_NAMES = frozenset(c.__name__.rsplit(".", 1)[1] for c in COMMANDS)


def build_parser() -> Parser:
    """The whole command line."""
    parser = Parser(prog="guestfs", description=(
        "A persistent in-memory FUSE filesystem whose pages live in an emulated "
        "machine's memory and survive a simulated kexec."), epilog=(
        f"'{mount.HELPER_USAGE}' (what 'mount -t fuse.guestfs' and /etc/fstab run) is "
        "'guestfs mount --machine MACHINE', with memory=SIZE and nodes=N among the options. "
        "The manual: man 1 guestfs."))
    parser.add_argument("--version", action="version", version=f"guestfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guestfs`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _helper_form(argv):
        try:
            argv = mount.helper_argv(argv)
        except CliError as e:
            Parser(prog="guestfs", usage=mount.HELPER_USAGE).error(str(e))
    args = build_parser().parse_args(argv)
    _leave_working_directory(args)
    try:
        return args.func(args)
    except (CliError, MachineError, StartError, control.ControlError) as e:
        say(str(e))
        return 1
    except BrokenPipeError:
        # The reader went away (``guestfs kho dump | head``): stop quietly, as a
        # process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # e.g. an output file that cannot be written
        say(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        return 1
    except CarriesOn as e:
        say(f"interrupted; {e}")
        return 130
    except KeyboardInterrupt:
        say("interrupted; nothing was changed")
        return 130


def _leave_working_directory(args: argparse.Namespace) -> None:
    """Make the command's paths absolute and move to ``/``: a command run from inside a
    mount must not keep that mount busy (``umount`` and ``kexec`` would name it among
    the processes using it), and a daemon started from there must not pin it."""
    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, value.absolute())
        elif isinstance(value, list) and all(isinstance(v, Path) for v in value):
            setattr(args, name, [v.absolute() for v in value])
    os.chdir("/")


def _helper_form(argv: Sequence[str]) -> bool:
    """Whether `argv` is ``MACHINE MOUNTPOINT -o OPTIONS`` (mount(8) always passes
    options): its first word is neither a switch nor a command, and ``-o`` follows.
    Without ``-o`` a mistyped command stays a usage error, not a new machine."""
    return (bool(argv) and not argv[0].startswith("-") and argv[0] not in COMMAND_NAMES
            and any(a.startswith("-o") for a in argv[1:]))
