"""Virtual devices for crosvm: bus, serial, i8042, CMOS, PCI, virtio."""

from devices.__about__ import __version__
from devices.errors import Error

__all__ = ["Error", "__version__"]
