"""pyfuse3's own in-memory example filesystem (examples/tmpfs.py of its sdist).

Its code is not kept in this repository: the source distribution of the installed
pyfuse3 version is downloaded once with pip into a cache folder, and tmpfs.py is taken
out of it into the run's work folder each time.
"""

from __future__ import annotations

import os
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from benchlib.log import say
from benchlib.proc import CommandError, run

MEMBER = "examples/tmpfs.py"
DOWNLOAD_TRIES = 2
DOWNLOAD_TIMEOUT = 150.0


class ExampleUnavailable(Exception):
    """The example could not be had; the message says why."""


def cache_dir() -> Path:
    """Where the sdist is kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "guestfs-bench"


def _sdist(version: str) -> Path:
    cache = cache_dir()
    path = cache / f"pyfuse3-{version}.tar.gz"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
            ":all:", "--disable-pip-version-check", f"pyfuse3=={version}", "-d", os.fspath(cache)]
    # pip prepares the sdist's metadata (a build environment) before it saves the file;
    # that has been seen to stall now and then, so it gets a second try.
    for attempt in range(DOWNLOAD_TRIES):
        try:
            run(argv, timeout=DOWNLOAD_TIMEOUT)
            break
        except CommandError as e:
            if attempt + 1 == DOWNLOAD_TRIES:
                raise ExampleUnavailable(f"cannot download the pyfuse3 {version} sdist: {e}") \
                    from None
            say(f"downloading the pyfuse3 sdist failed ({e}); trying again")
    if not path.exists():
        raise ExampleUnavailable(f"pip left no {path.name} in {cache}")
    return path


def extract_example(workdir: Path) -> Path:
    """tmpfs.py of the installed pyfuse3's sdist, written into `workdir`."""
    version = metadata.version("pyfuse3")
    sdist = _sdist(version)
    with tarfile.open(sdist) as tar:
        try:
            member = tar.extractfile(f"pyfuse3-{version}/{MEMBER}")
        except KeyError:
            member = None
        if member is None:
            raise ExampleUnavailable(f"{sdist.name} has no {MEMBER}")
        target = workdir / "pyfuse3_tmpfs_example.py"
        target.write_bytes(member.read())
    return target
