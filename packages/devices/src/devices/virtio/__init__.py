"""virtio: split virtqueues, the modern virtio-pci transport, block, rng and console devices.

Layers, bottom up: :class:`Queue` (ring math, chain validation) hands out
:class:`DescriptorChain` objects whose :class:`Reader`/:class:`Writer` give zero-copy views of
guest RAM; a :class:`VirtioDevice` serves its queues in a worker thread; a
:class:`VirtioPciDevice` exposes it to the guest as a PCI function.
"""

from devices.virtio._constants import (
    VIRTIO_MSI_NO_VECTOR,
    DeviceStatus,
    DeviceType,
    Features,
    IsrBits,
)
from devices.virtio._device import RING_FEATURES, ThreadedVirtioDevice, VirtioDevice
from devices.virtio._disk import DiskBackend, RawDisk
from devices.virtio._errors import (
    ChainTooShort,
    DiskImageLocked,
    InvalidChain,
    InvalidQueue,
    VirtioError,
)
from devices.virtio._interrupt import Interrupt
from devices.virtio._pci import BAR0_SIZE, NOTIFY_OFF_MULTIPLIER, VirtioPciDevice
from devices.virtio._queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    Queue,
    vring_need_event,
)
from devices.virtio._reader_writer import Reader, Writer
from devices.virtio.block import Block
from devices.virtio.console import Console
from devices.virtio.rng import Rng

__all__ = [
    "BAR0_SIZE",
    "NOTIFY_OFF_MULTIPLIER",
    "RING_FEATURES",
    "VIRTIO_MSI_NO_VECTOR",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "Block",
    "ChainTooShort",
    "Console",
    "DescriptorChain",
    "DeviceStatus",
    "DeviceType",
    "DiskBackend",
    "DiskImageLocked",
    "Features",
    "Interrupt",
    "InvalidChain",
    "InvalidQueue",
    "IsrBits",
    "Queue",
    "RawDisk",
    "Reader",
    "Rng",
    "ThreadedVirtioDevice",
    "VirtioDevice",
    "VirtioError",
    "VirtioPciDevice",
    "Writer",
    "vring_need_event",
]
