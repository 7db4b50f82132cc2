"""Asynchronous reads, writes and flushes of a raw image for virtio-block, through io_uring.

Why: with a deep guest queue the disk must see many requests at once. A pool of Python threads
does that at ~35 us of lock hand-overs per request; one io_uring submits a whole batch in one
system call and needs no thread of ours. Buffered reads take one of two ways by size:

- a small read (up to SMALL_READ_BYTES, e.g. a random 4 KiB one) goes to the ring as it is: the
  ring serves a page-cache hit at once and waits for a miss with a page callback, no thread
  involved (cold QD32 4 KiB reads in a guest: 0.50x -> 1.11x QEMU's `cache=none`);
- a large one that is not wholly in the page cache goes to the ring on the image's O_DIRECT
  read fd when the disk has one (``RawDisk.read_fd``: at least 256 KiB, a question to
  ``cachestat``), asynchronous in the ring itself (cold sequential reads in a guest went from
  0.31x/0.62x to 1.02x/1.00x of QEMU's ``cache=none`` at QD1/QD32);
- any other large one is first tried with ``preadv2(RWF_NOWAIT)`` (a hit is done at once, the
  cheapest path there is); a miss goes to the kernel's I/O workers (IOSQE_ASYNC), which read it
  in one blocking call with readahead, where the ring's own attempt would crawl page by page.

O_DIRECT reads are asynchronous in the ring itself. The ring's eventfd wakes the device's
worker when completions arrive.

Completions can arrive in any order (virtio allows it); a flush is queued with IO_DRAIN, so it
starts only after everything submitted before it finished. A short or failed transfer is
retried synchronously (``DiskBackend.read_into``/``write_from`` know how to finish short
transfers and how to fall back from O_DIRECT), so the guest sees the same results as on the
synchronous path.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Generic, TypeVar

from devices.virtio._disk import RawDisk
from sys_util import EventFd, IoUring

__all__ = ["RingIo"]

T = TypeVar("T")

#: Enough for every descriptor of a 256-entry queue to be a request in flight.
RING_ENTRIES = 256
#: Kernel workers for reads that miss the page cache: the kernel's default (4 per CPU) kept a
#: guest's 32 cold 4 KiB reads at 8 in flight (~8k IOPS here vs QEMU's 20k with 64 threads).
IO_WORKERS = 64

#: Buffered reads up to this size skip the RWF_NOWAIT attempt and the kernel workers. On a cold
#: image (host-side test, QD32 random 4 KiB): NOWAIT attempt + worker 29-36k reads/s, worker
#: alone 44-47k, the ring's own asynchronous buffered read 55-64k. (A miss in the NOWAIT attempt
#: starts the readahead I/O in our thread, one request after another.)
SMALL_READ_BYTES = 64 << 10

_READ, _WRITE, _FLUSH = 0, 1, 2


class _Request(Generic[T]):
    __slots__ = ("iovecs", "kind", "length", "offset", "token")

    def __init__(
        self, kind: int, token: T, iovecs: Sequence[memoryview], offset: int, length: int
    ) -> None:
        self.kind = kind
        self.token = token
        self.iovecs = iovecs
        self.offset = offset
        self.length = length


class RingIo(Generic[T]):
    """The asynchronous I/O of one raw disk. Not thread-safe: the device's worker owns it.

    Each request carries a caller's ``token``; :meth:`completions` gives ``(token, error)``,
    ``error`` None on success or the reason the request failed. The
    ``read``/``write``/``flush`` methods return False when the ring is full: the caller then
    does that request synchronously.
    """

    def __init__(self, disk: RawDisk, entries: int = RING_ENTRIES) -> None:
        self._disk = disk
        self._fd = disk.fileno()
        # O_DIRECT reads are asynchronous in the ring itself: no page cache to try first, no
        # kernel worker needed.
        self._direct = disk.direct
        self._ring = IoUring(entries, max_workers=IO_WORKERS)
        try:
            self.event = EventFd(nonblocking=True)
            self._ring.register_eventfd(self.event)
        except BaseException:
            self._ring.close()
            raise
        self._requests: dict[int, _Request[T]] = {}
        self._next_tag = 0
        self._queued = 0
        self._done: list[tuple[T, str | None]] = []

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def close(self) -> None:
        """Wait for requests in flight (they may still write guest memory), then release."""
        self._ring.close()
        self.event.close()
        self._requests.clear()

    # -- requests ------------------------------------------------------------------------------

    def read(self, token: T, iovecs: Sequence[memoryview], offset: int, length: int) -> bool:
        """Read into ``iovecs``; True if it is done already or queued, False if the ring is
        full. A read served from the page cache right away completes with ``(token, None)``
        at the next :meth:`completions`."""
        request = _Request(_READ, token, iovecs, offset, length)
        if self._direct or length <= SMALL_READ_BYTES:
            return self._queue(request, self._fd)
        fd = self._disk.read_fd(offset, length)
        if fd != self._fd:  # not all cached: O_DIRECT, asynchronous in the ring itself
            return self._queue(request, fd)
        try:
            got = os.preadv(fd, iovecs, offset, os.RWF_NOWAIT)
        except OSError:  # EAGAIN: not cached (a kernel worker reads it)
            got = -1
        if got == length:
            self._done.append((token, None))
            return True
        # A large read that missed the page cache: a kernel worker reads it in one blocking
        # call (with readahead), where the ring's own attempt would resume it page by page.
        return self._queue(request, fd, punt=True)

    def write(self, token: T, iovecs: Sequence[memoryview], offset: int, length: int) -> bool:
        return self._queue(_Request(_WRITE, token, iovecs, offset, length), self._fd)

    def flush(self, token: T) -> bool:
        """fdatasync after everything queued before it (IO_DRAIN)."""
        tag = self._tag()
        if not self._ring.fsync(self._fd, tag):
            return False
        self._requests[tag] = _Request(_FLUSH, token, (), 0, 0)
        self._queued += 1
        return True

    def submit(self) -> None:
        """Start everything queued since the last call."""
        if self._queued:
            self._ring.submit(0)
            self._queued = 0

    def completions(self) -> list[tuple[T, str | None]]:
        """Finished requests: ``(token, error or None)``; a short or EINVAL transfer was retried
        synchronously first."""
        done, self._done = self._done, []
        if self._requests:
            for tag, result in self._ring.completions():
                request = self._requests.pop(tag, None)
                if request is not None:
                    done.append((request.token, self._finish(request, result)))
        return done

    def wait_all(self) -> list[tuple[T, str | None]]:
        """Block until nothing is in flight (an ordering barrier); return every completion."""
        self.submit()
        done = self.completions()
        while self._requests:
            self._ring.submit(1)
            done += self.completions()
        return done

    # -- internals -----------------------------------------------------------------------------

    def _tag(self) -> int:
        self._next_tag = tag = (self._next_tag + 1) & 0xFFFF_FFFF_FFFF
        return tag

    def _queue(self, request: _Request[T], fd: int, *, punt: bool = False) -> bool:
        tag = self._tag()
        ring = self._ring
        if request.kind == _READ:
            ok = ring.readv(fd, request.iovecs, request.offset, tag, punt=punt)
        else:
            ok = ring.writev(fd, request.iovecs, request.offset, tag)
        if ok:
            self._requests[tag] = request
            self._queued += 1
        return ok

    def _finish(self, request: _Request[T], result: int) -> str | None:
        if request.kind == _FLUSH:
            return None if result >= 0 else f"flush: {os.strerror(-result)}"
        if result == request.length:
            return None
        what = "read" if request.kind == _READ else "write"
        # Short (file shrunk, a signal) or EINVAL (O_DIRECT alignment): the synchronous path
        # finishes short transfers and falls back from O_DIRECT to the buffered fd.
        if result < 0 and -result not in (errno.EINVAL, errno.EAGAIN, errno.EINTR):
            return f"{what} of {request.length} bytes at {request.offset}: {os.strerror(-result)}"
        try:
            if request.kind == _READ:
                got = self._disk.read_into(request.iovecs, request.offset)
                if got != request.length:
                    return f"short read of {got}/{request.length} bytes at {request.offset}"
            else:
                self._disk.write_from(request.iovecs, request.offset)
        except OSError as err:
            return f"{what} of {request.length} bytes at {request.offset}: {err}"
        return None
