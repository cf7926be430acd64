"""Preserved page chains: a byte payload of any size in a linked list of preserved pages.

A subsystem serializes its records (msgpack, say) into one payload, writes it with
:func:`write_chain` before or during its ``kho_finalize``, and records the returned
physical address in its sub-FDT.  The next kernel reads it back with
``kho_in.consume_chain(phys, magic)`` (validate, copy out, free the pages).

Each page: ``{ magic[4], version u16, flags u16, length u32, crc32 u32, next u64 }`` then
up to :data:`CHAIN_PAYLOAD` payload bytes; little-endian; the CRC32 covers the whole page
with its crc32 field taken as zero.  Every page but the last is full; the last has the
``CHAIN_LAST`` flag and ``next = 0``.  See docs/handover-abi.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .arena import PhysMemory
from .checksum import crc32_at, seal_crc32
from .errors import HandoverError
from .units import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .kho import KHO

CHAIN_VERSION = 1
CHAIN_HDR = struct.Struct("<4sHHIIQ")   # magic, version, flags, length, crc32, next
CHAIN_CRC_OFFSET = 12
CHAIN_PAYLOAD = PAGE_SIZE - CHAIN_HDR.size


#: Page flag: the last page of its chain (then ``next`` is 0).
CHAIN_LAST = 1


@dataclass(frozen=True, slots=True)
class Chain:
    """A validated chain: its payload and the pfns of its pages, in order."""

    payload: bytes
    pfns: list[int]


def _check_magic(magic: bytes) -> None:
    if len(magic) != 4:
        raise ValueError(f"a chain magic is 4 bytes, got {magic!r}")


def chain_pages(length: int) -> int:
    """Pages a payload of ``length`` bytes takes (an empty payload takes one)."""
    return max(1, -(-length // CHAIN_PAYLOAD))


def store_chain(mem: PhysMemory, payload: bytes, magic: bytes, pfns: list[int]) -> None:
    """Write the chain's pages into ``pfns`` (``chain_pages(len(payload))`` of them)."""
    _check_magic(magic)
    n = len(pfns)
    if n != chain_pages(len(payload)):
        raise ValueError(f"{len(payload)} bytes need {chain_pages(len(payload))} pages")
    body = memoryview(payload)
    for i, pfn in enumerate(pfns):
        part = body[i * CHAIN_PAYLOAD:(i + 1) * CHAIN_PAYLOAD]
        last = i == n - 1
        page = mem.view(pfn)
        CHAIN_HDR.pack_into(page, 0, magic, CHAIN_VERSION, CHAIN_LAST if last else 0,
                            len(part), 0, 0 if last else pfns[i + 1] << PAGE_SHIFT)
        page[CHAIN_HDR.size:CHAIN_HDR.size + len(part)] = part
        if len(part) < CHAIN_PAYLOAD:
            page[CHAIN_HDR.size + len(part):] = bytes(CHAIN_PAYLOAD - len(part))
        seal_crc32(page, CHAIN_CRC_OFFSET)


def write_chain(kho: KHO, payload: bytes, magic: bytes) -> int:
    """Write ``payload`` into freshly allocated pages that `kho` preserves.

    Returns the physical address of the first page.  Undo with :func:`free_chain`.
    """
    _check_magic(magic)
    pfns: list[int] = []
    try:
        for _ in range(chain_pages(len(payload))):
            pfns.append(kho.buddy.alloc(0))
        store_chain(kho.arena, payload, magic, pfns)
        kho.preserve_pfns(np.asarray(pfns, np.int64), 0)
    except BaseException:
        for pfn in pfns:
            kho.buddy.free(pfn, 0)
        raise
    return pfns[0] << PAGE_SHIFT


def free_chain(kho: KHO, phys: int, magic: bytes) -> None:
    """Unpreserve and free a chain this kernel wrote (a participant's ``kho_abort``)."""
    chain = walk_chain(kho.arena, phys, magic)
    pfns = np.asarray(chain.pfns, np.int64)
    kho.unpreserve_pfns(pfns, 0)
    kho.buddy.free_pfns(pfns, 0)


def read_chain(mem: PhysMemory, phys: int, magic: bytes,
               max_pages: int | None = None) -> bytes:
    """The payload of the chain at ``phys``, fully validated (see :func:`walk_chain`)."""
    return walk_chain(mem, phys, magic, max_pages).payload


def walk_chain(mem: PhysMemory, phys: int, magic: bytes,
               max_pages: int | None = None) -> Chain:
    """Follow and validate a chain; reads only.

    HandoverError names the page and what is wrong: an address outside the arena, on
    page 0 or not page aligned, a wrong magic or version, a CRC mismatch, a bad length,
    a cycle, or more than ``max_pages`` pages (default: the arena's page count).
    """
    _check_magic(magic)
    limit = mem.npages if max_pages is None else max_pages
    seen: set[int] = set()
    pfns: list[int] = []
    parts: list[bytes] = []
    where = "the chain's first page"
    while True:
        pfn = _page_pfn(mem, phys, where, magic)
        if pfn in seen:
            raise HandoverError(f"{_name(magic)} has a cycle: page {phys:#x} is linked "
                                "twice")
        if len(seen) >= limit:
            raise HandoverError(f"{_name(magic)} is longer than {limit} pages")
        seen.add(pfn)
        pfns.append(pfn)
        page = mem.view(pfn)
        flags, length, nxt = _check_page(page, phys, magic)
        parts.append(page[CHAIN_HDR.size:CHAIN_HDR.size + length])
        if flags & CHAIN_LAST:
            return Chain(b"".join(parts), pfns)
        where = f"the next pointer of page {phys:#x}"
        phys = nxt


def _name(magic: bytes) -> str:
    return f"chain {magic!r}"


def _page_pfn(mem: PhysMemory, phys: int, where: str, magic: bytes) -> int:
    if phys % PAGE_SIZE:
        raise HandoverError(f"{_name(magic)}: {where} points at {phys:#x}, which is not "
                            "page aligned")
    pfn = phys >> PAGE_SHIFT
    if pfn == 0 or pfn >= mem.npages:
        raise HandoverError(f"{_name(magic)}: {where} points at {phys:#x}, outside the "
                            f"arena's usable pages (1 to {mem.npages - 1})")
    return pfn


def _check_page(page: memoryview, phys: int, magic: bytes) -> tuple[int, int, int]:
    found, version, flags, length, crc, nxt = CHAIN_HDR.unpack_from(page)
    what = f"{_name(magic)}, page {phys:#x}"
    if found != magic:
        raise HandoverError(f"{what} has magic {found!r}, expected {magic!r}")
    if version != CHAIN_VERSION:
        raise HandoverError(f"{what} has format version {version}; this kernel reads "
                            f"version {CHAIN_VERSION}")
    computed = crc32_at(page, CHAIN_CRC_OFFSET)
    if crc != computed:
        raise HandoverError(f"{what} fails its CRC32 check (stored {crc:#010x}, "
                            f"computed {computed:#010x})")
    last = bool(flags & CHAIN_LAST)
    if flags & ~CHAIN_LAST:
        raise HandoverError(f"{what} has unknown flags {flags:#x}")
    if length > CHAIN_PAYLOAD or (not last and length != CHAIN_PAYLOAD):
        raise HandoverError(f"{what} has payload length {length}; every page but the last "
                            f"holds exactly {CHAIN_PAYLOAD} bytes")
    if last != (nxt == 0):
        raise HandoverError(f"{what}: the last-page flag and the next pointer "
                            f"({nxt:#x}) disagree")
    return flags, length, nxt
