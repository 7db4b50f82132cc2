"""virtio-vsock served by the kernel's vhost-vsock: guest sockets meet host ``AF_VSOCK``.

The guest sees the same device as :class:`devices.virtio.vsock.Vsock` (type 19, configuration
space = the guest CID), but its rx and tx rings (queues 0 and 1) are handed to the kernel,
which connects guest streams to host programs using ``AF_VSOCK`` sockets directly. The event
queue (2) stays here, as in crosvm: the driver posts buffers we never need to fill.

The CID is registered with the kernel when the device is created (in the main process, before
the VM starts), so a CID another VM holds is a clean ``EADDRINUSE`` error at start-up.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from devices.virtio.vhost._device import (
    RING_KERNEL_FEATURES,
    VhostBackend,
    VhostDevice,
    VhostDeviceError,
)
from devices.virtio.vsock import VIRTIO_ID_VSOCK

__all__ = ["VIRTIO_VSOCK_F_SEQPACKET", "VSOCK_KERNEL_FEATURES", "VhostVsock", "VhostVsockBackend"]

#: virtio-vsock feature bit number: SOCK_SEQPACKET support (virtio 1.2 section 5.10.3).
VIRTIO_VSOCK_F_SEQPACKET = 1
VSOCK_KERNEL_FEATURES = RING_KERNEL_FEATURES | 1 << VIRTIO_VSOCK_F_SEQPACKET
QUEUE_SIZES = (256, 256, 64)
EVQ = 2
_CONFIG = struct.Struct("<Q")


class VhostVsockBackend(VhostBackend, Protocol):
    """``sys_util.VhostVsock``."""

    def set_guest_cid(self, cid: int) -> None: ...

    def set_running(self, running: bool) -> None: ...


class VhostVsock(VhostDevice):
    """A socket device for guest ``guest_cid`` served by ``vhost`` (owned; :meth:`close`
    closes it)."""

    kernel_feature_mask = VSOCK_KERNEL_FEATURES

    def __init__(self, vhost: VhostVsockBackend, guest_cid: int) -> None:
        if not 3 <= guest_cid <= 0xFFFF_FFFE:
            raise VhostDeviceError(
                "vhost-vsock", f"guest CID {guest_cid} is reserved or out of range (3..2^32-2)"
            )
        self.guest_cid = guest_cid
        self.vsock_vhost = vhost
        super().__init__(vhost, kernel_queues=2)
        try:
            vhost.set_guest_cid(guest_cid)
        except OSError as err:
            raise VhostDeviceError(
                self.debug_label(), f"cannot claim guest CID {guest_cid}: {err.strerror}"
            ) from err

    def debug_label(self) -> str:
        return "vhost-vsock"

    @property
    def device_type(self) -> int:
        return VIRTIO_ID_VSOCK

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return list(QUEUE_SIZES)

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    def start_backend(self) -> None:
        self.vsock_vhost.set_running(True)

    def stop_backend(self) -> None:
        self.vsock_vhost.set_running(False)
