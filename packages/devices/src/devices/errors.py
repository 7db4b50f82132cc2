"""Errors raised by devices. Every error of this package derives from :class:`Error`.

Errors carry the values that caused them as fields (so callers can react without parsing
messages) and define ``__reduce__`` so they survive pickling across a device-process boundary.
The PCI and virtio modules keep their specific classes next to their code and derive from
:class:`Error` too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devices.pci import BarAllocationError, CapabilitySpaceFull, PciError, PciSlotsExhausted
    from devices.virtio import (
        ChainTooShort,
        DiskImageLocked,
        InvalidChain,
        InvalidQueue,
        VirtioError,
    )
    from devices.virtio.net import NetError, TapError
    from devices.virtio.vhost import VhostDeviceError
    from devices.virtio.vsock import VsockError

__all__ = [
    "BarAllocationError",
    "BusError",
    "CapabilitySpaceFull",
    "ChainTooShort",
    "DiskImageLocked",
    "Error",
    "InvalidChain",
    "InvalidQueue",
    "NetError",
    "PciError",
    "PciSlotsExhausted",
    "SerialConfigError",
    "TapError",
    "VhostDeviceError",
    "VirtioError",
    "VsockError",
]

# The PCI and virtio errors live beside their code (they import this module for Error); they
# are reachable here too, resolved on first use so that importing this module stays cheap and
# free of import cycles.
_ELSEWHERE = {
    "BarAllocationError": "devices.pci",
    "CapabilitySpaceFull": "devices.pci",
    "PciError": "devices.pci",
    "PciSlotsExhausted": "devices.pci",
    "ChainTooShort": "devices.virtio",
    "DiskImageLocked": "devices.virtio",
    "InvalidChain": "devices.virtio",
    "InvalidQueue": "devices.virtio",
    "VirtioError": "devices.virtio",
    "NetError": "devices.virtio.net",
    "TapError": "devices.virtio.net",
    "VhostDeviceError": "devices.virtio.vhost",
    "VsockError": "devices.virtio.vsock",
}


def __getattr__(name: str) -> object:
    module = _ELSEWHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'devices.errors' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class Error(Exception):
    """Base class of every devices error."""


class BusError(Error):
    """A :class:`devices.bus.Bus` insertion was refused.

    ``base``/``length`` is the requested range; ``existing_base``/``existing_length``/
    ``existing_label`` describe the range it collides with (``None`` when the request itself is
    invalid, e.g. empty or beyond 64 bits).
    """

    def __init__(
        self,
        base: int,
        length: int,
        reason: str,
        existing_base: int | None = None,
        existing_length: int | None = None,
        existing_label: str | None = None,
    ) -> None:
        self.base = base
        self.length = length
        self.reason = reason
        self.existing_base = existing_base
        self.existing_length = existing_length
        self.existing_label = existing_label
        msg = f"bus range [{base:#x}, {base + length:#x}) {reason}"
        if existing_base is not None and existing_length is not None:
            msg += (
                f" [{existing_base:#x}, {existing_base + existing_length:#x})"
                f" of {existing_label or '?'}"
            )
        super().__init__(msg)

    def __reduce__(self) -> tuple[type[BusError], tuple[object, ...]]:
        return (
            type(self),
            (
                self.base,
                self.length,
                self.reason,
                self.existing_base,
                self.existing_length,
                self.existing_label,
            ),
        )


class SerialConfigError(Error, ValueError):
    """A ``--serial`` parameter string is invalid.

    ``value`` is the offending text (the whole option or one ``key=value`` item); ``reason`` is a
    one-line explanation suitable for a command-line error message.
    """

    def __init__(self, value: str, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"invalid --serial {value!r}: {reason}")

    def __reduce__(self) -> tuple[type[SerialConfigError], tuple[str, str]]:
        return (type(self), (self.value, self.reason))
