"""timerfd(2): a timer that is a file descriptor, so it can sit in a PollContext."""

from __future__ import annotations

import os

from sys_util._binding import ffi, lib, raise_errno
from sys_util._fd import OwnedFd, check_anon_inode
from sys_util.errors import InvalidArgument

__all__ = ["TimerFd"]

_NS = 1_000_000_000


def _to_timespec(ts: object, seconds: float) -> None:
    ns = round(seconds * _NS)
    ts.tv_sec, ts.tv_nsec = divmod(ns, _NS)  # type: ignore[attr-defined]


def _from_timespec(ts: object) -> float:
    return ts.tv_sec + ts.tv_nsec / _NS  # type: ignore[attr-defined,no-any-return]


class TimerFd(OwnedFd):
    """A monotonic-clock timer. Readable (in epoll terms) once it has expired.

    Args:
        nonblocking: make :meth:`wait` raise BlockingIOError instead of blocking when the timer
            has not expired.
    """

    __slots__ = ()

    def __init__(self, *, nonblocking: bool = False) -> None:
        flags = lib.TFD_CLOEXEC | (lib.TFD_NONBLOCK if nonblocking else 0)
        fd = lib.timerfd_create(lib.CLOCK_MONOTONIC, flags)
        if fd < 0:
            raise_errno("timerfd_create")
        super().__init__(fd)

    def _init_from_fd(self) -> None:
        check_anon_inode(self._fd, "timerfd")

    def reset(self, delay: float, interval: float | None = None) -> None:
        """Arm the timer to expire after ``delay`` seconds, then every ``interval`` seconds.

        A ``delay`` of 0 means "as soon as possible" (the kernel would read 0 as "disarm", so the
        smallest non-zero delay is used instead).
        """
        if delay < 0 or (interval is not None and interval < 0):
            raise InvalidArgument(f"timer delay {delay} / interval {interval} must not be negative")
        spec = ffi.new("struct itimerspec *")
        _to_timespec(spec.it_value, delay)
        if spec.it_value.tv_sec == 0 and spec.it_value.tv_nsec == 0:
            spec.it_value.tv_nsec = 1
        if interval:
            _to_timespec(spec.it_interval, interval)
        # SAFETY: `spec` is a cffi-owned struct alive for the whole call; the old value is NULL.
        if lib.timerfd_settime(self.fileno(), 0, spec, ffi.NULL) < 0:
            raise_errno("timerfd_settime")

    def clear(self) -> None:
        """Disarm the timer (pending expirations already counted stay readable)."""
        spec = ffi.new("struct itimerspec *")
        # SAFETY: as in reset(); an all-zero it_value disarms.
        if lib.timerfd_settime(self.fileno(), 0, spec, ffi.NULL) < 0:
            raise_errno("timerfd_settime")

    def _get(self) -> object:
        spec = ffi.new("struct itimerspec *")
        # SAFETY: `spec` is a cffi-owned struct the kernel fills in; it outlives the call.
        if lib.timerfd_gettime(self.fileno(), spec) < 0:
            raise_errno("timerfd_gettime")
        return spec

    def is_armed(self) -> bool:
        """True while an expiration is scheduled."""
        spec = self._get()
        return bool(spec.it_value.tv_sec or spec.it_value.tv_nsec)  # type: ignore[attr-defined]

    def remaining(self) -> float:
        """Seconds until the next expiration (0.0 when disarmed)."""
        return _from_timespec(self._get().it_value)  # type: ignore[attr-defined]

    def wait(self) -> int:
        """Block until the timer expires; return the number of expirations since the last wait."""
        return int.from_bytes(os.read(self.fileno(), 8), "little")
