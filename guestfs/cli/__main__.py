"""``python -m guestfs.cli``: the command line (the daemon's own image runs this way)."""

import sys

from guestfs.cli import main

sys.exit(main())
