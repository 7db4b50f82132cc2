"""What :class:`~devices.pci.PciRoot` needs from a PCI function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["BarAllocator", "PciAddress", "PciDevice"]

#: ``(size, alignment) -> guest-physical address``; ``arch`` passes its ``AddressAllocator``.
BarAllocator = Callable[[int, int], int]


@dataclass(frozen=True, slots=True, order=True)
class PciAddress:
    """bus:device.function, printed like lspci."""

    bus: int
    device: int
    function: int

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function:x}"


@runtime_checkable
class PciDevice(Protocol):
    """A PCI function as seen through configuration cycles.

    ``reg_idx`` is the dword index (0..63); writes are 1, 2 or 4 bytes at byte ``offset`` of it.
    """

    def debug_label(self) -> str: ...

    def read_config_register(self, reg_idx: int) -> int: ...

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None: ...
