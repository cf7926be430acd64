"""Small helpers over libfdt (pylibfdt) for the KHO trees.

Build with :func:`build` from a :class:`FdtNode` description (``libfdt.FdtSw``); read
with :class:`FdtReader` (``libfdt.Fdt``), whose every failure is a HandoverError naming
the blob, node and property.  Properties are stored as the kernel's KHO stores them:
native-endian (here little-endian) u64 / u32 and NUL-terminated strings, no
``#address-cells`` / ``#size-cells``.

A tree may be sealed with :func:`seal`: a root property ``crc32`` holding the CRC32 of the
whole blob computed with that property's value taken as zero.  A flattened device tree
has no checksum of its own; the seal makes any bit flip in the KHO tree detectable.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import libfdt

from .checksum import crc32_at, seal_crc32, stored_crc32
from .errors import HandoverError

#: The root property holding a sealed tree's CRC32.
CRC_PROP = "crc32"
# fdt_property: tag, len, nameoff, then the value.
_PROP_VALUE_OFFSET = 12
_FDT_HEADER_SIZE = 40
FDT_MAGIC = 0xD00DFEED

PropValue = bytes | str | int
_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass
class FdtNode:
    """A node to build: properties in insertion order, then children.

    Values: ``str`` (string), ``bytes`` (raw), ``int`` (u64); use :func:`u32` for a u32.
    """

    name: str = ""
    props: dict[str, PropValue] = field(default_factory=dict)
    children: list[FdtNode] = field(default_factory=list)

    def child(self, name: str, **props: PropValue) -> FdtNode:
        """Append and return a child node."""
        node = FdtNode(name, dict(props))
        self.children.append(node)
        return node


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def encode(value: PropValue) -> bytes:
    """A property value in the KHO encoding (ints are u64)."""
    if isinstance(value, str):
        return value.encode() + b"\0"
    if isinstance(value, int):
        return u64(value)
    return bytes(value)


def build(root: FdtNode, *, sealed: bool = False) -> bytes:
    """Flatten ``root`` into a packed FDT blob; ``sealed`` adds the root ``crc32``."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    _emit(sw, root, extra={CRC_PROP: u32(0)} if sealed else {})
    fdt = sw.as_fdt()
    fdt.pack()
    blob = bytes(fdt.as_bytearray())
    return seal(blob) if sealed else blob


def _emit(sw: libfdt.FdtSw, node: FdtNode, extra: dict[str, bytes]) -> None:
    with sw.add_node(node.name):
        for name, value in node.props.items():
            sw.property(name, encode(value))
        for name, value in extra.items():
            sw.property(name, value)
        for child in node.children:
            _emit(sw, child, {})


def seal(blob: bytes) -> bytes:
    """Fill in the root ``crc32`` of a blob built with room for it."""
    out = bytearray(blob)
    where = _crc_value_offset(libfdt.Fdt(out))
    seal_crc32(out, where)
    return bytes(out)


def _crc_value_offset(fdt: libfdt.Fdt) -> int:
    """Byte offset in the blob of the root ``crc32`` value, or -1 if there is none."""
    root = fdt.path_offset("/")
    off = fdt.first_property_offset(root, quiet=(libfdt.NOTFOUND,))
    while off >= 0:
        if fdt.get_property_by_offset(off).name == CRC_PROP:
            return fdt.off_dt_struct() + off + _PROP_VALUE_OFFSET
        off = fdt.next_property_offset(off, quiet=(libfdt.NOTFOUND,))
    return -1


def _libfdt_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn what libfdt raises on a damaged blob into a HandoverError naming the blob.

    fdt_check_full() does not catch everything (a bad string offset, for one), and
    pylibfdt then raises FdtException, or SystemError from its SWIG wrappers.
    """
    @functools.wraps(method)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (libfdt.FdtException, SystemError, UnicodeDecodeError) as e:
            what = getattr(args[0], "what", "an FDT")
            raise HandoverError(f"{what} is not a valid FDT: {e}") from None
    return guarded


class FdtReader:
    """A validated FDT blob; every error is a HandoverError that names ``what``."""

    @_libfdt_errors
    def __init__(self, blob: bytes, what: str) -> None:
        self.what = what
        self.blob = bytes(blob)
        self._check_structure()
        self.fdt = libfdt.Fdt(self.blob)

    def _check_structure(self) -> None:
        if len(self.blob) < _FDT_HEADER_SIZE:
            raise HandoverError(f"{self.what} is {len(self.blob)} bytes, too short for an "
                                "FDT header")
        magic, total = struct.unpack_from(">II", self.blob)
        if magic != FDT_MAGIC:
            raise HandoverError(f"{self.what} has FDT magic {magic:#010x}, expected "
                                f"{FDT_MAGIC:#010x}")
        if total != len(self.blob):
            raise HandoverError(f"{self.what}: the FDT header says {total} bytes but "
                                f"{len(self.blob)} were handed over (truncated or corrupt)")
        err = libfdt.fdt_check_full(bytearray(self.blob), len(self.blob))
        if err:
            raise HandoverError(f"{self.what} is not a valid FDT: "
                                f"{libfdt.fdt_strerror(err)}")

    @_libfdt_errors
    def check_seal(self) -> None:
        """Refuse a tree whose root ``crc32`` is missing or does not match."""
        where = _crc_value_offset(self.fdt)
        if where < 0:
            raise HandoverError(f"{self.what} has no {CRC_PROP} property")
        stored, computed = stored_crc32(self.blob, where), crc32_at(self.blob, where)
        if computed != stored:
            raise HandoverError(f"{self.what} fails its CRC32 check (stored {stored:#010x}, "
                                f"computed {computed:#010x}): it is corrupted")

    @_libfdt_errors
    def node(self, path: str) -> int:
        """Offset of the node at ``path``; HandoverError if it is missing."""
        off = self.fdt.path_offset(path, quiet=(libfdt.NOTFOUND, libfdt.BADPATH))
        if off < 0:
            raise HandoverError(f"{self.what} has no node {path}")
        return off

    @_libfdt_errors
    def path(self, off: int) -> str:
        return self.fdt.get_path(off)

    def _prop_path(self, off: int, name: str) -> str:
        return f"{self.path(off).rstrip('/')}/{name}"

    @_libfdt_errors
    def subnodes(self, off: int) -> list[tuple[str, int]]:
        """(name, offset) of each child of the node at ``off``."""
        out = []
        child = self.fdt.first_subnode(off, quiet=(libfdt.NOTFOUND,))
        while child >= 0:
            out.append((self.fdt.get_name(child), child))
            child = self.fdt.next_subnode(child, quiet=(libfdt.NOTFOUND,))
        return out

    @_libfdt_errors
    def properties(self, off: int) -> list[tuple[str, bytes]]:
        """(name, raw value) of each property of the node at ``off``."""
        out = []
        prop = self.fdt.first_property_offset(off, quiet=(libfdt.NOTFOUND,))
        while prop >= 0:
            p = self.fdt.get_property_by_offset(prop)
            out.append((p.name, bytes(p)))
            prop = self.fdt.next_property_offset(prop, quiet=(libfdt.NOTFOUND,))
        return out

    @_libfdt_errors
    def raw(self, off: int, name: str) -> bytes:
        """A property's raw value; HandoverError naming node and property if absent."""
        value = self.fdt.getprop(off, name, quiet=(libfdt.NOTFOUND,))
        if value == -libfdt.NOTFOUND:
            raise HandoverError(f"{self.what}: node {self.path(off)} has no property "
                                f"{name!r}")
        return bytes(value)

    @_libfdt_errors
    def u64(self, off: int, name: str) -> int:
        return self._int(off, name, 8, "<Q")

    @_libfdt_errors
    def u32(self, off: int, name: str) -> int:
        return self._int(off, name, 4, "<I")

    def _int(self, off: int, name: str, size: int, fmt: str) -> int:
        value = self.raw(off, name)
        if len(value) != size:
            raise HandoverError(f"{self.what}: property {self._prop_path(off, name)} is "
                                f"{len(value)} bytes, expected a {size}-byte integer")
        return struct.unpack(fmt, value)[0]

    @_libfdt_errors
    def string(self, off: int, name: str) -> str:
        value = self.raw(off, name)
        if not value.endswith(b"\0") or b"\0" in value[:-1]:
            raise HandoverError(f"{self.what}: property {self._prop_path(off, name)} is not a "
                                "NUL-terminated string")
        try:
            return value[:-1].decode()
        except UnicodeDecodeError:
            raise HandoverError(f"{self.what}: property {self._prop_path(off, name)} is not "
                                "valid UTF-8") from None

    @_libfdt_errors
    def expect_compatible(self, off: int, supported: str | tuple[str, ...]) -> str:
        """The node's ``compatible``; HandoverError naming it and what this kernel
        reads unless it is ``supported`` (one value, or any of several)."""
        found = self.string(off, "compatible")
        accepted = (supported,) if isinstance(supported, str) else supported
        if found not in accepted:
            known = (f"only {accepted[0]!r}" if len(accepted) == 1
                     else " and ".join(repr(c) for c in accepted))
            raise HandoverError(f"{self.what}: node {self.path(off)} is compatible "
                                f"{found!r}; this kernel supports {known}")
        return found
