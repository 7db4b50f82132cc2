"""Page-cache residency of a file range, through cachestat(2).

Why: a VMM serving a guest's large read from a raw image can take the host page cache (fast
when the data is there) or O_DIRECT (the faster way to read what is not there on many hosts,
and it does not push other data out of the cache). Choosing needs a question that changes
nothing: ``preadv2(RWF_NOWAIT)`` starts readahead I/O when it misses, ``mincore`` needs a
mapping; cachestat only counts pages.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from sys_util._binding import ffi, lib
from sys_util._fd import AsRawFd, raw_fd
from sys_util.errors import InvalidArgument

__all__ = ["CacheStat", "cachestat"]


class CacheStat(NamedTuple):
    """Page counts for a file range (pages of the host's page size)."""

    #: Pages of the range in the page cache (dirty and under writeback included).
    cached: int
    dirty: int
    writeback: int
    #: Pages of the range evicted from the cache, and those evicted recently enough that
    #: reading them again counts as thrashing.
    evicted: int
    recently_evicted: int


def cachestat(fd: int | AsRawFd, offset: int, length: int) -> CacheStat:
    """Count the page-cache pages of ``[offset, offset + length)`` of ``fd``'s file.

    Raises OSError: ENOSYS before Linux 6.5 (or where seccomp hides it), EPERM on a file the
    caller could not write, EBADF on a closed fd, EOPNOTSUPP on files without a page cache
    (e.g. hugetlbfs).
    """
    if offset < 0 or length <= 0:
        raise InvalidArgument(f"cachestat range {offset}+{length} is invalid")
    out = ffi.new("uint64_t[5]")
    # The kernel writes 5 u64s into `out`, which this call allocated with exactly that size.
    if lib.sys_util_cachestat(raw_fd(fd), offset, length, out) < 0:
        code = ffi.errno
        raise OSError(code, f"{os.strerror(code)} (from cachestat)")
    return CacheStat(out[0], out[1], out[2], out[3], out[4])
