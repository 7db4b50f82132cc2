"""Errors raised by arch. Every error of this package derives from :class:`Error`.

The messages are single lines meant for a user (``crosvm run`` prints them as they are): a bad
kernel file, an impossible memory size or an over-long command line is a configuration mistake,
never a traceback. The fields say which input was wrong so callers and tests need not parse text.

Every error defines ``__reduce__`` so it survives pickling across a process boundary.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AddressExhausted",
    "AllocatorError",
    "CmdlineError",
    "CmdlineTooLong",
    "Error",
    "InitrdLoadError",
    "KernelLoadError",
    "MemoryLayoutError",
    "MpTableError",
    "VmSetupError",
]


class Error(Exception):
    """Base class of every arch error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class KernelLoadError(Error):
    """The kernel image is not something we can boot (garbage, truncated, 32-bit, too big).

    Attributes:
        reason: what is wrong with the image, without the file name.
        path: the file name when the image came from a file, else ``None``.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        prefix = f"{path}: " if path else ""
        super().__init__(f"{prefix}cannot load kernel: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.path))


class InitrdLoadError(Error):
    """The initial ramdisk cannot be placed in guest memory (too big, unreadable).

    Attributes:
        reason: what went wrong.
        path: the file name when the initrd came from a file, else ``None``.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        prefix = f"{path}: " if path else ""
        super().__init__(f"{prefix}cannot load initrd: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.path))


class CmdlineError(Error):
    """The kernel command line (or one parameter of it) is invalid.

    Attributes:
        reason: what is wrong.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid kernel command line: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


class CmdlineTooLong(CmdlineError):
    """The command line does not fit the kernel's limit.

    Attributes:
        length: the length the command line would have (without the terminating NUL).
        limit: the longest command line the kernel accepts (without the terminating NUL).
    """

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(f"{length} bytes is longer than the kernel's limit of {limit}")
        self.reason = "too long"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.length, self.limit))


class AllocatorError(Error):
    """An address-space allocator request is invalid (bad size, alignment or address)."""


class AddressExhausted(AllocatorError):
    """No free range of the requested size and alignment is left.

    Attributes:
        size: the requested size.
        alignment: the requested alignment.
        tag: the caller's label of the request.
    """

    def __init__(self, size: int, alignment: int, tag: str) -> None:
        self.size = size
        self.alignment = alignment
        self.tag = tag
        super().__init__(f"no free {size:#x}-byte range aligned to {alignment:#x} left for {tag!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.size, self.alignment, self.tag))


class MemoryLayoutError(Error):
    """The requested guest memory size cannot be laid out.

    Attributes:
        size: the requested size in bytes.
        reason: why it is refused.
    """

    def __init__(self, size: int, reason: str) -> None:
        self.size = size
        self.reason = reason
        super().__init__(f"invalid guest memory size {size:#x}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.size, self.reason))


class MpTableError(Error):
    """The MP table cannot describe the requested machine (too many CPUs or IRQ entries)."""


class VmSetupError(Error):
    """A step of building the VM failed (a KVM ioctl, a device placement).

    Attributes:
        step: the step that failed (``"create irqchip"``, ``"set cpuid vcpu 1"``...).
        detail: the underlying error text.
    """

    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        self.detail = detail
        super().__init__(f"VM setup failed at {step}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.detail))
