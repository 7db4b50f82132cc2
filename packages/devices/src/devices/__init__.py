"""Virtual devices for crosvm: bus, serial, i8042, CMOS, PCI, virtio.

Imports here stay cheap (no threads started, no fds opened): every package above ``devices``
imports it.
"""

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

__all__ = [
    "I8042",
    "Bus",
    "BusDevice",
    "BusError",
    "BusRange",
    "Cmos",
    "ComPort",
    "Error",
    "Serial",
    "SerialConfigError",
    "SerialHardware",
    "SerialParameters",
    "SerialType",
    "__version__",
    "create_com_ports",
]
