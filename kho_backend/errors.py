"""The exception tree of the emulated machine.

Every error derives from :class:`MachineError`, and ``str(e)`` is a complete sentence
that tells the user what is wrong (and, where there is one, what to do about it)::

    MachineError
    ├── ArenaError      not an arena, wrong size, cannot create/open, machine in use
    ├── HeaderError     bad magic / version / checksum in page 0
    ├── OutOfMemory     the page allocator or memblock cannot satisfy a request
    ├── BootError       boot failed (e.g. scratch too small: names the sizes)
    ├── HandoverError   a handover that cannot be trusted; names what is wrong
    ├── KhoBusy         preserve after finalize (the kernel's -EBUSY)
    ├── KhoError        a preserve, subtree or pool call KHO refuses (the kernel's -EINVAL)
    └── KexecError      a kexec that failed before exec (and was aborted); .phase names it
"""

from __future__ import annotations


class MachineError(Exception):
    """Base of every error raised by ``kho_backend``; its text is a complete sentence."""


class ArenaError(MachineError):
    """The arena file is missing, not an arena, the wrong size, or in use."""


class HeaderError(MachineError):
    """The machine header in page 0 has a bad magic, version, checksum or field."""


class OutOfMemory(MachineError):
    """memblock or the page allocator cannot satisfy a request (callers map it to ENOSPC)."""


class BootError(MachineError):
    """The kernel could not boot; the message names the reason (and sizes, if any)."""


class HandoverError(MachineError):
    """A handover that cannot be trusted; the message names what is wrong with it."""


class KhoBusy(MachineError):
    """KHO is finalized: preserving or unpreserving is refused (the kernel's -EBUSY)."""


class KhoError(MachineError, ValueError):
    """KHO refuses a preserve, unpreserve, subtree or pool call (the kernel's ``-EINVAL``)."""


class KexecError(MachineError):
    """A kexec failed before the exec and was aborted; ``phase`` names the failing phase."""

    def __init__(self, message: str, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


class InjectedFault(MachineError):
    """A failure a test asked for (``Kexec.prepare(fault=...)``), to exercise an abort."""
