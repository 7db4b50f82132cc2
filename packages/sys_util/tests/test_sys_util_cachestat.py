"""cachestat: page counts that follow the page cache, and clear errors."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sys_util import CacheStat, InvalidArgument, cachestat, pagesize
from sys_util.testing import closed_fd

PAGES = 64


def _supported() -> bool:
    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        cachestat(fd, 0, 4096)
    except OSError as err:
        return err.errno not in (errno.ENOSYS, errno.EOPNOTSUPP)
    finally:
        os.close(fd)
    return True


needs_cachestat = pytest.mark.skipif(not _supported(), reason="cachestat needs Linux 6.5")


@pytest.fixture
def data_fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(PAGES * pagesize()))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        yield fd
    finally:
        os.close(fd)


@needs_cachestat
def test_counts_follow_reads_writes_and_drops(data_fd: int) -> None:
    page = pagesize()
    if cachestat(data_fd, 0, PAGES * page).cached != 0:
        pytest.skip("this filesystem keeps clean pages after POSIX_FADV_DONTNEED")
    os.pread(data_fd, 8 * page, 4 * page)
    assert cachestat(data_fd, 0, PAGES * page).cached == 8
    assert cachestat(data_fd, 4 * page, 8 * page).cached == 8
    assert cachestat(data_fd, 12 * page, page).cached == 0
    os.pwrite(data_fd, b"x" * page, 20 * page)
    stat = cachestat(data_fd, 20 * page, page)
    assert stat.cached == 1 and stat.dirty + stat.writeback == 1
    os.fdatasync(data_fd)
    os.posix_fadvise(data_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    stat = cachestat(data_fd, 0, PAGES * page)
    assert (stat.cached, stat.dirty, stat.writeback) == (0, 0, 0)
    assert isinstance(stat, CacheStat)


@needs_cachestat
def test_a_range_past_the_end_counts_nothing_there(data_fd: int) -> None:
    page = pagesize()
    os.pread(data_fd, page, (PAGES - 1) * page)
    assert cachestat(data_fd, (PAGES - 1) * page, 100 * page).cached == 1
    assert cachestat(data_fd, 10 * PAGES * page, page).cached == 0


def test_bad_ranges_and_fds_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        cachestat(0, -1, 4096)
    with pytest.raises(InvalidArgument):
        cachestat(0, 0, 0)
    with pytest.raises(OSError) as info:
        cachestat(closed_fd(), 0, 4096)
    assert info.value.errno in (errno.EBADF, errno.ENOSYS)
