"""Debian packages the experiments need, installed when missing."""

from __future__ import annotations

import os
import subprocess

from clients import Failure
from clients.report import progress


def missing(packages: list[str]) -> list[str]:
    """Those of `packages` that dpkg does not have installed."""
    def installed(package: str) -> bool:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                              capture_output=True, text=True)
        return proc.returncode == 0 and "install ok installed" in proc.stdout

    return [p for p in packages if not installed(p)]


def ensure(packages: list[str]) -> None:
    """Install whichever of `packages` are missing (apt-get, as root)."""
    todo = missing(packages)
    if not todo:
        return
    progress(f"installing Debian packages: {' '.join(todo)} (a few minutes the first time)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *todo]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise Failure(f"{' '.join(argv)} failed:\n{proc.stderr.strip()[-2000:]}")
