"""The ``kexec-metadata`` KHO subtree: who exec'd this kernel, when, and how long it took.

Its own format, beside the KHO core (as the kernel's ``include/linux/kho/abi/
kexec_metadata.h``): the outgoing kexec adds it as a KHO participant, the incoming kernel
reads it back; the layout is in docs/handover-abi.md, "kexec-metadata subtree".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import HandoverError
from .fdt import FdtNode, FdtReader, build, u32

#: The subtree's node name in the KHO root FDT.
METADATA_NODE = "kexec-metadata"
METADATA_COMPATIBLE = "kexec-metadata-v1"
METADATA_VERSION = 1
_PROP_NAME = re.compile(r"[A-Za-z0-9,._+?#-]{1,31}")


@dataclass(frozen=True)
class KexecMetadata:
    """The ``kexec-metadata`` subtree: who exec'd this kernel, when, and how long it took.

    ``kexec_count`` counts the kexecs since the cold boot: 1 for the first kernel booted
    by kexec (a handover for an unmount keeps the count).  ``exec_time_ns`` is
    CLOCK_REALTIME at the exec (0 if the previous kernel stopped without exec, e.g. an
    unmount).  ``phases`` are ns per phase of that kexec.
    """

    kexec_count: int
    previous_release: str
    exec_time_ns: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    version: int = METADATA_VERSION

    def to_fdt(self) -> bytes:
        """The subtree blob (one u64 property per phase, in node ``phases``)."""
        root = FdtNode("", {"compatible": METADATA_COMPATIBLE, "version": u32(self.version),
                            "previous-release": self.previous_release,
                            "kexec-count": self.kexec_count,
                            "exec-time-ns": self.exec_time_ns})
        bad = [name for name in self.phases if not _PROP_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"phase names must be devicetree property names: {bad}")
        root.children.append(FdtNode("phases", dict(self.phases)))
        return build(root)

    @classmethod
    def from_fdt(cls, blob: bytes) -> KexecMetadata:
        """Parse and validate the subtree; HandoverError names what is wrong."""
        r = FdtReader(blob, f"the KHO subtree {METADATA_NODE!r}")
        top = r.node("/")
        r.expect_compatible(top, METADATA_COMPATIBLE)
        version = r.u32(top, "version")
        if version != METADATA_VERSION:
            raise HandoverError(f"{r.what} has version {version}; this kernel reads "
                                f"version {METADATA_VERSION}")
        phases_node = r.node("/phases")
        phases = {name: r.u64(phases_node, name) for name, _ in r.properties(phases_node)}
        return cls(kexec_count=r.u64(top, "kexec-count"),
                   previous_release=r.string(top, "previous-release"),
                   exec_time_ns=r.u64(top, "exec-time-ns"), phases=phases,
                   version=version)
