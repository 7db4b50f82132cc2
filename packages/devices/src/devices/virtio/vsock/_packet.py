"""The virtio-vsock wire format (virtio 1.2 section 5.10): header, operations, flags.

Every packet on the rx and tx queues starts with a 44-byte little-endian ``virtio_vsock_hdr``;
``len`` payload bytes follow (only for ``RW``). The numbers here are the spec's; nothing in this
module trusts a header: :func:`unpack_header` only decodes, the device validates.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import NamedTuple

__all__ = [
    "HDR_SIZE",
    "HOST_CID",
    "TYPE_STREAM",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET",
    "Header",
    "Op",
    "ShutdownFlags",
    "pack_header",
    "unpack_header",
]

#: virtio device ID of the socket device (section 5).
VIRTIO_ID_VSOCK = 19
#: The well-known CID of the host (VMADDR_CID_HOST).
HOST_CID = 2
#: The only socket type this device speaks (VIRTIO_VSOCK_TYPE_STREAM).
TYPE_STREAM = 1
#: virtio_vsock_event.id telling the driver every connection is gone.
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size  # 44


class Op(IntEnum):
    """``op`` field values."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlags(IntFlag):
    """``flags`` of a SHUTDOWN: what the *sender* will no longer do."""

    RCV = 1
    SEND = 2
    BOTH = 3


class Header(NamedTuple):
    """A decoded ``virtio_vsock_hdr`` (field names as in the spec)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


def pack_header(h: Header) -> bytes:
    return _HDR.pack(*h)


def unpack_header(data: bytes | memoryview) -> Header:
    """Decode the first :data:`HDR_SIZE` bytes of ``data`` (struct.error if shorter)."""
    return Header._make(_HDR.unpack_from(data))


def pack_into(view: memoryview, h: Header) -> None:
    _HDR.pack_into(view, 0, *h)


#: The raw header struct, for the device's data path: it packs straight into guest memory and
#: unpacks into plain tuples (no :class:`Header` per packet).
HDR_STRUCT = _HDR
