"""Errors raised by qcow. Every error of this package derives from :class:`Error`.

:class:`Error` is an ``OSError`` carrying an errno, because the main user is a virtio-block device
that turns any failed request into an I/O error status: a caller that only knows "the disk
failed" (``except OSError``) still catches a corrupt image, while a caller that cares can catch
the precise subclass and read its fields. ``QcowError`` is the same class under the name the
issue tracker uses.

Raising any of these never leaves the image modified: every operation validates the metadata it
will touch before it writes anything.

Every error defines ``__reduce__`` so it survives pickling across a process boundary.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

__all__ = [
    "CorruptImage",
    "Error",
    "InvalidChain",
    "InvalidImage",
    "OutOfRange",
    "QcowError",
    "ReadOnlyImage",
    "UnsupportedFeature",
]


class Error(OSError):
    """Base class of every qcow error.

    Args:
        message: what went wrong, in one line.
        code: the errno that best describes the failure (``EIO`` by default).
    """

    def __init__(self, message: str, code: int = _errno.EIO) -> None:
        super().__init__(code, message)

    @property
    def message(self) -> str:
        return str(self.strerror)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.errno))


QcowError = Error


class InvalidImage(Error):
    """The file is not a qcow2 image at all, or its header is malformed (bad magic, version...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.EINVAL)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class CorruptImage(Error):
    """Image metadata is inconsistent: a table points outside the file, into the header, etc.

    Attributes:
        offset: the file offset of the bad metadata (or of what it points to), if known.
        reason: what is wrong with it.
    """

    def __init__(self, reason: str, offset: int | None = None) -> None:
        where = f" (at file offset {offset:#x})" if offset is not None else ""
        super().__init__(f"corrupt qcow2 image: {reason}{where}", _errno.EIO)
        self.reason = reason
        self.offset = offset

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.offset))


class UnsupportedFeature(Error):
    """The image uses a feature this library does not implement (encryption, extended L2...).

    Attributes:
        feature: the feature's name.
    """

    def __init__(self, feature: str) -> None:
        super().__init__(f"unsupported qcow2 feature: {feature}", _errno.ENOTSUP)
        self.feature = feature

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.feature,))


class ReadOnlyImage(Error):
    """A modifying call on an image opened read-only (or marked corrupt)."""

    def __init__(self, message: str = "image is opened read-only") -> None:
        super().__init__(message, _errno.EROFS)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class OutOfRange(Error):
    """A request addresses bytes past the end of the virtual disk (or has a negative offset)."""

    def __init__(self, offset: int, length: int, size: int) -> None:
        super().__init__(
            f"request [{offset:#x}, +{length:#x}) is outside the {size:#x}-byte disk",
            _errno.EINVAL,
        )
        self.offset = offset
        self.length = length
        self.size = size

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.offset, self.length, self.size))


class InvalidChain(Error):
    """A backing chain is unusable: missing file, a loop, or too deep.

    Attributes:
        path: the backing file that could not be used.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"backing file {path!r}: {reason}", _errno.EINVAL)
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))
