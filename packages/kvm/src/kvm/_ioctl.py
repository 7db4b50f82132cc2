"""The only path from this package to ``ioctl``: typed C wrappers that return ``-errno``."""

from __future__ import annotations

import errno
import os
from typing import Any, NoReturn, Protocol

from kvm_sys import lib

__all__ = ["Fd", "fd_of", "ioctl_ptr", "ioctl_val", "raise_errno"]


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


Fd = int | _HasFileno


def fd_of(obj: Fd) -> int:
    """An fd number from an int or from anything with ``fileno()`` (EventFd, files, sockets)."""
    if isinstance(obj, int):
        fd = obj
    else:
        fd = obj.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return fd


def raise_errno(err: int, what: str) -> NoReturn:
    raise OSError(err, f"{os.strerror(err)} (from ioctl({what}))")


def ioctl_ptr(fd: int, request: int, arg: Any, what: str) -> int:
    """``ioctl(fd, request, arg)`` with a cffi pointer (or NULL) argument."""
    # SAFETY: every caller passes a cffi object it allocated with the size the request's
    # struct needs (or larger, for flexible arrays); it stays alive until this call returns.
    r = lib.kvm_ioctl_ptr(fd, request, arg)
    if r < 0:
        raise_errno(-r, what)
    return r


def ioctl_val(fd: int, request: int, value: int, what: str) -> int:
    """``ioctl(fd, request, value)`` with an unsigned long argument (any 64-bit value)."""
    r = lib.kvm_ioctl_val(fd, request, value)
    if r < 0:
        raise_errno(-r, what)
    return r
