"""A tiny initramfs for the VM demo: a static busybox and an init script.

The guest fills a tmpfs with random data (so that much of its RAM is dirty), prints
``checksum before <md5>``, then once a second ``tick N boot <boot id> uptime <s>`` on
the serial console, and answers the console command ``check`` with ``checksum after
<md5>``. The command ``beat`` starts a heartbeat, ``beat N`` every 4 ms or so (a
``read -t`` on a FIFO nobody writes: a sleep of the shell itself, no process started),
by which the host times the VM's pause to a few ms; ``quiet`` stops it. Written as a newc cpio archive directly, so no device node or root-owned file
has to be made on the host.
"""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
stty -echo
boot_id=$(cat /proc/sys/kernel/random/boot_id)
fill_mb=$(sed -n 's/.*fill_mb=\([0-9]*\).*/\1/p' /proc/cmdline)
mount -t tmpfs -o size=$((fill_mb + 1))m fill /fill
echo "guest: filling $fill_mb MiB with random data"
dd if=/dev/urandom of=/fill/data bs=1M count=$fill_mb 2>/dev/null
echo "checksum before $(md5sum /fill/data | cut -d' ' -f1)"
(n=0; while :; do
    n=$((n + 1))
    echo "tick $n boot $boot_id uptime $(cut -d' ' -f1 /proc/uptime)"
    sleep 1
done) &
mkfifo /beat.fifo
beat_pid=
while read -r cmd; do
    case "$cmd" in
    check) echo "checksum after $(md5sum /fill/data | cut -d' ' -f1)" ;;
    beat) (exec 3<>/beat.fifo; n=0; while [ $n -lt 30000 ]; do
               n=$((n + 1)); echo "beat $n"; read -t 0.004 -u 3 _
           done) &
          beat_pid=$! ;;
    quiet) [ -n "$beat_pid" ] && kill $beat_pid; beat_pid= ;;
    esac
done
"""


def _entry(ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
           ) -> bytes:
    """One newc cpio record, padded to 4 bytes (header plus name, then the data)."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build(dest: Path) -> None:
    """Write the gzip'd initramfs to `dest`."""
    entries = [("bin", stat.S_IFDIR | 0o755, b""), ("dev", stat.S_IFDIR | 0o755, b""),
               ("proc", stat.S_IFDIR | 0o755, b""), ("fill", stat.S_IFDIR | 0o755, b""),
               ("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()),
               ("init", stat.S_IFREG | 0o755, INIT.encode())]
    archive = b"".join(_entry(i, name, mode, data) for i, (name, mode, data)
                       in enumerate(entries, 1))
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    archive += _entry(len(entries) + 1, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive += _entry(0, "TRAILER!!!", 0)
    dest.write_bytes(gzip.compress(archive, compresslevel=1))
