"""virtio: split virtqueues, the modern virtio-pci transport, block, rng and console devices.

Layers, bottom up: :class:`Queue` (ring math, chain validation) hands out
:class:`DescriptorChain` objects whose :class:`Reader`/:class:`Writer` give zero-copy views of
guest RAM; a :class:`VirtioDevice` serves its queues in a worker thread; a
:class:`VirtioPciDevice` exposes it to the guest as a PCI function.

Serving a block request from a mock driver (the same path a guest takes, minus KVM)::

    >>> import os, struct, tempfile
    >>> from sys_util import EventFd
    >>> from devices.testing import VirtQueueDriver, make_guest_memory
    >>> from devices.virtio import Block, Interrupt
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "disk.img")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(b"hello, disk!" + bytes((1 << 20) - 12))
    >>> mem = make_guest_memory(4 << 20)
    >>> block = Block.open(path)
    >>> block.ack_features(block.features())
    >>> driver = VirtQueueDriver(mem, 0x10000, size=64)
    >>> kick, irq = EventFd(), EventFd()
    >>> block.activate(mem, Interrupt(intx_evt=irq),
    ...                [driver.make_queue(features=block.acked_features)], [kick])
    >>> chain = driver.add_request([struct.pack("<IIQ", 0, 0, 0)], [512, 1])  # IN, sector 0
    >>> driver.kick(kick)
    >>> driver.wait_used(1) == [(chain.head, 513)]
    True
    >>> data = driver.read_writable(chain)
    >>> data[:12], data[-1]  # the sector, then status VIRTIO_BLK_S_OK
    (b'hello, disk!', 0)
    >>> block.close(); kick.close(); irq.close(); mem.close(); tmp.cleanup()
"""

from devices.virtio._constants import (
    VIRTIO_MSI_NO_VECTOR,
    DeviceStatus,
    DeviceType,
    Features,
    IsrBits,
)
from devices.virtio._device import RING_FEATURES, ThreadedVirtioDevice, VirtioDevice
from devices.virtio._disk import DiskBackend, RawDisk, open_disk
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
    "open_disk",
    "vring_need_event",
]
