"""io_uring for disk I/O: many readv/writev/fsync requests per system call, completed out of order.

Why: a virtio-blk guest with a deep queue sends dozens of requests per doorbell. Serving them one
``preadv`` at a time leaves the disk idle between requests, and a pool of Python threads pays a
lock hand-over per request. One ring submits the whole batch in one ``io_uring_enter``; requests
that hit the page cache complete inside that call, the others in the kernel's own workers, and
an eventfd says when completions are waiting.

The ring only ever does readv, writev and fsync (it is created disabled and restricted before
it is enabled), because io_uring operations are not seen by seccomp: a jailed device's ring
must not be able to do anything its syscall policy forbids.

Buffers are memoryviews (e.g. of guest memory); the ring keeps them, and the iovec arrays that
point at them, alive until the kernel reports the request complete.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from sys_util._binding import ffi, lib
from sys_util._fd import AsRawFd, ebadf, raw_fd
from sys_util.errors import InvalidArgument

__all__ = ["IoUring", "uring_supported"]

#: Most buffers in one request (the kernel's IOV_MAX).
MAX_IOVECS = 1024
_MAX_TAG = (1 << 64) - 1


class IoUring:
    """A restricted io_uring (readv, writev, fsync) that owns its ring fd and mappings.

    Queue requests with :meth:`readv`/:meth:`writev`/:meth:`fsync` (each tagged with an integer
    unique among requests in flight; they return False when the ring is full), start them with
    :meth:`submit`, collect ``(tag, result)`` pairs with :meth:`completions` -- ``result`` is the
    byte count, or ``-errno``. :meth:`close` waits for requests still in flight, so buffers are
    never written after it returns.

    ``max_workers`` (0: the kernel's default, 4 per CPU) bounds the kernel threads that run
    requests which would block, e.g. reads that miss the page cache: as many cold reads as that
    are in flight at once.
    """

    def __init__(self, entries: int = 256, *, restrict: bool = True, max_workers: int = 0) -> None:
        if not 1 <= entries <= 4096:
            raise InvalidArgument(f"io_uring size {entries} is not in 1..4096")
        if not 0 <= max_workers <= 1024:
            raise InvalidArgument(f"io_uring max_workers {max_workers} is not in 0..1024")
        ring = lib.sys_util_uring_new(entries, 1 if restrict else 0, max_workers)
        if ring == ffi.NULL:
            code = ffi.errno
            raise OSError(code, f"{os.strerror(code)} (from io_uring_setup)")
        self._ring: Any = ring
        self._capacity: int = lib.sys_util_uring_sq_entries(ring)
        # tag -> (iovec array, buffer handles): what the kernel may still write through
        self._in_flight: dict[int, tuple[Any, list[Any]]] = {}
        self._tags = ffi.new("uint64_t[]", self._capacity)
        self._results = ffi.new("int32_t[]", self._capacity)

    # -- ownership ----------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._ring is None:
            raise ebadf("io_uring")
        fd: int = lib.sys_util_uring_fd(self._ring)
        return fd

    @property
    def closed(self) -> bool:
        return self._ring is None

    def close(self) -> None:
        """Wait for every request in flight, then unmap the ring and close its fd."""
        ring, self._ring = self._ring, None
        if ring is None:
            return
        try:
            while self._in_flight:
                if lib.sys_util_uring_submit(ring, 1) < 0 and ffi.errno not in (
                    errno.EINTR,
                    errno.EAGAIN,
                    errno.EBUSY,
                ):
                    break  # the ring is unusable; the kernel cancels on close
                self._drain(ring)
        finally:
            lib.sys_util_uring_free(ring)
            self._in_flight.clear()

    def __enter__(self) -> IoUring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ring is None else f"fd={self.fileno()}"
        return f"IoUring({state}, in_flight={len(self._in_flight)})"

    # -- requests ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Most requests in flight at once (the submission ring's size)."""
        return self._capacity

    @property
    def in_flight(self) -> int:
        """Requests queued or running whose completion has not been collected."""
        return len(self._in_flight)

    def register_eventfd(self, evt: int | AsRawFd) -> None:
        """Have the kernel signal ``evt`` whenever a completion is posted."""
        if lib.sys_util_uring_register_eventfd(self._live(), raw_fd(evt)) < 0:
            code = ffi.errno
            raise OSError(code, f"{os.strerror(code)} (from IORING_REGISTER_EVENTFD)")

    def readv(
        self,
        fd: int | AsRawFd,
        buffers: Sequence[memoryview],
        offset: int,
        tag: int,
        *,
        punt: bool = False,
    ) -> bool:
        """Queue a read of ``sum(len(b))`` bytes at ``offset`` into ``buffers``.

        ``punt`` hands it straight to the kernel's I/O workers (IOSQE_ASYNC), which read it as
        one blocking call: best for a read known to miss the page cache, which the inline
        attempt would otherwise resume page by page.
        """
        return self._prep_rw(
            lib.IORING_OP_READV, fd, buffers, offset, tag, writable=True, punt=punt
        )

    def writev(
        self,
        fd: int | AsRawFd,
        buffers: Sequence[memoryview],
        offset: int,
        tag: int,
        *,
        punt: bool = False,
    ) -> bool:
        """Queue a write of ``buffers`` at ``offset`` (``punt``: as for :meth:`readv`)."""
        return self._prep_rw(
            lib.IORING_OP_WRITEV, fd, buffers, offset, tag, writable=False, punt=punt
        )

    def fsync(self, fd: int | AsRawFd, tag: int, *, datasync: bool = True) -> bool:
        """Queue an ``fdatasync`` (or ``fsync``) that starts only after every earlier request
        completed (IOSQE_IO_DRAIN): a flush covers the writes queued before it."""
        ring = self._live()
        self._check_tag(tag)
        if len(self._in_flight) >= self._capacity:
            return False
        flags = lib.IORING_FSYNC_DATASYNC if datasync else 0
        rc = lib.sys_util_uring_prep(
            ring, lib.IORING_OP_FSYNC, raw_fd(fd), ffi.NULL, 0, 0, flags, lib.IOSQE_IO_DRAIN, tag
        )
        if rc < 0:
            return False
        self._in_flight[tag] = (ffi.NULL, [])
        return True

    def submit(self, wait: int = 0) -> int:
        """Start every queued request; block until ``wait`` completions are ready. Returns the
        number of requests started."""
        if wait < 0 or wait > len(self._in_flight):
            raise InvalidArgument(f"cannot wait for {wait} of {len(self._in_flight)} requests")
        n: int = lib.sys_util_uring_submit(self._live(), wait)
        if n < 0:
            raise OSError(-n, f"{os.strerror(-n)} (from io_uring_enter)")
        return n

    def completions(self) -> list[tuple[int, int]]:
        """Every completion posted so far: ``(tag, bytes or -errno)``, in completion order."""
        return self._drain(self._live())

    # -- internals -----------------------------------------------------------------------------

    def _live(self) -> Any:
        if self._ring is None:
            raise ebadf("io_uring")
        return self._ring

    def _check_tag(self, tag: int) -> None:
        if not 0 <= tag <= _MAX_TAG:
            raise InvalidArgument(f"io_uring tag {tag} is not a u64")
        if tag in self._in_flight:
            raise InvalidArgument(f"io_uring tag {tag} is already in flight")

    def _prep_rw(
        self,
        op: int,
        fd: int | AsRawFd,
        buffers: Sequence[memoryview],
        offset: int,
        tag: int,
        *,
        writable: bool,
        punt: bool,
    ) -> bool:
        ring = self._live()
        self._check_tag(tag)
        count = len(buffers)
        if not 1 <= count <= MAX_IOVECS:
            raise InvalidArgument(f"{count} buffers (1..{MAX_IOVECS} allowed)")
        if offset < 0:
            raise InvalidArgument(f"negative file offset {offset}")
        if len(self._in_flight) >= self._capacity:
            return False
        iov = ffi.new("struct iovec[]", count)
        handles = []
        for i, buf in enumerate(buffers):
            # SAFETY: from_buffer pins the exporter (e.g. the guest-memory mmap) while we hold
            # it, and we hold it in _in_flight until the kernel reports the request complete,
            # so the kernel never writes through a pointer to memory that was released.
            handle = ffi.from_buffer("char[]", buf, require_writable=writable)
            handles.append(handle)
            iov[i].iov_base = handle
            iov[i].iov_len = len(handle)
        sqe_flags = lib.IOSQE_ASYNC if punt else 0
        if lib.sys_util_uring_prep(ring, op, raw_fd(fd), iov, count, offset, 0, sqe_flags, tag) < 0:
            return False
        self._in_flight[tag] = (iov, handles)
        return True

    def _drain(self, ring: Any) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        tags, results, in_flight = self._tags, self._results, self._in_flight
        while n := lib.sys_util_uring_reap(ring, tags, results, self._capacity):
            for i in range(n):
                tag = tags[i]
                in_flight.pop(tag, None)
                out.append((tag, results[i]))
        return out


def uring_supported() -> bool:
    """Whether this kernel (and its ``io_uring_disabled`` sysctl, and our seccomp filter, if
    any) lets this process create a restricted ring."""
    try:
        IoUring(1).close()
    except OSError:
        return False
    return True
