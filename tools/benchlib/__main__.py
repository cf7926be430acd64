"""``python -m benchlib``: the benchmark command (``tools/bench`` runs this)."""

import sys

from benchlib.cli import main

sys.exit(main())
