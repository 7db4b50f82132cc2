"""The only path from this package to ``ioctl``: typed C wrappers that return ``-errno``."""

from __future__ import annotations

import errno
import os
from typing import Any, NoReturn, Protocol

from kvm_sys import ffi, lib

__all__ = [
    "Fd",
    "fd_of",
    "get_struct_bytes",
    "ioctl_ptr",
    "ioctl_val",
    "raise_errno",
    "set_struct_bytes",
]


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


def get_struct_bytes(fd: int, request: int, ctype: str, what: str) -> bytes:
    """An opaque state struct (XSAVE area, PIT state...) read by ``request``, as bytes."""
    c = ffi.new(f"{ctype} *")
    # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
    ioctl_ptr(fd, request, c, what)
    return bytes(ffi.buffer(c))


def set_struct_bytes(fd: int, request: int, ctype: str, data: bytes, what: str) -> None:
    """Write back state from :func:`get_struct_bytes`; it must be exactly the struct's size."""
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise ValueError(f"{what} needs exactly {size} bytes, got {len(data)}")
    c = ffi.new(f"{ctype} *")
    ffi.memmove(c, bytes(data), size)
    # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
    ioctl_ptr(fd, request, c, what)
