"""eventfd(2): the doorbell of a VMM (irqfd, ioeventfd, exit events, wakeups between threads)."""

from __future__ import annotations

import os
import select

from sys_util._fd import OwnedFd, check_anon_inode

__all__ = ["EventFd"]


class EventFd(OwnedFd):
    """An eventfd counter.

    ``write(n)`` adds ``n`` to the counter; ``read()`` returns it and resets it to zero (or, in
    semaphore mode, returns 1 and decrements it). ``read()`` blocks while the counter is zero unless
    the eventfd is nonblocking, in which case it raises ``BlockingIOError``.
    """

    __slots__ = ()

    def __init__(
        self, initial: int = 0, *, semaphore: bool = False, nonblocking: bool = False
    ) -> None:
        flags = os.EFD_CLOEXEC
        if semaphore:
            flags |= os.EFD_SEMAPHORE
        if nonblocking:
            flags |= os.EFD_NONBLOCK
        super().__init__(os.eventfd(initial, flags))

    def _init_from_fd(self) -> None:
        check_anon_inode(self._fd, "eventfd")

    def write(self, n: int = 1) -> None:
        """Add ``n`` (1 ... 2**64-2) to the counter, waking any reader."""
        os.eventfd_write(self.fileno(), n)

    def read(self) -> int:
        """Return and consume the counter (blocks while it is zero, unless nonblocking)."""
        return os.eventfd_read(self.fileno())

    def read_timeout(self, timeout: float) -> int | None:
        """Like ``read()`` but give up after ``timeout`` seconds, returning None."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return None
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:  # another reader won the race
            return None
