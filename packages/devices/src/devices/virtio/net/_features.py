"""virtio-net's feature rules and configuration space, shared by every virtio-net device here.

The userspace :class:`~devices.virtio.net.Net` and the kernel-served
:class:`~devices.virtio.vhost.VhostNet` look the same to the guest: the same configuration
space, the same feature dependencies, the same ``virtio_net_hdr`` size and the same tap
offloads for the receive features the guest acked. Keeping those rules in one place keeps the two
devices from drifting apart.
"""

from __future__ import annotations

import struct

from devices.virtio._constants import Features
from devices.virtio._log import RateLimitedLog
from devices.virtio.net._tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN

__all__ = [
    "TAP_OFFLOADS",
    "VIRTIO_NET_S_LINK_UP",
    "NetFeatures",
    "config_space",
    "drop_unmet_dependencies",
    "header_len",
    "tap_offloads",
]

VIRTIO_NET_S_LINK_UP = 1

_CONFIG = struct.Struct("<6sHH")  # mac, status, max_virtqueue_pairs


class NetFeatures:
    """virtio-net feature bit *numbers* (section 5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17


# feature -> features it requires (one of them, section 5.1.3.1); violators are not acked.
_DEPENDS: dict[int, tuple[int, ...]] = {
    NetFeatures.GUEST_TSO4: (NetFeatures.GUEST_CSUM,),
    NetFeatures.GUEST_TSO6: (NetFeatures.GUEST_CSUM,),
    NetFeatures.GUEST_ECN: (NetFeatures.GUEST_TSO4, NetFeatures.GUEST_TSO6),
    NetFeatures.HOST_TSO4: (NetFeatures.CSUM,),
    NetFeatures.HOST_TSO6: (NetFeatures.CSUM,),
    NetFeatures.HOST_ECN: (NetFeatures.HOST_TSO4, NetFeatures.HOST_TSO6),
}

#: Guest receive offload feature -> the tap offload that lets such frames reach the guest.
TAP_OFFLOADS = (
    (NetFeatures.GUEST_CSUM, TUN_F_CSUM),
    (NetFeatures.GUEST_TSO4, TUN_F_TSO4),
    (NetFeatures.GUEST_TSO6, TUN_F_TSO6),
    (NetFeatures.GUEST_ECN, TUN_F_TSO_ECN),
)


def config_space(mac: bytes | None) -> bytes:
    """The configuration structure: ``mac`` (zeros without one), link up, one queue pair."""
    return _CONFIG.pack(mac or bytes(6), VIRTIO_NET_S_LINK_UP, 1)


def drop_unmet_dependencies(value: int, log: RateLimitedLog) -> int:
    """``value`` without the features whose required features the driver did not ack."""
    for feature, needs in _DEPENDS.items():
        if value >> feature & 1 and not any(value >> n & 1 for n in needs):
            log.warn("driver acked feature %d without its dependency; ignored", feature)
            value &= ~(1 << feature)
    return value


def header_len(acked: int) -> int:
    """Bytes of ``virtio_net_hdr`` before each frame: 12 with VERSION_1 or MRG_RXBUF, else 10."""
    modern = acked >> Features.VERSION_1 & 1 or acked >> NetFeatures.MRG_RXBUF & 1
    return 12 if modern else 10


def tap_offloads(acked: int) -> int:
    """The ``TUN_F_*`` flags matching the guest's acked receive offloads."""
    return sum(flag for feature, flag in TAP_OFFLOADS if acked >> feature & 1)
