"""virtio-vsock with a host Unix-socket backend (Firecracker's hybrid design).

Guest connections to host port P reach the Unix socket ``<uds_path>_P``; host programs reach
guest port P by connecting to ``uds_path`` and writing ``CONNECT P\\n`` (answer: ``OK <port>\\n``).

    >>> import os, socket, tempfile
    >>> from devices.virtio.vsock import Vsock
    >>> tmp = tempfile.TemporaryDirectory()
    >>> dev = Vsock(3, os.path.join(tmp.name, "v.sock"))
    >>> dev.config_space().hex()  # guest_cid, le64
    '0300000000000000'
    >>> dev.close(); tmp.cleanup()
"""

from devices.virtio.vsock._connection import Connection, ConnState
from devices.virtio.vsock._device import (
    DEFAULT_BUF_ALLOC,
    FIRST_LOCAL_PORT,
    MAX_PACKET_PAYLOAD,
    Vsock,
    VsockError,
    default_uds_path,
)
from devices.virtio.vsock._packet import (
    HDR_SIZE,
    HOST_CID,
    TYPE_STREAM,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    Header,
    Op,
    ShutdownFlags,
    pack_header,
    unpack_header,
)

__all__ = [
    "DEFAULT_BUF_ALLOC",
    "FIRST_LOCAL_PORT",
    "HDR_SIZE",
    "HOST_CID",
    "MAX_PACKET_PAYLOAD",
    "TYPE_STREAM",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET",
    "ConnState",
    "Connection",
    "Header",
    "Op",
    "ShutdownFlags",
    "Vsock",
    "VsockError",
    "default_uds_path",
    "pack_header",
    "unpack_header",
]
