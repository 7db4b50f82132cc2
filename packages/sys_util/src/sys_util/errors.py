"""Errors raised by sys_util.

Raw syscalls raise the builtin :class:`OSError` (so ``except FileNotFoundError`` and friends work).
Domain failures raise :class:`Error` or a subclass. :class:`Error` is itself an ``OSError`` carrying
an ``errno``, so a caller that only knows "system call failed" still catches it; the subclasses
carry the fields that explain *which* request failed (an address, a length, a token).

Every error defines ``__reduce__`` so it survives pickling across a process boundary (msg_socket
sends errors from forked device processes back to the main process).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

__all__ = [
    "Error",
    "GuestMemoryError",
    "InvalidArgument",
    "MessageTruncated",
    "PollError",
    "SysfsError",
    "VhostError",
]


class Error(OSError):
    """Base class of every sys_util domain error.

    Args:
        code: the errno that best describes the failure (``EINVAL`` by default).
        message: human readable text; defaults to ``os.strerror(code)``.

    A subclass whose ``__init__`` takes other arguments must define ``__reduce__`` returning
    them, as every subclass here does, or it will not survive pickling.
    """

    def __init__(self, code: int = _errno.EINVAL, message: str | None = None) -> None:
        super().__init__(code, message if message is not None else os.strerror(code))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.strerror))


class InvalidArgument(Error):
    """A caller passed a value the operation cannot accept (a negative size, a bad alignment)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.strerror,))


class GuestMemoryError(Error):
    """An access to guest memory fell (partly) outside guest RAM, or its arithmetic overflowed.

    The guest controls these numbers, so this is an expected error for a device to report on the
    one request that carried them; it never means the VMM is broken.

    Attributes:
        address: the guest physical address of the access.
        length: the number of bytes the access wanted.
    """

    def __init__(self, address: int, length: int, reason: str = "outside guest memory") -> None:
        self.address = address
        self.length = length
        self.reason = reason
        super().__init__(
            _errno.EFAULT,
            f"guest memory access at {address:#x} (length {length:#x}) is {reason}",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.address, self.length, self.reason))


class MessageTruncated(Error):
    """A received message or its file descriptors did not fit the buffers given to recv.

    Any file descriptors that did arrive were closed before this was raised.

    Attributes:
        what: ``"data"`` or ``"fds"``.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(_errno.EMSGSIZE, f"received message truncated ({what})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what,))


class PollError(Error):
    """A PollContext request named an fd it does not know, or one it already watches.

    Attributes:
        fd: the file descriptor in question.
    """

    def __init__(self, code: int, fd: int, message: str) -> None:
        self.fd = fd
        super().__init__(code, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.fd, self.strerror))


class SysfsError(Error):
    """A sysfs file did not have the format the kernel documents.

    Attributes:
        path: the file that could not be parsed.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(_errno.EINVAL, f"{path}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.message))


class VhostError(Error):
    """A vhost ioctl (or opening a vhost node) failed.

    Attributes:
        request: the ioctl's name (``"VHOST_SET_MEM_TABLE"``) or ``"open"``.
        code: the errno (also ``.errno``).
        detail: what went wrong, when more is known than the errno says.
        path: the device node, for ``open``.
    """

    def __init__(
        self, request: str, code: int, detail: str | None = None, *, path: str | None = None
    ) -> None:
        self.request = request
        self.code = code
        self.detail = detail
        self.path = path
        text = detail if detail is not None else os.strerror(code)
        super().__init__(code, text if request == "open" else f"{request} failed: {text}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_vhost_error, (self.request, self.code, self.detail, self.path))


def _make_vhost_error(request: str, code: int, detail: str | None, path: str | None) -> VhostError:
    return VhostError(request, code, detail, path=path)
