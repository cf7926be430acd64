"""POSIX ACLs as the kernel hands them to a FUSE filesystem with ACL support.

With ``FUSE_POSIX_ACL`` the kernel checks permissions against the ACLs itself and keeps
them in the extended attributes ``system.posix_acl_access`` and
``system.posix_acl_default``; the filesystem stores them, keeps the mode bits in step
with the access ACL (both ways), and gives new files and directories the ACLs their
directory's default ACL says (the rules of the kernel's ``posix_acl_create_masq`` and
``posix_acl_chmod``).

The value format (``posix_acl_xattr``): a little-endian u32 version 2, then one 8-byte
entry ``{ u16 tag, u16 perm, u32 id }`` per entry, sorted by tag and id.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
UNDEFINED_ID = 0xFFFFFFFF


class Tag(enum.IntEnum):
    """ACL entry tags (linux/posix_acl.h)."""

    USER_OBJ = 0x01
    USER = 0x02
    GROUP_OBJ = 0x04
    GROUP = 0x08
    MASK = 0x10
    OTHER = 0x20


@dataclass(frozen=True, slots=True)
class Entry:
    """One ACL entry; `id` is a uid or gid for USER and GROUP, else UNDEFINED_ID."""

    tag: Tag
    perm: int
    id: int = UNDEFINED_ID


Acl = tuple[Entry, ...]


def parse(value: bytes) -> Acl:
    """A validated ACL from its xattr value; ValueError says what is wrong."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"an ACL of {len(value)} bytes is not a header and whole entries")
    (version,) = _HEADER.unpack_from(value)
    if version != VERSION:
        raise ValueError(f"ACL version {version}, expected {VERSION}")
    entries = []
    for tag, perm, id_ in _ENTRY.iter_unpack(value[_HEADER.size:]):
        try:
            kind = Tag(tag)
        except ValueError:
            raise ValueError(f"unknown ACL tag {tag:#x}") from None
        if perm & ~0o7:
            raise ValueError(f"ACL permissions {perm:#o} beyond rwx")
        named = kind in (Tag.USER, Tag.GROUP)
        entries.append(Entry(kind, perm, id_ if named else UNDEFINED_ID))
    acl = tuple(entries)
    _validate(acl)
    return acl


def pack(acl: Acl) -> bytes:
    """The xattr value of an ACL, entries in canonical order."""
    ordered = sorted(acl, key=lambda e: (e.tag, e.id))
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(e.tag, e.perm, e.id) for e in ordered)


def _validate(acl: Acl) -> None:
    tags = [e.tag for e in acl]
    for required in (Tag.USER_OBJ, Tag.GROUP_OBJ, Tag.OTHER):
        if tags.count(required) != 1:
            raise ValueError(f"an ACL needs exactly one {required.name} entry")
    if tags.count(Tag.MASK) > 1:
        raise ValueError("an ACL has at most one MASK entry")
    named = [(e.tag, e.id) for e in acl if e.tag in (Tag.USER, Tag.GROUP)]
    if len(set(named)) != len(named):
        raise ValueError("an ACL names a user or group twice")
    if named and Tag.MASK not in tags:
        raise ValueError("an ACL with named users or groups needs a MASK entry")


def mode_bits(acl: Acl) -> tuple[int, bool]:
    """The permission bits an access ACL implies, and whether the ACL says no more
    than those bits (then it need not be stored)."""
    perm = {e.tag: e.perm for e in acl if e.tag not in (Tag.USER, Tag.GROUP)}
    group = perm.get(Tag.MASK, perm[Tag.GROUP_OBJ])
    bits = perm[Tag.USER_OBJ] << 6 | group << 3 | perm[Tag.OTHER]
    return bits, len(acl) == 3


def chmod(acl: Acl, mode: int) -> Acl:
    """The access ACL after a chmod to `mode` (the kernel's ``posix_acl_chmod``): the
    owner, mask (or group, without a mask) and other entries take the new bits."""
    has_mask = any(e.tag is Tag.MASK for e in acl)
    group_tag = Tag.MASK if has_mask else Tag.GROUP_OBJ
    shifts = {Tag.USER_OBJ: 6, group_tag: 3, Tag.OTHER: 0}
    return tuple(replace(e, perm=(mode >> shifts[e.tag]) & 0o7) if e.tag in shifts else e
                 for e in acl)


def inherit(default: Acl, mode: int) -> tuple[Acl | None, int]:
    """A new inode's access ACL (None when the mode says it all) and permission bits,
    from its directory's default ACL and the mode asked for (``posix_acl_create_masq``).
    """
    out: list[Entry] = []
    keep = mode & 0o777
    group_entry: int | None = None
    mask_entry: int | None = None
    for e in default:
        perm = e.perm
        if e.tag is Tag.USER_OBJ:
            perm &= keep >> 6
            keep &= perm << 6 | ~0o700
        elif e.tag is Tag.OTHER:
            perm &= keep
            keep &= perm | ~0o007
        elif e.tag is Tag.GROUP_OBJ:
            group_entry = len(out)
        elif e.tag is Tag.MASK:
            mask_entry = len(out)
        out.append(replace(e, perm=perm))
    index = mask_entry if mask_entry is not None else group_entry
    assert index is not None, "a validated ACL has a GROUP_OBJ entry"
    perm = out[index].perm & (keep >> 3)
    out[index] = replace(out[index], perm=perm)
    keep &= perm << 3 | ~0o070
    acl = tuple(out)
    bits = (mode & ~0o777) | (keep & 0o777)
    return (None if mode_bits(acl)[1] else acl), bits
