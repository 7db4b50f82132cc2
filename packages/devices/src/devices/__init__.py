"""Virtual devices for crosvm: bus, serial, i8042, CMOS, PCI, virtio.

``import devices`` stays cheap and can never be broken by a heavier subsystem: the bus and the
legacy devices (standard library only) are imported at once; the PCI, virtio and interrupt
names are resolved on first use (PEP 562), so a program that only needs a UART never loads the
virtqueue code, and a fault in one subsystem shows up where it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from devices.__about__ import __version__
from devices.bus import Bus, BusDevice, BusRange
from devices.cmos import Cmos
from devices.errors import BusError, Error, SerialConfigError
from devices.i8042 import I8042
from devices.serial import (
    ComPort,
    Serial,
    SerialHardware,
    SerialParameters,
    SerialType,
    create_com_ports,
)

if TYPE_CHECKING:
    from devices.irq import IoEvent, IrqRouter
    from devices.pci import PciAddress, PciConfigIo, PciDevice, PciError, PciRoot
    from devices.proxy import ProxyDevice, Sandbox
    from devices.virtio import (
        Block,
        Console,
        Interrupt,
        InvalidChain,
        Queue,
        Rng,
        VirtioDevice,
        VirtioError,
        VirtioPciDevice,
    )
    from devices.virtio.balloon import Balloon
    from devices.virtio.net import Net, Tap
    from devices.virtio.vsock import Vsock

# name -> module that defines it; imported on first attribute access.
_LAZY = {
    "IoEvent": "devices.irq",
    "IrqRouter": "devices.irq",
    "PciAddress": "devices.pci",
    "PciConfigIo": "devices.pci",
    "PciDevice": "devices.pci",
    "PciError": "devices.pci",
    "PciRoot": "devices.pci",
    "Block": "devices.virtio",
    "Console": "devices.virtio",
    "Interrupt": "devices.virtio",
    "InvalidChain": "devices.virtio",
    "Queue": "devices.virtio",
    "Rng": "devices.virtio",
    "VirtioDevice": "devices.virtio",
    "VirtioError": "devices.virtio",
    "VirtioPciDevice": "devices.virtio",
    "Balloon": "devices.virtio.balloon",
    "Net": "devices.virtio.net",
    "Tap": "devices.virtio.net",
    "Vsock": "devices.virtio.vsock",
    "ProxyDevice": "devices.proxy",
    "Sandbox": "devices.proxy",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'devices' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "I8042",
    "Balloon",
    "Block",
    "Bus",
    "BusDevice",
    "BusError",
    "BusRange",
    "Cmos",
    "ComPort",
    "Console",
    "Error",
    "Interrupt",
    "InvalidChain",
    "IoEvent",
    "IrqRouter",
    "Net",
    "PciAddress",
    "PciConfigIo",
    "PciDevice",
    "PciError",
    "PciRoot",
    "ProxyDevice",
    "Queue",
    "Rng",
    "Sandbox",
    "Serial",
    "SerialConfigError",
    "SerialHardware",
    "SerialParameters",
    "SerialType",
    "Tap",
    "VirtioDevice",
    "VirtioError",
    "VirtioPciDevice",
    "Vsock",
    "__version__",
    "create_com_ports",
]
