"""POSIX ACL values: parsing, the mode they imply, chmod and inheritance, as the kernel's
posix_acl.c computes them."""

from __future__ import annotations

import pytest

from guestfs import acl
from guestfs.acl import Entry, Tag


def make(*entries: tuple[Tag, int] | tuple[Tag, int, int]) -> acl.Acl:
    return tuple(Entry(*e) for e in entries)


BASE = make((Tag.USER_OBJ, 6), (Tag.GROUP_OBJ, 4), (Tag.OTHER, 4))
NAMED = make((Tag.USER_OBJ, 7), (Tag.USER, 5, 1000), (Tag.GROUP_OBJ, 5), (Tag.MASK, 7),
             (Tag.OTHER, 0))


def test_pack_parse_round_trip_in_canonical_order() -> None:
    value = acl.pack(tuple(reversed(NAMED)))
    assert value[:4] == b"\x02\x00\x00\x00" and len(value) == 4 + 8 * 5
    assert acl.parse(value) == tuple(sorted(NAMED, key=lambda e: (e.tag, e.id)))


@pytest.mark.parametrize("value,why", [
    (b"", "not a header"),
    (b"\x01\x00\x00\x00", "version 1"),
    (acl.pack(BASE)[:-1], "whole entries"),
    (acl.pack(BASE[:2]), "exactly one OTHER"),
    (acl.pack(BASE + make((Tag.USER, 7, 5))), "needs a MASK"),
    (acl.pack(BASE + make((Tag.MASK, 7), (Tag.USER, 7, 5), (Tag.USER, 6, 5))), "twice"),
    (acl.pack(BASE)[:4] + b"\x40\x00\x07\x00\xff\xff\xff\xff" + acl.pack(BASE)[4:],
     "unknown ACL tag"),
    (acl.pack(make((Tag.USER_OBJ, 8), (Tag.GROUP_OBJ, 4), (Tag.OTHER, 4))), "beyond rwx"),
])
def test_malformed_acls_are_refused(value: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        acl.parse(value)


def test_mode_bits_and_equivalence() -> None:
    assert acl.mode_bits(BASE) == (0o644, True)
    assert acl.mode_bits(NAMED) == (0o770, False)     # the mask stands for the group


def test_chmod_changes_owner_mask_and_other() -> None:
    changed = acl.chmod(NAMED, 0o640)
    perms = {(e.tag, e.id): e.perm for e in changed}
    assert perms[(Tag.USER_OBJ, acl.UNDEFINED_ID)] == 6
    assert perms[(Tag.MASK, acl.UNDEFINED_ID)] == 4
    assert perms[(Tag.GROUP_OBJ, acl.UNDEFINED_ID)] == 5    # kept: the mask took the bits
    assert perms[(Tag.USER, 1000)] == 5 and perms[(Tag.OTHER, acl.UNDEFINED_ID)] == 0
    assert acl.mode_bits(acl.chmod(BASE, 0o751)) == (0o751, True)


def test_inherit_masks_with_the_mode_asked_for() -> None:
    access, bits = acl.inherit(NAMED, 0o666)
    assert bits == 0o660 and access is not None
    perms = {(e.tag, e.id): e.perm for e in access}
    assert perms[(Tag.USER_OBJ, acl.UNDEFINED_ID)] == 6 and perms[(Tag.MASK, acl.UNDEFINED_ID)] == 6
    assert perms[(Tag.USER, 1000)] == 5           # named entries keep theirs; the mask limits
    access, bits = acl.inherit(BASE, 0o777)
    assert access is None and bits == 0o644       # the mode says it all
