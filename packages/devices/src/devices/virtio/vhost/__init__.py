"""virtio devices whose rings the host kernel serves (vhost-net, vhost-vsock), after crosvm's
``devices/src/virtio/vhost``.

The device objects here do the virtio side (features, configuration space, activation, reset,
interrupts); the kernel does the data path through a ``sys_util.Vhost`` fd. Open the fd where
``/dev`` is visible (the main process), create the device, and let the sandbox fork it: the
kernel binds the fd to the process that calls ``VHOST_SET_OWNER``, which the device does at
activation, in the process that maps guest memory::

    from sys_util import VhostNet as VhostNetFd
    from devices.virtio.net import Tap
    from devices.virtio.vhost import VhostNet
    net = VhostNet(VhostNetFd.open(), Tap.create("vmtap%d"), mac=bytes.fromhex("020000000001"))
"""

from devices.virtio.vhost._device import (
    RING_KERNEL_FEATURES,
    VhostBackend,
    VhostDevice,
    VhostDeviceError,
    ring_host_addresses,
)
from devices.virtio.vhost._net import NET_KERNEL_FEATURES, TapLike, VhostNet, VhostNetBackend
from devices.virtio.vhost._vsock import (
    VIRTIO_VSOCK_F_SEQPACKET,
    VSOCK_KERNEL_FEATURES,
    VhostVsock,
    VhostVsockBackend,
)

__all__ = [
    "NET_KERNEL_FEATURES",
    "RING_KERNEL_FEATURES",
    "VIRTIO_VSOCK_F_SEQPACKET",
    "VSOCK_KERNEL_FEATURES",
    "TapLike",
    "VhostBackend",
    "VhostDevice",
    "VhostDeviceError",
    "VhostNet",
    "VhostNetBackend",
    "VhostVsock",
    "VhostVsockBackend",
    "ring_host_addresses",
]
