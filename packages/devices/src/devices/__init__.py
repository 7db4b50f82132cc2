"""Virtual devices for crosvm: bus, serial, i8042, CMOS, PCI, virtio.

Imports here stay cheap (no threads started, no fds opened): every package above ``devices``
imports it.
"""

from devices.__about__ import __version__
from devices.bus import Bus, BusDevice, BusRange
from devices.errors import BusError, Error, SerialConfigError

__all__ = [
    "Bus",
    "BusDevice",
    "BusError",
    "BusRange",
    "Error",
    "SerialConfigError",
    "__version__",
]
