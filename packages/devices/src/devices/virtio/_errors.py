"""virtio errors (the lead merges these into :mod:`devices.errors`)."""

from __future__ import annotations

from devices.errors import Error


class VirtioError(Error):
    """Base class of virtio errors."""


class InvalidChain(VirtioError):
    """A descriptor chain broke the rules (address outside RAM, loop, bad flags, too long...).

    ``head`` is the chain's head index, or ``None`` when even the head index was out of range.
    Only that request fails; the queue keeps working.
    """

    def __init__(self, head: int | None, reason: str) -> None:
        super().__init__(f"invalid descriptor chain (head {head}): {reason}")
        self.head = head
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidChain], tuple[int | None, str]]:
        return (type(self), (self.head, self.reason))


class InvalidQueue(VirtioError):
    """A queue's configuration is unusable (rings outside RAM, misaligned, bad size)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid virtqueue: {reason}")
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidQueue], tuple[str]]:
        return (type(self), (self.reason,))


class ChainTooShort(VirtioError):
    """A Reader/Writer was asked for more bytes than the chain holds in that direction."""

    def __init__(self, wanted: int, available: int) -> None:
        super().__init__(f"descriptor chain too short: wanted {wanted} bytes, {available} left")
        self.wanted = wanted
        self.available = available

    def __reduce__(self) -> tuple[type[ChainTooShort], tuple[int, int]]:
        return (type(self), (self.wanted, self.available))


class DiskImageLocked(VirtioError):
    """Another process (another VM) holds a conflicting lock on the disk image."""

    def __init__(self, path: str, exclusive: bool) -> None:
        mode = "read-write" if exclusive else "read-only"
        super().__init__(
            f"disk image {path!r} is in use by another process; cannot open it {mode} "
            "(an image opened writable by one VM cannot be opened by another)"
        )
        self.path = path
        self.exclusive = exclusive

    def __reduce__(self) -> tuple[type[DiskImageLocked], tuple[str, bool]]:
        return (type(self), (self.path, self.exclusive))
