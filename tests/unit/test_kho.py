"""KHO outgoing and incoming sides on a real booted kernel, in one process."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kho_backend import chain
from kho_backend.boot import Kernel, boot
from kho_backend.errors import HandoverError, KhoBusy
from kho_backend.fdt import FdtNode, build
from kho_backend.header import MachineHeader
from kho_backend.kho import KhoError, split_natural
from kho_backend.kho_in import IncomingHandover
from kho_backend.units import PAGE_SHIFT

MEMORY = 32 << 20


@pytest.fixture
def kernel(machine_dir: Path) -> Iterator[Kernel]:
    k = boot(f"k{uuid.uuid4().hex[:10]}", memory=MEMORY, machine_dir=machine_dir)
    k.finish_boot()
    yield k
    if not k.arena.closed:
        k.shutdown()
    k.arena.path.unlink(missing_ok=True)


def parse_own(kernel: Kernel) -> IncomingHandover:
    phys, size = kernel.kho.fdt
    return IncomingHandover.parse(kernel.arena, phys, size, scratch=kernel.scratch_ranges())


def test_split_natural_matches_kernel() -> None:
    assert list(split_natural(3, 13)) == [(3, 0), (4, 2), (8, 3)]
    assert list(split_natural(0, 4096)) == [(0, 10), (1024, 10), (2048, 10), (3072, 10)]
    assert sum(1 << o for _, o in split_natural(5, 1000)) == 1000


def test_preserve_refusals(kernel: Kernel) -> None:
    kho = kernel.kho
    pfn = kernel.buddy.alloc(2)
    with pytest.raises(KhoError, match="not aligned"):
        kho.preserve_folio(pfn + 1, 2)
    with pytest.raises(KhoError, match="outside the arena"):
        kho.preserve_folio(kernel.arena.npages, 0)
    scratch_start = kernel.scratch_ranges()[0][0]
    with pytest.raises(KhoError, match="scratch"):
        kho.preserve_folio(scratch_start, 0)
    free = kernel.buddy.alloc(0)
    kernel.buddy.free(free, 0)
    with pytest.raises(KhoError, match="not allocated"):
        kho.preserve_folio(free, 0)
    with pytest.raises(KhoError, match="not allocated"):
        kho.preserve_folio(0, 0)                       # the header page
    with pytest.raises(KhoError, match="order 11"):
        kho.preserve_folio(pfn, 11)
    kho.preserve_folio(pfn, 2)
    with pytest.raises(KhoError, match="already preserved"):
        kho.preserve_folio(pfn + 2, 0)
    with pytest.raises(KhoError, match="listed twice"):
        other = kernel.buddy.alloc(0)
        kho.preserve_pfns(np.array([other, other]), 0)
    with pytest.raises(KhoError, match="not preserved as an order-1"):
        kho.unpreserve_folio(pfn, 1)
    kho.unpreserve_folio(pfn, 2)
    kho.preserve_pages(pfn, 4)
    assert kho.is_preserved(pfn, 2)
    kho.unpreserve_pages(pfn, 4)
    assert kho.track.nr_pages() == 0


def test_busy_after_finalize(kernel: Kernel) -> None:
    kho = kernel.kho
    pfn = kernel.buddy.alloc(0)
    kho.finalize()
    for call in (lambda: kho.preserve_folio(pfn, 0), lambda: kho.unpreserve_folio(pfn, 0),
                 lambda: kho.add_subtree("x", build(FdtNode())), kho.finalize):
        with pytest.raises(KhoBusy):
            call()
    kho.abort()
    kho.preserve_folio(pfn, 0)


def test_subtree_checks(kernel: Kernel) -> None:
    kho = kernel.kho
    with pytest.raises(KhoError, match="not an FDT"):
        kho.add_subtree("bad", b"not an fdt at all, clearly")
    with pytest.raises(KhoError, match="cannot name"):
        kho.add_subtree("a/b", build(FdtNode()))
    phys = kho.add_subtree("mine", build(FdtNode(props={"compatible": "mine-v1"})))
    assert kho.is_preserved(phys >> PAGE_SHIFT, 0)
    with pytest.raises(KhoError, match="already exists"):
        kho.add_subtree("mine", build(FdtNode()))
    kho.remove_subtree("mine")
    assert kho.track.nr_pages() == 0


def test_finalize_roundtrip(kernel: Kernel) -> None:
    """What finalize writes parses back: the folios, the subtrees, a chain; the map and
    FDT pages are preserved themselves; abort gives every page back."""
    free_before = kernel.buddy.stats().free_pages
    pfns = np.array([kernel.buddy.alloc(0) for _ in range(700)], np.int64)
    big = kernel.buddy.alloc(9)
    kernel.kho.preserve_pfns(pfns, 0)
    kernel.kho.preserve_folio(big, 9)
    sub = build(FdtNode(props={"compatible": "test-v1", "answer": 42}))
    kernel.kho.add_subtree("test", sub)
    payload = bytes(range(256)) * 100
    chain_phys = chain.write_chain(kernel.kho, payload, b"TEST")
    fdt_phys, fdt_size = kernel.kho.finalize()
    kho_in = parse_own(kernel)
    heads = dict((o, h) for h, o in kho_in.preserved_ranges())
    assert set(pfns.tolist()) <= set(heads[0].tolist()) and big in heads[9].tolist()
    # The map's own pages are its radix nodes, found by walking it and reserved beside the
    # folios; the root FDT is reserved from the boot parameters, not preserved in the map.
    nodes = set(kho_in.pmap.nodes.tolist())
    assert nodes == set(kernel.kho.track.node_pfns().tolist()) and len(nodes) >= 6
    assert not nodes & set(heads[0].tolist())
    assert kho_in.pmap.order_of(fdt_phys >> PAGE_SHIFT) is None
    assert fdt_phys >> PAGE_SHIFT in {int(p) for leaves in kho_in.reserved_blocks() for p in leaves.heads()}
    assert kho_in.retrieve_subtree("test")[1] == sub
    with pytest.raises(HandoverError, match="no subtree 'nope'"):
        kho_in.retrieve_subtree("nope")
    assert chain.read_chain(kernel.arena, chain_phys, b"TEST") == payload
    kernel.kho.abort()
    chain.free_chain(kernel.kho, chain_phys, b"TEST")
    kernel.kho.remove_subtree("test")
    kernel.kho.unpreserve_pfns(pfns, 0)
    kernel.kho.unpreserve_folio(big, 9)
    for pfn in pfns.tolist():
        kernel.buddy.free(pfn, 0)
    kernel.buddy.free(big, 9)
    assert kernel.buddy.stats().free_pages == free_before
    assert kernel.kho.track.nr_pages() == 0


def test_restore_rules(kernel: Kernel) -> None:
    """On the new side a folio comes back only as exactly what was preserved, once."""
    name = kernel.name
    machine_dir = kernel.arena.path.parent
    folio = kernel.buddy.alloc(3)
    pages = [kernel.buddy.alloc(0) for _ in range(4)]
    kernel.kho.preserve_folio(folio, 3)
    kernel.kho.preserve_pfns(np.array(pages), 0)
    span = kernel.buddy.alloc(4)
    kernel.kho.preserve_pages(span + 1, 13)     # orders 0, 1, 2, 3 at span+1 .. span+13
    chain_phys = chain.write_chain(kernel.kho, b"records" * 1000, b"RECS")
    kernel.kexec.prepare({})
    kernel.shutdown()
    k2 = boot(name, machine_dir=machine_dir)
    try:
        check_restores(k2, folio, pages, span, chain_phys)
    finally:
        k2.shutdown()


def check_restores(k2: Kernel, folio: int, pages: list[int], span: int,
                   chain_phys: int) -> None:
    kho_in = k2.kho_in
    with pytest.raises(HandoverError, match="preserved as an order-3 folio"):
        kho_in.restore_pfns(np.array([folio]), 0)
    with pytest.raises(HandoverError, match="not the head of a preserved folio"):
        kho_in.restore_folio(folio + 1)
    assert kho_in.restore_folio(folio) == 3
    with pytest.raises(HandoverError, match="already restored"):
        kho_in.restore_folio(folio)
    kho_in.restore_pfns(np.array(pages), 0)
    with pytest.raises(HandoverError, match="not preserved"):
        kho_in.restore_pages(span, 14)
    kho_in.restore_pages(span + 1, 13)
    assert kho_in.consume_chain(chain_phys, b"RECS") == b"records" * 1000
    with pytest.raises(HandoverError, match="already restored"):
        kho_in.consume_chain(chain_phys, b"RECS")
    occupied = sum(leaves.pages() for leaves in kho_in.reserved_blocks())
    chain_pages = chain.chain_pages(len(b"records" * 1000))
    released = k2.finish_boot()
    # Released: the old map's nodes, the root FDT, kexec-metadata's two folios.
    assert released == occupied - (8 + 4 + 13 + chain_pages)
    assert released == len(kho_in.pmap.nodes) + 1 + 2
    stats = k2.buddy.stats()
    assert stats.preserved_pages == 0
    assert stats.used_pages == 8 + 4 + 13 + k2.kho.own_pages
    k2.buddy.check()
    assert not MachineHeader.read(k2.arena).boot_params.valid


def test_dtc_decodes_the_handover(kernel: Kernel) -> None:
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.skip("dtc (device-tree-compiler) is not installed")
    kernel.kho.add_subtree("test", build(FdtNode(props={"compatible": "test-v1"})))
    kernel.kexec.prepare({"freeze": 1})
    kho_in = parse_own(kernel)
    blobs = [bytes(kernel.arena.phys_view(kho_in.fdt_phys, kho_in.fdt_size))]
    blobs += [s.blob for s in kho_in.subtrees.values()]
    for blob in blobs:
        done = subprocess.run([dtc, "-I", "dtb", "-O", "dts", "-"], input=blob,
                              capture_output=True, check=False)
        assert done.returncode == 0, done.stderr
        assert b"compatible" in done.stdout
    root = subprocess.run([dtc, "-I", "dtb", "-O", "dts", "-"], input=blobs[0],
                          capture_output=True, check=True).stdout.decode()
    assert 'compatible = "kho-v3"' in root and "preserved-memory-map" in root
    assert "kexec-metadata {" in root and "test {" in root
