"""virtio-net errors (subclasses of :class:`devices.virtio.VirtioError`)."""

from __future__ import annotations

from devices.virtio._errors import VirtioError

__all__ = ["NetError", "TapError"]


class NetError(VirtioError):
    """Base class of virtio-net errors."""


class TapError(NetError):
    """A TAP device could not be opened or configured.

    ``what`` names the operation (``"TUNSETIFF"``, ``"open /dev/net/tun"``...), ``errno`` is the
    kernel's answer (0 when the failure was ours, e.g. an fd that is not a TAP), ``name`` the
    interface name when known.
    """

    def __init__(self, what: str, errno: int, reason: str, name: str | None = None) -> None:
        where = f" ({name})" if name else ""
        super().__init__(f"tap{where}: {what}: {reason}")
        self.what = what
        self.errno = errno
        self.reason = reason
        self.name = name

    def __reduce__(self) -> tuple[type[TapError], tuple[str, int, str, str | None]]:
        return (type(self), (self.what, self.errno, self.reason, self.name))
