"""A guestfs daemon with a fault on purpose, for the tests of what a failure does.

    python faulty_daemon.py FAULT MACHINE MOUNTPOINT MEMORY

runs the daemon in the foreground, as ``guestfs mount -f`` would (log on stderr). FAULT
is a handover phase (`guestfs.session.Fault`): the first handover fails there (an
explicit argument of the daemon; the command line has no such switch). Or it is
``raise-in-handler``: setting the xattr ``user.raise`` makes the filesystem core raise
RuntimeError in this process, an unexpected exception inside a FUSE handler.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guestfs.background import Readiness  # noqa: E402
from guestfs.config import DaemonConfig  # noqa: E402
from guestfs.daemon import Daemon  # noqa: E402
from guestfs.filesystem import Ctx, Filesystem  # noqa: E402
from guestfs.session import Fault  # noqa: E402


RAISE_IN_HANDLER = "raise-in-handler"


def raise_on_user_raise(fs: Filesystem, ino: int, name: bytes, value: bytes, ctx: Ctx) -> None:
    if name == b"user.raise":
        raise RuntimeError("an unexpected failure, on purpose")
    setxattr(fs, ino, name, value, ctx)


setxattr = Filesystem.setxattr


def main(argv: list[str]) -> int:
    fault, machine, mountpoint, memory = argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")
    config = DaemonConfig(machine=machine, mountpoint=Path(mountpoint), memory=int(memory))
    if fault == RAISE_IN_HANDLER:
        Filesystem.setxattr = raise_on_user_raise     # in this test process only
        return Daemon(config, Readiness(None)).run()
    return Daemon(config, Readiness(None), fault=Fault(fault)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
