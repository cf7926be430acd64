"""The ``guestfs`` command line: one module per command, each with ``add`` (its parser,
with ``func`` set to what runs it), and the options and errors they share in `common`.

Exit codes: 0 success, 1 failure (the reason on stderr as ``guestfs: <message>``),
2 usage error, 4 problems found (``fsck``), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from guestfs import __version__, control
from guestfs.cli import filefrag, fsck, kexec, kho, machine, mount, status, umount
from guestfs.cli.common import CarriesOn, CliError, Parser, say
from guestfs.config import StartError
from kho_backend.errors import MachineError

COMMANDS = (mount, umount, status, kexec, filefrag, fsck, machine, kho)


def build_parser() -> Parser:
    """The whole command line."""
    parser = Parser(prog="guestfs", description=(
        "A persistent in-memory FUSE filesystem whose pages live in an emulated "
        "machine's memory and survive a simulated kexec."))
    parser.add_argument("--version", action="version", version=f"guestfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guestfs`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
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
