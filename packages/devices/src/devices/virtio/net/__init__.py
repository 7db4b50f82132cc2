"""virtio-net over a Linux TAP interface.

:class:`Tap` opens or adopts a TAP (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``); :class:`Net` is the
virtio device (type 1) that moves frames between the tap and the guest's virtqueues, with
checksum and TSO offloads passed through and mergeable receive buffers.

Sending a frame from a mock driver out through a tap (needs CAP_NET_ADMIN; the tap here is
never brought up, so nothing leaves the host)::

    from devices.virtio.net import Net, Tap
    net = Net(Tap.create("vmtap%d"), mac=bytes.fromhex("020000000001"))
    net.ack_features(net.features())
    # ... activate(mem, interrupt, [rx_queue, tx_queue], [rx_kick, tx_kick]) as any device
    net.close()
"""

from devices.virtio.net._errors import NetError, TapError
from devices.virtio.net._net import (
    MAX_FRAME_BYTES,
    QUEUE_SIZE,
    RXQ,
    TXQ,
    VIRTIO_NET_S_LINK_UP,
    Net,
    NetFeatures,
    NetStats,
    parse_mac,
)
from devices.virtio.net._tap import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    Tap,
)

__all__ = [
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "MAX_FRAME_BYTES",
    "QUEUE_SIZE",
    "RXQ",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TXQ",
    "VIRTIO_NET_S_LINK_UP",
    "Net",
    "NetError",
    "NetFeatures",
    "NetStats",
    "Tap",
    "TapError",
    "parse_mac",
]
