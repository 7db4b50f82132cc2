"""Errors raised by kvm. Every error of this package derives from :class:`Error`.

Failed ioctls are not wrapped: they raise the builtin ``OSError`` (so ``except PermissionError``
and ``e.errno`` work), with the ioctl's name in the message.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every kvm error."""


class ApiVersionError(Error):
    """``/dev/kvm`` speaks another API version than the stable 12 this package is written for."""

    def __init__(self, version: int) -> None:
        super().__init__(f"KVM API version {version}, expected 12")
        self.version = version

    def __reduce__(self) -> tuple[type[ApiVersionError], tuple[int]]:
        return (type(self), (self.version,))


class ReplyError(Error):
    """``set_io_in_data`` / ``set_mmio_read_data`` called without a matching pending exit,
    or with the wrong number of bytes. Nothing was written to the ``kvm_run`` page."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[ReplyError], tuple[str]]:
        return (type(self), (self.message,))


class MsrError(Error):
    """``KVM_GET_MSRS`` / ``KVM_SET_MSRS`` stopped at ``index``: KVM rejects that MSR."""

    def __init__(self, index: int, done: int) -> None:
        super().__init__(f"KVM refused MSR {index:#x} (after {done} MSRs)")
        self.index = index
        self.done = done

    def __reduce__(self) -> tuple[type[MsrError], tuple[int, int]]:
        return (type(self), (self.index, self.done))
