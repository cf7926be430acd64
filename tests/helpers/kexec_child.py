"""A chain of kernels for the kexec tests, each one exec'd by the previous (same PID).

    python kexec_child.py SPEC.json GENERATION

Generation 0 cold-boots the machine; every later one boots from the handover and checks
it: exactly the expected folios (plus the handover's own sub-FDTs) are preserved,
their contents are unchanged, every allocated-but-unpreserved page reads as the poison
byte (when poisoning), and after restoring and ``finish_boot`` the accounting is exact.
Then, unless it is the last, it frees part of what it restored, allocates and preserves
new folios following the spec's pattern for its generation, and kexecs into the next.

The last generation (or the first failure) writes the spec's ``result`` JSON:
``{"generations": [stats...], "error": null | traceback}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from kho_backend.boot import Kernel, boot
from kho_backend.errors import HandoverError, OutOfMemory
from kho_backend.kexec import POISON_BYTE
from kho_backend.kexec_metadata import KexecMetadata
from kho_backend.units import PAGE_SHIFT, PAGE_SIZE

Folio = tuple[int, int, int]   # pfn, order, tag (the seed of its contents)


def contents(order: int, tag: int) -> np.ndarray:
    """What a folio tagged ``tag`` holds: a pattern no other folio shares."""
    n = PAGE_SIZE << order
    mix = np.arange(n, dtype=np.uint32) * np.uint32(2654435761)
    return ((mix + np.uint32(tag * 40503 & 0xFFFFFFFF)) >> 13).astype(np.uint8)


def folio_bytes(kernel: Kernel, pfn: int, order: int) -> np.ndarray:
    return kernel.arena.array()[pfn << PAGE_SHIFT:(pfn + (1 << order)) << PAGE_SHIFT]


def metadata_pages(kernel: Kernel, extra: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """(pfn, order) of the handover's own preserved folios: every sub-FDT, and among
    ``extra`` (preserved folios nobody asked for) the spare of kexec-metadata's copy on
    write, which holds its previous version and is released at the end of boot. (The
    root FDT and the radix tree's nodes are reserved beside the preserved folios, not
    in the map: ``kho_in.page_mask`` covers them.)"""
    kho_in = kernel.kho_in
    assert kho_in is not None
    own = set()
    for sub in kho_in.subtrees.values():
        pfn = sub.phys >> PAGE_SHIFT
        order = kho_in.pmap.order_of(pfn)
        assert order is not None, f"subtree {sub.name!r} at pfn {pfn} is not preserved"
        own.add((pfn, order))
    spares = {(pfn, order) for pfn, order in extra - own
              if order == 0 and is_metadata(folio_bytes(kernel, pfn, 0).tobytes())}
    assert len(spares) <= 1, f"more than one kexec-metadata spare: {sorted(spares)}"
    return own | spares


def is_metadata(page: bytes) -> bool:
    """Does ``page`` start with a kexec-metadata FDT?"""
    size = int.from_bytes(page[4:8], "big")     # the FDT header's totalsize
    try:
        KexecMetadata.from_fdt(page[:size])
    except HandoverError:
        return False
    return True


def check_handover(kernel: Kernel, state: dict, generation: int, poison: bool) -> list[Folio]:
    kho_in = kernel.kho_in
    assert kho_in is not None, "generation > 0 booted without a handover"
    assert kho_in.metadata is not None and kho_in.metadata.kexec_count == generation
    kept = [tuple(f) for f in state["preserved"]]
    found = {(int(p), o) for heads, o in kho_in.preserved_ranges() for p in heads.tolist()}
    own = metadata_pages(kernel, found - {(p, o) for p, o, _ in kept})
    assert found == {(p, o) for p, o, _ in kept} | own, (
        f"preserved set differs: missing {sorted({(p, o) for p, o, _ in kept} - found)[:5]}, "
        f"extra {sorted(found - {(p, o) for p, o, _ in kept} - own)[:5]}")
    for pfn, order, tag in kept:
        assert np.array_equal(folio_bytes(kernel, pfn, order), contents(order, tag)), \
            f"contents of the order-{order} folio at pfn {pfn} changed"
    if poison:
        for pfn, order in state["unpreserved"]:
            data = folio_bytes(kernel, pfn, order)
            assert (data == POISON_BYTE).all(), f"unpreserved folio {pfn} is not poisoned"
        # Everything else the next kernel has not touched yet is poison too.
        mask = ~kho_in.page_mask()
        for start, n in kernel.scratch_ranges():
            mask[start:start + n] = False
        mask[0] = False
        pages = kernel.arena.array().reshape(-1, PAGE_SIZE)
        bad = np.flatnonzero(mask & (pages != POISON_BYTE).any(axis=1))
        assert not len(bad), f"{len(bad)} pages outside preserved memory are not poisoned"
    for pfn, order, _ in kept:
        assert kho_in.restore_folio(pfn) == order
    return kept


def stats(kernel: Kernel, released: int) -> dict:
    s = kernel.buddy.stats()
    return {"free": s.free_pages, "used": s.used_pages, "reserved": s.reserved_pages,
            "preserved": s.preserved_pages, "total": s.total_pages, "released": released,
            "scratch": [(a.start_pfn, a.npages) for a in kernel.header.scratch],
            "pid": os.getpid()}


def make_pattern(kernel: Kernel, held: list[Folio], pattern: list,
                 generation: int) -> tuple[list[Folio], list[tuple[int, int]]]:
    """Free or keep what is held, allocate the pattern; return (preserve, unpreserved)."""
    rng = np.random.default_rng(generation)
    keep: list[Folio] = []
    for pfn, order, tag in held:   # restored by this kernel: hand on again, or free
        if rng.random() < 0.5:
            kernel.kho.preserve_folio(pfn, order)
            keep.append((pfn, order, tag))
        else:
            kernel.buddy.free(pfn, order)
    unpreserved: list[tuple[int, int]] = []
    bulk: list[Folio] = []
    for i, (order, action) in enumerate(pattern):
        try:
            pfn = kernel.buddy.alloc(order)
        except OutOfMemory:
            continue
        tag = generation * 100_000 + i
        folio_bytes(kernel, pfn, order)[:] = contents(order, tag)
        if action == "free":
            kernel.buddy.free(pfn, order)
        elif action == "keep":
            unpreserved.append((pfn, order))
        elif action == "bulk" and order == 0:
            bulk.append((pfn, 0, tag))
        elif action == "pages":
            kernel.kho.preserve_pages(pfn, 1 << order)
            keep.append((pfn, order, tag))
        else:
            kernel.kho.preserve_folio(pfn, order)
            keep.append((pfn, order, tag))
    if bulk:
        kernel.kho.preserve_pfns(np.array([p for p, _, _ in bulk], np.int64), 0)
        keep += bulk
    return keep, unpreserved


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    generation = int(sys.argv[2])
    state_path = Path(spec["state"])
    gens = json.loads(state_path.read_text())["gens"] if generation else []
    result: dict = {"generations": gens, "error": None}
    try:
        cmdline = "kho_poison" if spec["poison"] else ""
        kernel = boot(spec["machine"], memory=spec["memory"], cmdline=cmdline,
                      machine_dir=Path(spec["dir"]))
        held: list[Folio] = []
        if generation:
            held = check_handover(kernel, json.loads(state_path.read_text()), generation,
                                  spec["poison"])
        released = kernel.finish_boot()
        gens.append(stats(kernel, released))
        # Used: what this kernel took back, and KHO's own pages: its live root FDT and
        # the root node of its (still empty) radix tree, nothing more.
        assert kernel.kho.own_pages == 2, f"KHO holds {kernel.kho.own_pages} pages"
        assert gens[-1]["used"] == sum(1 << o for _, o, _ in held) + 2, "used pages leak"
        assert gens[-1]["preserved"] == 0
        if generation == spec["generations"]:
            Path(spec["result"]).write_text(json.dumps(result))
            kernel.shutdown()
            return
        preserve, unpreserved = make_pattern(kernel, held, spec["patterns"][generation],
                                             generation)
        state_path.write_text(json.dumps({"preserved": preserve, "unpreserved": unpreserved,
                                          "gens": gens}))
        kernel.kexec.load([sys.executable, __file__, sys.argv[1], str(generation + 1)],
                          cmdline)
        kernel.kexec.execute(poison=spec["poison"])
    except BaseException:
        result["error"] = traceback.format_exc()
        Path(spec["result"]).write_text(json.dumps(result))
        sys.exit(1)


if __name__ == "__main__":
    main()
