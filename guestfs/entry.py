"""The ``guestfs`` console script.

Loading the command line imports much (pyfuse3, trio, numpy): a Ctrl-C meanwhile ends
the command with one line, not a traceback. Nothing has happened yet at that point.
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
