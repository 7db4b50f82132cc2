"""Configuration mechanism #1: address register at 0xCF8, data window at 0xCFC-0xCFF."""

from __future__ import annotations

import threading

from devices.pci._root import PciRoot

__all__ = ["PCI_CONFIG_IO_BASE", "PCI_CONFIG_IO_SIZE", "PciConfigIo"]

PCI_CONFIG_IO_BASE = 0xCF8
PCI_CONFIG_IO_SIZE = 8
_ENABLE = 0x8000_0000


class PciConfigIo:
    """A :class:`~devices.bus.BusDevice` for ports 0xCF8-0xCFF, in front of a :class:`PciRoot`.

    The address register may be accessed a byte at a time (Linux's type-1 probe writes 0xCFB);
    the data window takes byte, word and dword accesses at any offset that stays in the dword.
    """

    def __init__(self, root: PciRoot) -> None:
        self._root = root
        self._address = 0
        self._lock = threading.Lock()

    def debug_label(self) -> str:
        return "pci config io-port"

    @property
    def root(self) -> PciRoot:
        return self._root

    def _target(self) -> tuple[int, int, int, int] | None:
        addr = self._address
        if not addr & _ENABLE:
            return None
        return (addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 0x7, (addr >> 2) & 0x3F

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        with self._lock:
            if offset < 4:
                if offset + size > 4:
                    return b"\xff" * size
                return self._address.to_bytes(4, "little")[offset : offset + size]
            target = self._target()
        byte = offset - 4
        if target is None or byte + size > 4:
            return b"\xff" * size
        value = self._root.config_read(*target)
        return value.to_bytes(4, "little")[byte : byte + size]

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size == 0:
            return
        with self._lock:
            if offset < 4:
                if offset + size > 4:
                    return
                raw = bytearray(self._address.to_bytes(4, "little"))
                raw[offset : offset + size] = data
                self._address = int.from_bytes(raw, "little") & 0x80FF_FFFC
                return
            target = self._target()
        byte = offset - 4
        if target is None or byte + size > 4:
            return
        self._root.config_write(*target, byte, bytes(data))
