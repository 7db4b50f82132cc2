"""PCI bus 0: the host bridge at 00:00.0 plus up to 31 single-function devices."""

from __future__ import annotations

import threading

from devices.pci._config import PciClass, PciConfiguration
from devices.pci._device import PciAddress, PciDevice
from devices.pci._errors import PciSlotsExhausted

__all__ = ["PciHostBridge", "PciRoot"]

HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x1237  # Intel 440FX, as crosvm presents
NUM_DEVICES = 32


class PciHostBridge:
    """The 00:00.0 host bridge: identity only, no BARs, no interrupts."""

    def __init__(self) -> None:
        self.config = PciConfiguration(
            vendor_id=HOST_BRIDGE_VENDOR,
            device_id=HOST_BRIDGE_DEVICE,
            class_code=PciClass.BRIDGE,
            subclass=0x00,
        )

    def debug_label(self) -> str:
        return "pci host bridge"

    def read_config_register(self, reg_idx: int) -> int:
        return self.config.read_reg(reg_idx)

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        self.config.write_reg(reg_idx, offset, data)


class PciRoot:
    """Routes configuration cycles to the functions on bus 0.

    Config cycles come from vCPU threads (through :class:`~devices.pci.PciConfigIo`); a lock
    serialises them so a device sees one access at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[int, PciDevice] = {0: PciHostBridge()}

    def add_device(self, device: PciDevice, device_number: int | None = None) -> PciAddress:
        """Place ``device`` at 00:NN.0 (the lowest free number unless given) and return it."""
        with self._lock:
            if device_number is None:
                free = [n for n in range(1, NUM_DEVICES) if n not in self._devices]
                if not free:
                    raise PciSlotsExhausted(device.debug_label())
                device_number = free[0]
            elif not 0 < device_number < NUM_DEVICES or device_number in self._devices:
                raise ValueError(f"PCI device number {device_number} is invalid or taken")
            self._devices[device_number] = device
            return PciAddress(0, device_number, 0)

    def devices(self) -> list[tuple[PciAddress, PciDevice]]:
        with self._lock:
            return [(PciAddress(0, n, 0), d) for n, d in sorted(self._devices.items())]

    def _lookup(self, bus: int, device: int, function: int) -> PciDevice | None:
        if bus != 0 or function != 0:
            return None
        return self._devices.get(device)

    def config_read(self, bus: int, device: int, function: int, reg_idx: int) -> int:
        """Dword ``reg_idx`` of bus:device.function; absent functions read as all ones."""
        with self._lock:
            dev = self._lookup(bus, device, function)
            if dev is None:
                return 0xFFFF_FFFF
            return dev.read_config_register(reg_idx) & 0xFFFF_FFFF

    def config_write(
        self, bus: int, device: int, function: int, reg_idx: int, offset: int, data: bytes
    ) -> None:
        with self._lock:
            dev = self._lookup(bus, device, function)
            if dev is not None:
                dev.write_config_register(reg_idx, offset, data)
