"""fallocate(2) with modes: punch holes and zero ranges in disk images (discard, write-zeroes).

``os.posix_fallocate`` only allocates; a virtio-blk discard needs ``FALLOC_FL_PUNCH_HOLE`` and a
write-zeroes request is cheapest as ``FALLOC_FL_ZERO_RANGE``. Both keep the file size.
"""

from __future__ import annotations

import errno
import os

from sys_util._binding import ffi, lib
from sys_util._fd import AsRawFd, raw_fd
from sys_util.errors import InvalidArgument

__all__ = ["allocate", "fallocate", "punch_hole", "write_zeroes"]

_ZERO_CHUNK = bytes(1 << 16)


def fallocate(fd: int | AsRawFd, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2) with raw ``mode`` flags; raise OSError with the errno on failure."""
    if offset < 0 or length <= 0:
        raise InvalidArgument(f"fallocate range {offset}+{length} is invalid")
    # No pointers cross this call: all four arguments are integers.
    if lib.sys_util_fallocate(raw_fd(fd), mode, offset, length) < 0:
        code = ffi.errno
        raise OSError(code, f"{os.strerror(code)} (from fallocate(mode={mode:#x}))")


def allocate(fd: int | AsRawFd, offset: int, length: int, *, keep_size: bool = False) -> None:
    """Reserve disk blocks for ``[offset, offset+length)`` (growing the file unless keep_size)."""
    fallocate(fd, lib.FALLOC_FL_KEEP_SIZE if keep_size else 0, offset, length)


def punch_hole(fd: int | AsRawFd, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)``: it reads as zeros, the size is unchanged."""
    fallocate(fd, lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE, offset, length)


def write_zeroes(fd: int | AsRawFd, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` read as zeros without changing the file size.

    Tries ``FALLOC_FL_ZERO_RANGE`` (blocks stay allocated), then a punched hole, then plain
    writes of zeros (clamped to the current file size, so the size never changes).
    """
    n = raw_fd(fd)
    for mode in (
        lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE,
        lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE,
    ):
        try:
            fallocate(n, mode, offset, length)
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    end = min(offset + length, os.fstat(n).st_size)
    pos = offset
    while pos < end:
        pos += os.pwrite(n, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), end - pos)], pos)
