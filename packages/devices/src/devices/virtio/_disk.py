"""Disk backends for virtio-block: a small protocol plus the raw-file implementation.

The protocol is what ``Block`` needs and nothing more, so a qcow2 image (``qcow.QcowFile``) can
be adapted to it: vectored reads/writes at an offset straight into/out of guest-memory views,
flush, discard, write-zeroes, size and resize.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import sys_util
from devices.virtio._errors import DiskImageLocked

__all__ = ["QCOW2_MAGIC", "DiskBackend", "RawDisk", "open_disk"]

QCOW2_MAGIC = b"QFI\xfb"


@runtime_checkable
class DiskBackend(Protocol):
    """What virtio-block needs from a disk image. Offsets and sizes are in bytes."""

    @property
    def read_only(self) -> bool: ...

    def size(self) -> int: ...

    def read_into(self, iovecs: Sequence[memoryview], offset: int) -> int:
        """Fill ``iovecs`` from ``offset``; return bytes read (short only at end of image)."""
        ...

    def write_from(self, iovecs: Sequence[memoryview], offset: int) -> int:
        """Write all of ``iovecs`` at ``offset``; return bytes written."""
        ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (reads afterwards return zeroes in our implementations)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None: ...

    def resize(self, new_size: int) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class RawDisk:
    """A raw image file, locked against concurrent writers with ``flock``.

    The lock is shared for read-only opens and exclusive for read-write ones, so two VMs can
    share a read-only image but never a writable one. ``direct=True`` opens with ``O_DIRECT``;
    requests whose buffers are not suitably aligned transparently use a second, buffered fd.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        direct: bool = False,
        lock: bool = True,
    ) -> None:
        self._path = os.fspath(path)
        self._read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self._path, flags)
        self._buffered_fd = -1
        try:
            if lock:
                try:
                    fcntl.flock(
                        self._fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB
                    )
                except BlockingIOError as err:
                    raise DiskImageLocked(self._path, exclusive=not read_only) from err
            self._direct = False
            if direct:
                self._buffered_fd = self._fd
                self._fd = os.open(self._path, flags | os.O_DIRECT)
                self._direct = True
        except BaseException:
            self._close_fds()
            raise

    # -- fd protocol ------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "disk is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _plain_fd(self) -> int:
        """The fd for operations O_DIRECT cannot do (fallocate, zero writes)."""
        fd = self.fileno()
        return self._buffered_fd if self._direct else fd

    def _close_fds(self) -> None:
        for fd in (self._fd, self._buffered_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._buffered_fd = -1

    def close(self) -> None:
        self._close_fds()

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_fds(self) -> list[int]:
        return [fd for fd in (self._fd, self._buffered_fd) if fd >= 0]

    # -- DiskBackend ------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def direct(self) -> bool:
        return self._direct

    def size(self) -> int:
        return os.fstat(self.fileno()).st_size

    def read_into(self, iovecs: Sequence[memoryview], offset: int) -> int:
        fd = self.fileno()
        want = len(iovecs[0]) if len(iovecs) == 1 else sum(map(len, iovecs))
        try:
            got = os.preadv(fd, iovecs, offset)
        except OSError as err:
            if err.errno != errno.EINVAL or not self._direct:
                raise
            fd = self._buffered_fd
            got = os.preadv(fd, iovecs, offset)
        if got == want or got == 0:
            return got
        # Short read (a signal, or a file shrunk underneath us): continue from where it stopped.
        total = got
        while total < want:
            rest = _advance(iovecs, total)
            n = os.preadv(fd, rest, offset + total)
            if n == 0:
                break
            total += n
        return total

    def write_from(self, iovecs: Sequence[memoryview], offset: int) -> int:
        if self._read_only:
            raise OSError(errno.EROFS, "disk is read-only")
        fd = self.fileno()
        want = len(iovecs[0]) if len(iovecs) == 1 else sum(map(len, iovecs))
        try:
            done = os.pwritev(fd, iovecs, offset)
        except OSError as err:
            if err.errno != errno.EINVAL or not self._direct:
                raise
            fd = self._buffered_fd
            done = os.pwritev(fd, iovecs, offset)
        while done < want:
            n = os.pwritev(fd, _advance(iovecs, done), offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n
        return done

    def flush(self) -> None:
        os.fdatasync(self.fileno())

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (the range then reads as zeroes and its blocks are freed)."""
        if self._read_only:
            raise OSError(errno.EROFS, "disk is read-only")
        if length <= 0:
            return
        fd = self._plain_fd()
        try:
            sys_util.punch_hole(fd, offset, length)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            sys_util.write_zeroes(fd, offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero a range; with ``unmap`` the blocks may be freed (a punched hole)."""
        if self._read_only:
            raise OSError(errno.EROFS, "disk is read-only")
        if length <= 0:
            return
        if unmap:
            self.discard(offset, length)
            return
        fd = self._plain_fd()
        sys_util.write_zeroes(fd, offset, length)

    def resize(self, new_size: int) -> None:
        if self._read_only:
            raise OSError(errno.EROFS, "disk is read-only")
        if new_size < 0:
            raise ValueError("negative disk size")
        os.ftruncate(self.fileno(), new_size)


def open_disk(
    path: str | os.PathLike[str], *, read_only: bool = False, direct: bool = False
) -> DiskBackend:
    """Open a disk image as the right backend: qcow2 (by its magic) or raw.

    Both lock the image (shared for read-only, exclusive for writable); a conflict raises
    :class:`~devices.virtio.DiskImageLocked`. ``direct`` applies to raw images only.
    """
    spath = os.fspath(path)
    with open(spath, "rb") as f:
        magic = f.read(4)
    if magic != QCOW2_MAGIC:
        return RawDisk(spath, read_only=read_only, direct=direct)
    from qcow import QcowFile  # deferred: raw-only users never pay for the qcow import

    try:
        return QcowFile.open(spath, writable=not read_only)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise DiskImageLocked(spath, exclusive=not read_only) from err
        raise


def _advance(iovecs: Sequence[memoryview], skip: int) -> list[memoryview]:
    out: list[memoryview] = []
    for v in iovecs:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out
