"""The one checksum of every structure in the arena: CRC32 (zlib) of the structure with
its own 4-byte checksum field taken as zero (docs/handover-abi.md, "Conventions")."""

from __future__ import annotations

import struct
import zlib

_FIELD = struct.Struct("<I")
_ZERO = bytes(_FIELD.size)


def crc32_at(buf: bytes | bytearray | memoryview, offset: int) -> int:
    """The CRC32 of `buf` with the field at `offset` read as zero."""
    crc = zlib.crc32(buf[:offset])
    crc = zlib.crc32(_ZERO, crc)
    return zlib.crc32(buf[offset + _FIELD.size:], crc)


def stored_crc32(buf: bytes | bytearray | memoryview, offset: int) -> int:
    """The checksum the field at `offset` holds."""
    return _FIELD.unpack_from(buf, offset)[0]


def seal_crc32(buf: bytearray | memoryview, offset: int) -> None:
    """Write the checksum of `buf` into its field at `offset`."""
    _FIELD.pack_into(buf, offset, crc32_at(buf, offset))
