"""One stream connection between a guest port and a host Unix socket, with its credit state.

Flow control is the spec's credit scheme (virtio 1.2 section 5.10.6.3): each side advertises
``buf_alloc`` (its receive buffer) and ``fwd_cnt`` (bytes it has consumed); a sender may have at
most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes in flight. All counters are u32 and wrap,
so every subtraction is taken modulo 2^32.
"""

from __future__ import annotations

import enum
import socket
import time

__all__ = ["ConnState", "Connection", "HandshakeSocket"]

_U32 = 0xFFFF_FFFF


class ConnState(enum.Enum):
    #: host-initiated: REQUEST sent to the guest, waiting for RESPONSE/RST
    CONNECTING = 1
    ESTABLISHED = 2
    #: the guest shut down both directions; flushing what is buffered, then RST
    CLOSING = 3


class HandshakeSocket:
    """A socket accepted on the device's listener that has not sent ``CONNECT <port>\\n`` yet."""

    __slots__ = ("deadline", "partial", "sock", "token")

    def __init__(self, sock: socket.socket, token: int, timeout: float) -> None:
        self.sock = sock
        self.token = token
        self.deadline = time.monotonic() + timeout
        #: the start of the line, read so far (it has no newline, so no stream bytes)
        self.partial = b""


class Connection:
    """State of one connection; the device's worker thread is its only user."""

    __slots__ = (
        "buf_alloc",
        "credit_update_queued",
        "deadline",
        "fwd_cnt",
        "guest_shut",
        "host_eof",
        "host_pending",
        "host_wr_shut",
        "interest",
        "last_fwd_sent",
        "local_port",
        "out",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "peer_port",
        "prefix",
        "registered",
        "sock",
        "state",
        "token",
        "tx_cnt",
    )

    def __init__(
        self,
        sock: socket.socket,
        token: int,
        local_port: int,
        peer_port: int,
        state: ConnState,
        buf_alloc: int,
    ) -> None:
        self.sock = sock
        self.token = token
        self.local_port = local_port
        self.peer_port = peer_port
        self.state = state
        self.buf_alloc = buf_alloc
        #: the guest's receive buffer and consumed count, from its last header
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        #: payload bytes we sent the guest (RW)
        self.tx_cnt = 0
        #: guest bytes we delivered to the host socket
        self.fwd_cnt = 0
        #: fwd_cnt as last told to the guest
        self.last_fwd_sent = 0
        #: guest->host bytes the host socket did not take yet (at most buf_alloc)
        self.out = bytearray()
        #: bytes written to the host before guest data (the "OK <port>\n" reply); not counted
        self.prefix = b""
        self.guest_shut = 0  # ShutdownFlags the guest sent
        self.host_eof = False  # the host will send no more (we told the guest SEND)
        self.host_wr_shut = False  # we shut the host socket's write side
        #: the host socket may hold data we stopped reading for lack of rx buffers or credit
        self.host_pending = False
        self.credit_update_queued = False
        self.interest = 0
        self.registered = False
        self.deadline = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def update_peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def peer_free(self) -> int:
        """Bytes we may still send the guest without overrunning its buffer."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        if in_flight >= self.peer_buf_alloc:  # also a guest reporting more consumed than sent
            return 0
        return self.peer_buf_alloc - in_flight

    def our_free(self) -> int:
        """Room left in our receive buffer (what the guest may still send us)."""
        return self.buf_alloc - len(self.out)

    def __repr__(self) -> str:
        return (
            f"Connection(local={self.local_port}, peer={self.peer_port}, {self.state.name}, "
            f"tx={self.tx_cnt}, fwd={self.fwd_cnt}, out={len(self.out)})"
        )
