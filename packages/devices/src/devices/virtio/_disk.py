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

__all__ = ["COLD_READ_DIRECT_BYTES", "QCOW2_MAGIC", "DiskBackend", "RawDisk", "open_disk"]

QCOW2_MAGIC = b"QFI\xfb"

#: Buffered raw images: a read at least this large that is not wholly in the host page cache
#: goes through an O_DIRECT fd. On the development host a cold 1 MiB-at-a-time stream read
#: 1.6-1.9 GB/s buffered and 2.9-4.4 GB/s with O_DIRECT (QEMU's ``cache=none``), and a stream
#: read this way does not evict the cache's other data. Smaller reads (a booting guest's page
#: faults and readahead, 4-128 KiB) keep the page cache and fill it for the next VM.
COLD_READ_DIRECT_BYTES = 256 << 10
#: Offset and length alignment O_DIRECT needs on any block size up to 4 KiB. (Buffers that
#: are not aligned make the kernel return EINVAL; the read then falls back to the cache.)
_DIRECT_ALIGN = 4096


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

    Buffered (the default), large reads that miss the page cache use a second, O_DIRECT fd
    when ``cold_reads_direct`` (see :meth:`read_fd`). That stays coherent: the kernel writes
    dirty cached pages of a range back before an O_DIRECT read of it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        direct: bool = False,
        cold_reads_direct: bool = True,
        lock: bool = True,
    ) -> None:
        self._path = os.fspath(path)
        self._read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self._path, flags)
        self._buffered_fd = -1
        self._cold_fd = -1
        self._cold_ok = True
        self._page_size = sys_util.pagesize()
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
            elif cold_reads_direct:
                self._cold_fd = _open_direct_for_reads(self._path)
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
        for fd in (self._fd, self._buffered_fd, self._cold_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._buffered_fd = self._cold_fd = -1

    def close(self) -> None:
        self._close_fds()

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_fds(self) -> list[int]:
        return [fd for fd in (self._fd, self._buffered_fd, self._cold_fd) if fd >= 0]

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

    @property
    def cold_reads_direct(self) -> bool:
        """True while large reads that miss the page cache go through O_DIRECT."""
        return self._cold_fd >= 0 and self._cold_ok

    def size(self) -> int:
        return os.fstat(self.fileno()).st_size

    def read_fd(self, offset: int, length: int) -> int:
        """The fd to read ``[offset, offset + length)`` with.

        With ``cold_reads_direct``: the O_DIRECT fd for a 4 KiB-aligned read of at least
        :data:`COLD_READ_DIRECT_BYTES` of which some page is not in the host page cache (asked
        with ``cachestat``, which changes nothing), else :meth:`fileno`. Where ``cachestat``
        is missing (Linux before 6.5) or refused, every read keeps the page cache from then on.
        """
        fd = self.fileno()
        if (
            not self.cold_reads_direct
            or length < COLD_READ_DIRECT_BYTES
            or (offset | length) & (_DIRECT_ALIGN - 1)
        ):
            return fd
        try:
            cached = sys_util.cachestat(fd, offset, length).cached
        except OSError:
            # The fd stays open (a request in a kernel queue may still name it): only unused.
            self._cold_ok = False
            return fd
        return fd if cached * self._page_size >= length else self._cold_fd

    def read_into(self, iovecs: Sequence[memoryview], offset: int) -> int:
        want = len(iovecs[0]) if len(iovecs) == 1 else sum(map(len, iovecs))
        fd = self.read_fd(offset, want)
        try:
            got = os.preadv(fd, iovecs, offset)
        except OSError as err:
            # EINVAL from an O_DIRECT fd: buffers, offset or length not aligned for it.
            fallback = self._plain_fd()
            if err.errno != errno.EINVAL or fd == fallback:
                raise
            fd = fallback
            got = os.preadv(fd, iovecs, offset)
        if got == want or got == 0:
            return got
        # Short read (a signal, or a file shrunk underneath us): continue from where it stopped,
        # buffered (the rest may start at an offset O_DIRECT cannot read from).
        total = got
        fd = self._plain_fd()
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
    path: str | os.PathLike[str],
    *,
    read_only: bool = False,
    direct: bool = False,
    cold_reads_direct: bool = True,
) -> DiskBackend:
    """Open a disk image as the right backend: qcow2 (by its magic) or raw.

    Both lock the image (shared for read-only, exclusive for writable); a conflict raises
    :class:`~devices.virtio.DiskImageLocked`. ``direct`` and ``cold_reads_direct`` (see
    :class:`RawDisk`) apply to raw images only.
    """
    spath = os.fspath(path)
    with open(spath, "rb") as f:
        magic = f.read(4)
    if magic != QCOW2_MAGIC:
        return RawDisk(
            spath, read_only=read_only, direct=direct, cold_reads_direct=cold_reads_direct
        )
    from qcow import QcowFile  # deferred: raw-only users never pay for the qcow import

    try:
        return QcowFile.open(spath, writable=not read_only)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise DiskImageLocked(spath, exclusive=not read_only) from err
        raise


def _open_direct_for_reads(path: str) -> int:
    """An O_DIRECT read-only fd of ``path``, or -1 where the filesystem has no O_DIRECT
    (tmpfs refuses it with EINVAL)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
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
