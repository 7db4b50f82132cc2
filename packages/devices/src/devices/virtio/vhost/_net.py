"""virtio-net served by the kernel's vhost-net: the guest's rings are attached to a tap.

Same device as :class:`devices.virtio.net.Net` as the guest sees it (type 1, the same
configuration space: MAC, link up, one queue pair; the same offload features), but frames never
pass through this process: ``VHOST_NET_SET_BACKEND`` gives each ring the tap and the kernel
moves frames between the tap and guest memory itself.

Features: the ring bits (VERSION_1, EVENT_IDX, INDIRECT_DESC) and MRG_RXBUF are the kernel's
work, offered only if ``VHOST_GET_FEATURES`` reports them; the checksum/TSO bits are the tap's
work (the kernel passes the ``virtio_net_hdr`` through), offered only if the tap accepts those
offloads. Only the kernel's bits go to ``VHOST_SET_FEATURES``. We never ask for
``VHOST_NET_F_VIRTIO_NET_HDR``: the tap itself reads and writes the header (``IFF_VNET_HDR``),
sized 12 bytes (VERSION_1 / MRG_RXBUF) or 10, as the userspace device does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from devices.virtio._constants import DeviceType
from devices.virtio.net import QUEUE_SIZE, NetFeatures, TapError
from devices.virtio.net._features import (
    TAP_OFFLOADS,
    config_space,
    drop_unmet_dependencies,
    header_len,
    tap_offloads,
)
from devices.virtio.vhost._device import (
    RING_KERNEL_FEATURES,
    VhostBackend,
    VhostDevice,
    VhostDeviceError,
)
from sys_util import AsRawFd

__all__ = ["NET_KERNEL_FEATURES", "TapLike", "VhostNet", "VhostNetBackend"]

#: Bits vhost-net itself implements.
NET_KERNEL_FEATURES = RING_KERNEL_FEATURES | 1 << NetFeatures.MRG_RXBUF


#: Offload features the tap does (checksums, segmentation): the guest's transmit offloads,
#: which need no tap flag, and its receive offloads (TAP_OFFLOADS), which do.
_OFFLOAD_FEATURES = (
    1 << NetFeatures.CSUM
    | 1 << NetFeatures.HOST_TSO4
    | 1 << NetFeatures.HOST_TSO6
    | 1 << NetFeatures.HOST_ECN
    | sum(1 << feature for feature, _ in TAP_OFFLOADS)
)
_ALL_TAP_OFFLOADS = sum(flag for _, flag in TAP_OFFLOADS)


class TapLike(Protocol):
    """What the device needs of :class:`devices.virtio.net.Tap`."""

    @property
    def name(self) -> str: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...

    def set_vnet_hdr_size(self, size: int) -> None: ...

    def set_offload(self, flags: int) -> None: ...


class VhostNetBackend(VhostBackend, Protocol):
    """``sys_util.VhostNet``."""

    def set_backend(self, index: int, fd: int | AsRawFd | None) -> None: ...


class VhostNet(VhostDevice):
    """A virtio NIC on ``tap`` whose rings the kernel serves through ``vhost``.

    Owns both: :meth:`close` closes them. ``vhost`` must be open already (open it in the
    process that forks the device: the jail has no ``/dev``).
    """

    kernel_feature_mask = NET_KERNEL_FEATURES

    def __init__(self, vhost: VhostNetBackend, tap: TapLike, *, mac: bytes | None = None) -> None:
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            raise ValueError(f"MAC {mac.hex(':')} is not a 6-byte unicast address")
        self.tap = tap
        self.mac = mac
        self.net_vhost = vhost
        super().__init__(vhost, kernel_queues=2)
        try:
            # What the tap can take: without these offloads the guest gets plain frames only.
            tap.set_offload(_ALL_TAP_OFFLOADS)
            self.tap_offloads_supported = True
            # Nothing offloaded until the guest says what it takes (activation sets it).
            tap.set_offload(0)
        except TapError as err:
            self.log.warn("tap refuses offloads (%s); offering none", err.reason)
            self.tap_offloads_supported = False

    def debug_label(self) -> str:
        return f"vhost-net({self.tap.name})"

    @property
    def device_type(self) -> int:
        return DeviceType.NET

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return [QUEUE_SIZE, QUEUE_SIZE]

    def device_features(self) -> int:
        bits = 1 << NetFeatures.STATUS
        if self.mac is not None:
            bits |= 1 << NetFeatures.MAC
        if self.tap_offloads_supported:
            bits |= _OFFLOAD_FEATURES
        return bits

    def ack_features(self, value: int) -> None:
        self.acked_features = drop_unmet_dependencies(value & self.features(), self.log)

    def config_space(self) -> bytes:
        return config_space(self.mac)

    def keep_fds(self) -> list[int]:
        return [*super().keep_fds(), self.tap.fileno()]

    @property
    def header_len(self) -> int:
        """Bytes of ``virtio_net_hdr`` the tap reads/writes before each frame."""
        return header_len(self.acked_features)

    def tap_offloads(self) -> int:
        """The ``TUN_F_*`` flags matching the guest's acked receive offloads."""
        return tap_offloads(self.acked_features)

    def start_backend(self) -> None:
        try:
            self.tap.set_vnet_hdr_size(self.header_len)
            self.tap.set_offload(self.tap_offloads())
        except TapError as err:
            raise VhostDeviceError(self.debug_label(), str(err)) from err
        for i in range(self.kernel_queues):
            self.net_vhost.set_backend(i, self.tap)

    def stop_backend(self) -> None:
        for i in range(self.kernel_queues):
            self.net_vhost.set_backend(i, None)

    def close(self) -> None:
        super().close()
        self.tap.close()
