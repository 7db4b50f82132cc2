"""Buffered raw images read large cold ranges through O_DIRECT: the choice follows the page
cache, the data is always the file's (dirty pages included), and every case O_DIRECT cannot
do falls back to the cache."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import sys_util
from devices.virtio import RawDisk
from devices.virtio._disk import COLD_READ_DIRECT_BYTES

MIB = 1 << 20


def _cachestat_works(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        sys_util.cachestat(fd, 0, 4096)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MIB))
    if not _cachestat_works(path):
        pytest.skip("cachestat needs Linux 6.5")
    return path


@pytest.fixture
def disk(image: Path) -> Iterator[RawDisk]:
    d = RawDisk(image)
    if not d.cold_reads_direct:
        d.close()
        pytest.skip("no O_DIRECT on this filesystem")
    drop_cache(d)
    yield d
    d.close()


def drop_cache(d: RawDisk) -> None:
    os.fdatasync(d.fileno())
    os.posix_fadvise(d.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if sys_util.cachestat(d.fileno(), 0, 4 * MIB).cached:
        pytest.skip("clean pages stay cached after POSIX_FADV_DONTNEED here")


def cache_exactly(d: RawDisk, offset: int, length: int) -> None:
    """Read a range into the page cache without readahead around it."""
    fd = os.open(d.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, length, offset)
    finally:
        os.close(fd)
    assert sys_util.cachestat(d.fileno(), offset, length).cached * sys_util.pagesize() == length


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def aligned(size: int) -> tuple[mmap.mmap, memoryview]:
    """A page-aligned buffer, as a guest's page-sized segments are."""
    m = mmap.mmap(-1, size)
    return m, memoryview(m)


def test_large_cold_reads_choose_o_direct_and_cached_ones_the_cache(disk: RawDisk) -> None:
    assert not is_direct(disk.fileno())
    cold = disk.read_fd(0, MIB)
    assert cold != disk.fileno() and is_direct(cold)
    cache_exactly(disk, 0, MIB)
    assert disk.read_fd(0, MIB) == disk.fileno()
    # Partly cached is cold: the missing part would be read page by page otherwise.
    assert disk.read_fd(MIB - 4096, MIB) == cold


def test_small_unaligned_or_opted_out_reads_keep_the_cache(disk: RawDisk, image: Path) -> None:
    fd = disk.fileno()
    assert disk.read_fd(0, COLD_READ_DIRECT_BYTES - 4096) == fd
    assert disk.read_fd(512, MIB) == fd
    assert disk.read_fd(0, MIB + 512) == fd
    with RawDisk(image, read_only=True, lock=False, cold_reads_direct=False) as plain:
        assert not plain.cold_reads_direct
        assert plain.read_fd(0, MIB) == plain.fileno()
        assert len(plain.keep_fds()) == 1
    assert len(disk.keep_fds()) == 2


def test_direct_images_have_no_second_read_fd(image: Path) -> None:
    with RawDisk(image, direct=True, lock=False) as d:
        assert not d.cold_reads_direct
        assert d.read_fd(0, MIB) == d.fileno() and is_direct(d.fileno())


def test_without_cachestat_every_read_keeps_the_cache(
    disk: RawDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def missing(*args: object) -> sys_util.CacheStat:
        calls.append(args)
        raise OSError(errno.ENOSYS, "no cachestat")

    monkeypatch.setattr(sys_util, "cachestat", missing)
    assert disk.read_fd(0, MIB) == disk.fileno()
    assert not disk.cold_reads_direct
    assert disk.read_fd(MIB, MIB) == disk.fileno()
    assert len(calls) == 1  # asked once, then never again


def test_cold_reads_see_data_still_dirty_in_the_cache(disk: RawDisk, image: Path) -> None:
    new = os.urandom(4096)
    disk.write_from([memoryview(new)], 8192)  # buffered, not written back yet
    assert disk.read_fd(0, MIB) != disk.fileno()  # 1 of 256 pages cached: cold
    m, view = aligned(MIB)
    with m:
        assert disk.read_into([view], 0) == MIB
        expected = bytearray(image.read_bytes()[:MIB])
        expected[8192 : 8192 + 4096] = new
        assert view.tobytes() == bytes(expected)
        view.release()


def test_unaligned_buffers_fall_back_to_the_cache(disk: RawDisk, image: Path) -> None:
    buf = bytearray(MIB + 1)
    view = memoryview(buf)[1:]  # never page aligned
    assert disk.read_fd(0, MIB) != disk.fileno()
    assert disk.read_into([view], 0) == MIB
    assert bytes(view) == image.read_bytes()[:MIB]


def test_a_cold_read_across_the_end_is_short_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    content = os.urandom(MIB + 1000)  # not a multiple of 4 KiB
    path.write_bytes(content)
    if not _cachestat_works(path):
        pytest.skip("cachestat needs Linux 6.5")
    with RawDisk(path) as d:
        if not d.cold_reads_direct:
            pytest.skip("no O_DIRECT on this filesystem")
        drop_cache(d)
        m, view = aligned(2 * MIB)
        with m:
            assert d.read_fd(0, 2 * MIB) != d.fileno()
            assert d.read_into([view], 0) == len(content)
            assert view[: len(content)].tobytes() == content
            view.release()
