"""The ``guestfs`` console script.

Loading the command line takes a few tens of milliseconds (the daemon's heavy modules,
pyfuse3, trio and numpy, load only where used): a Ctrl-C meanwhile ends the command with
one line, not a traceback. Nothing has happened yet at that point.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run the ``guestfs`` command line; the exit code."""
    try:
        from guestfs.cli import main as cli_main
    except KeyboardInterrupt:
        print("guestfs: interrupted; nothing was changed", file=sys.stderr)
        return 130
    return cli_main()
