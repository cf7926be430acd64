"""Debian packages the experiments need: the one list of them, and an install fallback.

tools/setup.sh installs these up front for the test suite (``tools/test``), taking the
lists from here::

    python3 -m clients.apt packages postgres    # with tools/ on PYTHONPATH

`ensure` remains for a tool run on its own on a machine set-up has not prepared: it
installs what is missing, as root, with a time limit.
"""

from __future__ import annotations

import os
import subprocess
import sys

from clients import Failure
from clients.report import progress

# What each experiment needs, by the name tools/setup.sh and the tests use for it.
PACKAGES = {
    "postgres": ["postgresql", "postgresql-contrib"],                     # pg_server
    "vm": ["qemu-system-x86", "linux-image-amd64", "busybox-static"],     # vm_restart
}
UPDATE_TIMEOUT = 600.0    # seconds for apt-get update
INSTALL_TIMEOUT = 1800.0  # seconds for apt-get install (downloads, a kernel's initramfs)


def missing(packages: list[str]) -> list[str]:
    """Those of `packages` that dpkg does not have installed."""
    def installed(package: str) -> bool:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                              capture_output=True, text=True)
        return proc.returncode == 0 and "install ok installed" in proc.stdout

    return [p for p in packages if not installed(p)]


def ensure(packages: list[str]) -> None:
    """Install whichever of `packages` are missing (apt-get, as root). A fallback:
    tools/setup.sh has installed them already on the test path."""
    todo = missing(packages)
    if not todo:
        return
    progress(f"installing Debian packages: {' '.join(todo)} (tools/setup.sh had not; "
             f"a few minutes the first time)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv, timeout in ((["apt-get", "update", "-qq"], UPDATE_TIMEOUT),
                          (["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            *todo], INSTALL_TIMEOUT)):
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failure(f"{' '.join(argv)} did not end within {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise Failure(f"{' '.join(argv)} failed:\n{proc.stderr.strip()[-2000:]}")


def main(argv: list[str]) -> int:
    """``packages NEED``: print the Debian packages of NEED, one line."""
    if len(argv) != 2 or argv[0] != "packages" or argv[1] not in PACKAGES:
        print(f"usage: python3 -m clients.apt packages {{{','.join(PACKAGES)}}}",
              file=sys.stderr)
        return 2
    print(" ".join(PACKAGES[argv[1]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
