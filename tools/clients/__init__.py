"""Real clients of a guestfs mount, for tools/db-experiment and tools/vm-demo.

Each module has one job: mounting and kexec through the ``guestfs`` command line
(`guestmount`), starting and stopping our own child processes (`procs`), the
acknowledgement log kept outside the mount (`acklog`), tables and progress (`report`),
Debian packages (`apt`), the SQLite and PostgreSQL writers and experiments, and QEMU
with its guest (`qemu`, `initramfs`).
"""


class Failure(Exception):
    """An experiment failed; the message says what, for stderr."""
