"""File page maps (guestfs.store.pagemap) through the filesystem core, on a real booted
machine's arena: the folio policy, zero-copy reads, all-or-nothing writes, truncate
and hole punching, against a bytearray model."""

from __future__ import annotations

import tracemalloc

import pytest
from conftest_machine import BootKernel, boot_kernel, machine_env, new_fs, unique_name  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestfs.errors import FsError
from guestfs.filesystem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Ctx, Filesystem
from guestfs.inode import ROOT_INO
from guestfs.store.pagemap import FOLIO_ORDER, REGION_PAGES, REGION_SIZE
from kho_backend.units import PAGE_SIZE

MiB = 1 << 20
ROOT = Ctx(uid=0, gid=0)


@pytest.fixture
def fs(boot_kernel: BootKernel) -> Filesystem:
    """A fresh filesystem on a 64 MiB machine."""
    return new_fs(boot_kernel(unique_name("pagemap"), memory=64 * MiB))


def new_file(fs: Filesystem, name: bytes = b"f") -> int:
    return fs.create(ROOT_INO, name, 0o644, ROOT).ino


def orders(fs: Filesystem, ino: int) -> set[int]:
    return {e[3] for e in fs.extents(ino)}


def dirty_free_pages(fs: Filesystem, npages: int) -> None:
    """Leave garbage in free pages, so that a missing zeroing shows."""
    ino = new_file(fs, b"dirt")
    fs.write(ino, 0, b"\xff" * npages * PAGE_SIZE)
    fs.unlink(ROOT_INO, b"dirt", ROOT)


# --- reading and writing ---------------------------------------------------------


def test_small_write_reads_back_and_holes_read_zero(fs: Filesystem) -> None:
    ino = new_file(fs)
    fs.write(ino, 5000, b"hello")
    assert bytes(fs.read(ino, 4990, 20)) == bytes(10) + b"hello"
    assert bytes(fs.read(ino, 0, 4096)) == bytes(4096)    # page 0 is a hole
    inode = fs.get(ino)
    assert inode.npages == 1 and inode.blocks == 8 and orders(fs, ino) == {0}
    assert inode.inline and not inode.map_root, "a small file's map is in its record"


def test_new_pages_are_zeroed_around_the_written_bytes(fs: Filesystem) -> None:
    dirty_free_pages(fs, 64)
    ino = new_file(fs)
    fs.write(ino, 100, b"x")
    fs.setattr(ino, ROOT, size=PAGE_SIZE)
    assert bytes(fs.read(ino, 0, PAGE_SIZE)) == bytes(100) + b"x" + bytes(PAGE_SIZE - 101)


def test_read_within_one_folio_is_zero_copy(fs: Filesystem) -> None:
    ino = new_file(fs)
    fs.write(ino, 0, b"f" * REGION_SIZE)
    out = fs.read(ino, 1000, 100_000)
    assert isinstance(out, memoryview) and bytes(out) == b"f" * 100_000


def test_sequential_large_file_uses_folios_after_region_zero(fs: Filesystem) -> None:
    ino = new_file(fs)
    for off in range(0, 6 * MiB, 128 * 1024):
        fs.write(ino, off, b"s" * 128 * 1024)
    assert orders(fs, ino) == {0, FOLIO_ORDER}
    assert [e for e in fs.extents(ino) if e[3] == FOLIO_ORDER][0][0] == REGION_PAGES
    assert bytes(fs.read(ino, 6 * MiB - 3, 10)) == b"sss"


def test_a_sparse_write_far_out_takes_pages_not_a_folio(fs: Filesystem) -> None:
    ino = new_file(fs)
    fs.write(ino, 100 * REGION_SIZE + 5, b"far")
    assert orders(fs, ino) == {0} and fs.get(ino).npages == 1


def test_no_free_folio_falls_back_to_pages(fs: Filesystem) -> None:
    hog = new_file(fs, b"hog")
    free = fs.store.free_pages()
    fs.write(hog, 0, b"h" * (free - fs.store.data_floor() - REGION_PAGES - 100) * PAGE_SIZE)
    for off in range(0, fs.get(hog).size - REGION_SIZE, 2 * PAGE_SIZE):  # holes: no folio
        fs.fallocate(hog, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, PAGE_SIZE)
    ino = new_file(fs)
    fs.write(ino, 0, b"a" * REGION_SIZE)
    assert orders(fs, ino) == {0} and fs.get(ino).npages == REGION_PAGES
    assert bytes(fs.read(ino, REGION_SIZE - 3, 3)) == b"aaa"


# --- running out of memory ---------------------------------------------------------


def test_a_write_that_does_not_fit_stores_nothing(fs: Filesystem) -> None:
    ino = new_file(fs)
    fs.write(ino, 0, b"kept")
    room = fs.statfs().f_bavail
    with pytest.raises(FsError):
        fs.write(ino, 100, b"q" * (room + 1) * PAGE_SIZE)
    inode = fs.get(ino)
    assert inode.size == 4 and inode.npages == 1 and fs.statfs().f_bavail == room
    assert bytes(fs.read(ino, 0, 8)) == b"kept" and fs.check() == []


def test_fallocate_is_all_or_nothing(fs: Filesystem) -> None:
    ino = new_file(fs)
    room = fs.statfs().f_bavail
    with pytest.raises(FsError):
        fs.fallocate(ino, 0, 0, (room + 600) * PAGE_SIZE)
    assert fs.get(ino).npages == 0 and fs.statfs().f_bavail == room


# --- truncate and holes -------------------------------------------------------------------


def test_truncate_into_a_folio_keeps_it_and_growing_again_reads_zeros(fs: Filesystem) -> None:
    ino = new_file(fs)
    fs.write(ino, 0, b"z" * 2 * REGION_SIZE)
    fs.setattr(ino, ROOT, size=REGION_SIZE + 10)
    assert fs.get(ino).npages == 2 * REGION_PAGES            # a folio is never split
    fs.setattr(ino, ROOT, size=2 * REGION_SIZE)
    assert bytes(fs.read(ino, REGION_SIZE + 8, 4)) == b"zz\0\0"
    assert bytes(fs.read(ino, 2 * REGION_SIZE - 4, 4)) == bytes(4)


def test_punch_hole_frees_whole_pages_and_zeroes_the_rest(fs: Filesystem) -> None:
    ino = new_file(fs)
    fs.write(ino, 0, b"p" * 8 * PAGE_SIZE)
    fs.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 3 * PAGE_SIZE)
    assert fs.get(ino).npages == 6
    assert bytes(fs.read(ino, 98, 4)) == b"pp\0\0"
    assert bytes(fs.read(ino, 3 * PAGE_SIZE + 98, 4)) == b"\0\0pp"


_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3 * REGION_SIZE), st.integers(1, REGION_SIZE + 9)),
    st.tuples(st.just("truncate"), st.integers(0, 4 * REGION_SIZE), st.just(0)),
    st.tuples(st.just("punch"), st.integers(0, 4 * REGION_SIZE), st.integers(1, 3 * REGION_SIZE)),
), max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_page_maps_match_a_bytearray(fs: Filesystem, ops: list) -> None:
    name = f"model-{len(ops)}-{id(ops)}".encode()     # a failed example leaves its file
    ino, model = new_file(fs, name), bytearray()
    for i, (op, off, n) in enumerate(ops):
        if op == "write":
            data = bytes([i + 1]) * n
            fs.write(ino, off, data)
            model.extend(bytes(max(0, off + n - len(model))))
            model[off:off + n] = data
        elif op == "truncate":
            fs.setattr(ino, ROOT, size=off)
            model = model[:off] + bytes(max(0, off - len(model)))
        else:
            fs.fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
            end = min(off + n, len(model))
            if off < end:
                model[off:end] = bytes(end - off)
        assert bytes(fs.read(ino, 0, len(model) + 10)) == model
        inode = fs.get(ino)
        assert inode.npages == sum(e[2] for e in fs.extents(ino))
    assert fs.check() == []
    fs.unlink(ROOT_INO, name, ROOT)


# --- memory ------------------------------------------------------------------------------


def test_a_gib_of_file_data_takes_no_python_memory(boot_kernel: BootKernel) -> None:
    data_size = 1 << 30
    fs = new_fs(boot_kernel(unique_name("pagemap"), memory=data_size + 64 * MiB))
    ino = new_file(fs)
    chunk = b"\x5a" * MiB
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for off in range(0, data_size, MiB):
        fs.write(ino, off, chunk)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"\nPython memory for 1 GiB of file data: {used} bytes")
    assert fs.get(ino).npages * PAGE_SIZE == data_size
    assert used < 256 * 1024
