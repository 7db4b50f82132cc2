"""Numbers from the virtio 1.2 specification used by the transport and devices."""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "VIRTIO_MSI_NO_VECTOR",
    "DeviceStatus",
    "DeviceType",
    "Features",
    "IsrBits",
]

#: Vector number meaning "no MSI-X vector" in msix_config / queue_msix_vector.
VIRTIO_MSI_NO_VECTOR = 0xFFFF


class DeviceType(IntEnum):
    """virtio device IDs (section 5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5


class DeviceStatus(IntFlag):
    """Bits of the device_status field (section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class Features:
    """Feature bit *numbers* shared by every device type (section 6)."""

    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33


class IsrBits(IntFlag):
    """ISR status bits (section 4.1.4.5)."""

    QUEUE = 1
    CONFIG = 2
