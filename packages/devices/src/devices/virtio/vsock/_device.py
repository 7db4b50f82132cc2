"""virtio-vsock (device type 19) backed by host Unix sockets, in Firecracker's "hybrid" style.

The host side of every guest connection is a plain ``AF_UNIX`` stream socket, so host programs
need no vsock support and no ``/dev/vhost-vsock``:

* **guest -> host**: a guest ``connect(VMADDR_CID_HOST, P)`` makes the device connect to the
  Unix socket ``<uds_path>_P``. No listener there means RST, so the guest sees ``ECONNRESET``.
* **host -> guest**: a host program connects to the device's own listening socket ``uds_path``
  and writes ``CONNECT <port>\\n``; the device sends the guest a REQUEST for ``port`` from a fresh
  local port and, once the guest answers RESPONSE, writes ``OK <local port>\\n`` back; after that
  the socket carries the stream. A guest RST (nothing listening) closes the host socket.

One worker thread serves the three queues (rx, tx, event) and every socket. The sockets sit in
an inner epoll set nested in the worker's poll context, so the set can change per connection.
A socket is only watched for input while the guest has receive buffers *and* credit for it,
which is what makes a slow guest push back on the host (the socket's buffer fills) instead of
making us buffer without bound; in the other direction the guest may have at most ``buf_alloc``
bytes buffered here per connection (our advertised credit), and a guest that overruns it is
reset. Guest packets are validated field by field; anything malformed is dropped or answered with
RST and logged (rate-limited), never an exception out of the worker.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from devices.virtio._device import RING_FEATURES, ThreadedVirtioDevice
from devices.virtio._errors import VirtioError
from devices.virtio._queue import DescriptorChain, Queue
from devices.virtio.vsock._connection import Connection, ConnState, HandshakeSocket
from devices.virtio.vsock._packet import (
    HDR_SIZE,
    HDR_STRUCT,
    HOST_CID,
    TYPE_STREAM,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    Header,
    Op,
    ShutdownFlags,
    pack_header,
)
from sys_util import AsRawFd, EventFd, PollContext, PollEvents, TimerFd

__all__ = [
    "DEFAULT_BUF_ALLOC",
    "FIRST_LOCAL_PORT",
    "MAX_PACKET_PAYLOAD",
    "Vsock",
    "VsockError",
    "default_uds_path",
]

logger = logging.getLogger(__name__)

RXQ, TXQ, EVQ = 0, 1, 2
QUEUE_SIZES = (256, 256, 64)
#: Our per-connection receive buffer, advertised to the guest as buf_alloc. Linux uses 256 KiB;
#: we allow more because what the guest has queued on its tx ring already counts against it and
#: the host reader is a process that may not be scheduled for a while, and a guest that finds
#: itself without credit stalls (or, like the C test guest's echo, drops what it could not send).
DEFAULT_BUF_ALLOC = 1024 * 1024
#: Largest payload of one packet in either direction (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PACKET_PAYLOAD = 64 * 1024
#: Host-initiated connections get local ports from here up (as Firecracker does).
FIRST_LOCAL_PORT = 1 << 30
#: Control packets waiting for rx buffers before we stop reading the tx queue (back-pressure).
MAX_PENDING_CONTROL = 1024
#: Most bytes moved from one host socket to the guest per wake-up (fairness between sockets).
PUMP_BUDGET = 1 << 20
#: Most rx buffers filled by one read (the socket is read straight into all their payloads).
RX_BATCH = 64
#: Most iovecs / bytes of guest data gathered for one sendmsg to a host socket.
TX_BATCH_IOVECS = 512
#: The kernel's limit on iovecs per call (UIO_MAXIOV); chains with more segments are cut/copied.
_IOV_MAX = 1024
TX_BATCH_BYTES = 1 << 20
_U32 = 0xFFFF_FFFF
_CONNECT_RE = re.compile(rb"CONNECT ([0-9]{1,10})\r?")
_HANDSHAKE_MAX = 64
_IN = int(PollEvents.READABLE)
_OUT = int(PollEvents.WRITABLE)
_CONFIG = struct.Struct("<Q")
# Plain ints for the per-packet path (enum attribute lookups and IntFlag arithmetic are slow).
_OP_REQUEST, _OP_RESPONSE, _OP_RST, _OP_SHUTDOWN = 1, 2, 3, 4
_OP_RW, _OP_CREDIT_UPDATE, _OP_CREDIT_REQUEST = 5, 6, 7
_SHUT_RCV, _SHUT_SEND, _SHUT_BOTH = 1, 2, 3
_HDR_PACK_INTO = HDR_STRUCT.pack_into
_HDR_UNPACK_FROM = HDR_STRUCT.unpack_from
_ESTABLISHED = ConnState.ESTABLISHED
_MSG_NOSIGNAL = socket.MSG_NOSIGNAL
#: (fields, payload iovecs) of a guest packet; iovecs None when ``len`` does not fit the chain.
_Parsed = tuple[tuple[int, ...], list[memoryview] | None]


class VsockError(VirtioError):
    """The vsock device cannot be set up (bad CID, the socket path is unusable or in use)."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(f"virtio-vsock: {reason}" + (f" ({path})" if path else ""))
        self.reason = reason
        self.path = path

    def __reduce__(self) -> tuple[type[VsockError], tuple[str, str | None]]:
        return (type(self), (self.reason, self.path))


def _bind_listener(path: str) -> socket.socket:
    """Listen on ``path``; a stale socket file (nobody accepting) is replaced, a live one is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise VsockError("path exists and is not a socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a VMM that died
        except OSError as err:
            raise VsockError(f"cannot probe existing socket: {err.strerror}", path) from err
        else:
            raise VsockError("another process is listening on the socket", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise VsockError(f"cannot listen: {err.strerror or err}", path) from err
    return sock


class Vsock(ThreadedVirtioDevice):
    """A socket device for a guest with CID ``guest_cid``, bridged to Unix sockets.

    ``uds_path`` is created (and removed by :meth:`close`); guest connections to host port P go
    to ``<uds_path>_P``. ``buf_alloc`` is the per-connection buffer we advertise to the guest.
    """

    def __init__(
        self,
        guest_cid: int,
        uds_path: str | os.PathLike[str],
        *,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        connect_timeout: float = 2.0,
        max_connections: int = 1024,
    ) -> None:
        if not 3 <= guest_cid <= 0xFFFF_FFFE:
            raise VsockError(f"guest CID {guest_cid} is reserved or out of range (3..2^32-2)")
        if not 4096 <= buf_alloc <= 1 << 30:
            raise ValueError(f"buf_alloc {buf_alloc} must be between 4 KiB and 1 GiB")
        self.guest_cid = guest_cid
        self.uds_path = os.fspath(uds_path)
        self.buf_alloc = buf_alloc
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._listener: socket.socket | None = _bind_listener(self.uds_path)
        self._reset_evt = EventFd(nonblocking=True)
        self._listener_ino = os.stat(self.uds_path).st_ino
        self._conns: dict[tuple[int, int], Connection] = {}
        self._by_token: dict[int, Connection | HandshakeSocket] = {}
        self._next_token = 0
        self._next_port = FIRST_LOCAL_PORT
        self._ctrl: collections.deque[tuple[Connection | None, int, int, int, int, int]] = (
            collections.deque()
        )
        self._inner: PollContext[int] | None = None
        self._timer: TimerFd | None = None
        self._timer_armed = False
        self._rx_starved = False
        self._tx_blocked = False
        self._rx_dirty = False
        self._tx_dirty = False
        #: rx chains popped but not used yet (a batch read shorter than the buffers it had)
        self._rx_spare: collections.deque[DescriptorChain] = collections.deque()
        #: connections whose host socket should be read once the current tx drain is done
        self._pump_soon: dict[Connection, None] = {}
        # guest RW payloads of one connection gathered for one sendmsg (see _process_tx)
        self._txb_conn: Connection | None = None
        self._txb_views: list[memoryview] = []
        self._txb_heads: list[int] = []
        self._txb_len = 0
        #: counters for tests and debugging (read from any thread; only the worker writes)
        self.stats: collections.Counter[str] = collections.Counter()
        super().__init__()

    # -- VirtioDevice ----------------------------------------------------------------------

    def debug_label(self) -> str:
        return "virtio-vsock"

    @property
    def device_type(self) -> int:
        return VIRTIO_ID_VSOCK

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return list(QUEUE_SIZES)

    def features(self) -> int:
        # No VIRTIO_VSOCK_F_STREAM/SEQPACKET bits: "none negotiated" means stream-only (5.10.3).
        return RING_FEATURES

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    def keep_fds(self) -> list[int]:
        fds = [] if self._reset_evt.closed else [self._reset_evt.fileno()]
        return fds + ([self._listener.fileno()] if self._listener is not None else [])

    def connection_count(self) -> int:
        return len(self._conns)

    def on_activate(self) -> None:
        try:  # a transport_reset() asked for while inactive has nothing to reset
            self._reset_evt.read()
        except BlockingIOError:
            pass
        self._inner = PollContext[int]()
        self._timer = TimerFd(nonblocking=True)
        self._timer_armed = False
        self._rx_starved = False
        self._tx_blocked = False
        self._rx_spare.clear()
        self._pump_soon.clear()
        self._txb_reset()

    def extra_poll_sources(self) -> list[tuple[int | AsRawFd, Callable[[], None]]]:
        assert self._inner is not None and self._timer is not None
        sources: list[tuple[int | AsRawFd, Callable[[], None]]] = [
            (self._inner, self._wrap(self._on_sockets)),
            (self._timer, self._wrap(self._on_timer)),
            (self._reset_evt, self._wrap(self._on_transport_reset)),
        ]
        if self._listener is not None:
            sources.append((self._listener, self._wrap(self._on_accept)))
        return sources

    def on_reset(self) -> None:
        """The driver reset the device: every connection is gone (the guest forgets them too)."""
        for obj in list(self._by_token.values()):
            obj.sock.close()
        self._by_token.clear()
        self._conns.clear()
        self._ctrl.clear()
        self._rx_spare.clear()  # the driver's reset took the buffers back
        self._pump_soon.clear()
        self._txb_reset()
        for res in (self._inner, self._timer):
            if res is not None:
                res.close()
        self._inner = None
        self._timer = None

    def close(self) -> None:
        super().close()
        self._reset_evt.close()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            try:  # remove the path only if it is still our socket
                if os.stat(self.uds_path).st_ino == self._listener_ino:
                    os.unlink(self.uds_path)
            except OSError:
                pass

    def transport_reset(self) -> None:
        """Drop every connection and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).

        For a host that lost its side of all connections at once (e.g. restored from a
        snapshot). Thread-safe: the worker does the work; a no-op while the device is inactive.
        """
        if not self._reset_evt.closed:
            self._reset_evt.write(1)

    # -- worker plumbing -------------------------------------------------------------------

    def _wrap(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            finally:
                self._signal()

        return run

    def _signal(self) -> None:
        interrupt = self.interrupt
        if interrupt is None or not self.queues:
            return
        if self._rx_dirty:
            self._rx_dirty = False
            self.queues[RXQ].trigger_interrupt(interrupt)
        if self._tx_dirty:
            self._tx_dirty = False
            self.queues[TXQ].trigger_interrupt(interrupt)

    def process_queue(self, index: int, queue: Queue) -> None:
        try:
            if index == RXQ:
                was_starved = self._rx_starved
                self._rx_starved = False
                ctrl_done = self._flush_ctrl()
                if self._tx_blocked:
                    self._process_tx()
                if ctrl_done:
                    # Fresh buffers: serve sockets known to hold data now rather than after
                    # another trip through epoll.
                    for conn in list(self._conns.values()):
                        if conn.host_pending:
                            self._pump_soon[conn] = None
                    self._pump_pending()
                    if was_starved:
                        self._refresh_all_interest()
            elif index == TXQ:
                self._process_tx()
                self._pump_pending()
            # EVQ: the driver's event buffers stay posted; nothing to do on a kick.
        finally:
            self._signal()

    def _pump_pending(self) -> None:
        """Read the sockets marked as worth reading now, once each.

        One pass, not until the set is empty: a guest that keeps sending could otherwise keep
        the worker here. Whatever is marked meanwhile still has its epoll interest, so a socket
        with data wakes us again.
        """
        if not self._pump_soon:
            return
        conns = list(self._pump_soon)
        self._pump_soon.clear()
        for conn in conns:
            if conn.token in self._by_token and self._can_read_host(conn):
                self._pump(conn)

    def _token(self) -> int:
        self._next_token += 1
        return self._next_token

    # -- rx queue: packets to the guest ----------------------------------------------------

    def _unpop_rx(self, chains: Sequence[DescriptorChain]) -> None:
        """Keep popped rx chains for the next packet, first in line, in their order.

        Holding buffers means we are not starved: sockets must stay watched, or a guest whose
        every buffer sits here would wait for data we never read.
        """
        self._rx_spare.extendleft(reversed(chains))
        if chains and self._rx_starved:
            self._rx_starved = False
            self._refresh_all_interest()

    def _pop_rx(self) -> DescriptorChain | None:
        if self._rx_spare:
            return self._rx_spare.popleft()
        if self._rx_starved or not self.queues:
            return None
        queue = self.queues[RXQ]
        while True:
            chain = queue.pop()
            if chain is None and queue.enable_notification():
                chain = queue.pop()
            if chain is None:
                self._rx_starved = True
                self._refresh_all_interest()
                return None
            if chain.writable_len >= HDR_SIZE:
                return chain
            self.log.warn("rx buffer of %d bytes cannot hold a header", chain.writable_len)
            self.stats["bad_rx_buffer"] += 1
            queue.add_used(chain.head, 0)
            self._rx_dirty = True

    def _header(
        self,
        conn: Connection | None,
        src_port: int,
        dst_port: int,
        op: int,
        flags: int = 0,
        length: int = 0,
        src_cid: int = HOST_CID,
    ) -> bytes:
        if conn is not None:
            buf_alloc, fwd = conn.buf_alloc, conn.fwd_cnt
            conn.last_fwd_sent = fwd
        else:
            buf_alloc = fwd = 0
        h = Header(
            src_cid, self.guest_cid, src_port, dst_port, length, TYPE_STREAM, op, flags,
            buf_alloc, fwd,
        )  # fmt: skip
        return pack_header(h)

    @staticmethod
    def _put_header(views: list[memoryview], data: bytes) -> None:
        if len(views) == 1:
            views[0][:] = data
            return
        pos = 0
        for view in views:
            view[:] = data[pos : pos + len(view)]
            pos += len(view)

    @staticmethod
    def _rx_layout(chain: DescriptorChain) -> tuple[list[memoryview], list[memoryview], int]:
        """Header iovecs, payload iovecs and payload room of an rx chain (already >= HDR_SIZE).

        The usual chain is one buffer holding header and payload (Linux, the test guest): its
        two views are sliced without building a Writer.
        """
        segs = chain.writable
        if len(segs) == 1:
            addr, length = segs[0]
            views = chain.ram.views(addr, length)
            if len(views) == 1:
                buf = views[0]
                return [buf[:HDR_SIZE]], [buf[HDR_SIZE:]], length - HDR_SIZE
        writer = chain.writer()
        hdr = writer.get_iovecs(HDR_SIZE)
        room = writer.available_bytes()
        return hdr, writer.get_iovecs(room), room

    def _write_header(
        self, hdr: list[memoryview], conn: Connection, op: int, flags: int, length: int
    ) -> None:
        """A packet header from ``conn`` straight into the guest's buffer (our credit too)."""
        fwd = conn.fwd_cnt
        conn.last_fwd_sent = fwd
        fields = (
            HOST_CID, self.guest_cid, conn.local_port, conn.peer_port, length, TYPE_STREAM, op,
            flags, conn.buf_alloc, fwd,
        )  # fmt: skip
        if len(hdr) == 1 and len(hdr[0]) == HDR_SIZE:
            _HDR_PACK_INTO(hdr[0], 0, *fields)
        else:
            self._put_header(hdr, HDR_STRUCT.pack(*fields))

    def _send_ctrl(
        self,
        conn: Connection | None,
        op: Op,
        flags: int = 0,
        *,
        src_port: int | None = None,
        dst_port: int | None = None,
        src_cid: int = HOST_CID,
    ) -> None:
        """Queue a header-only packet (sent at once if the guest has an rx buffer)."""
        if conn is not None:
            src_port = conn.local_port if src_port is None else src_port
            dst_port = conn.peer_port if dst_port is None else dst_port
        assert src_port is not None and dst_port is not None
        self._ctrl.append((conn, src_cid, src_port, dst_port, int(op), flags))
        self.stats[f"sent_{op.name}"] += 1
        self._flush_ctrl()

    def _flush_ctrl(self) -> bool:
        """Send queued control packets; True when none are left."""
        ctrl = self._ctrl
        while ctrl:
            chain = self._pop_rx()
            if chain is None:
                return False
            conn, src_cid, src_port, dst_port, op, flags = ctrl.popleft()
            if conn is not None and op == _OP_CREDIT_UPDATE:
                conn.credit_update_queued = False
            hdr, _, _ = self._rx_layout(chain)
            data = self._header(conn, src_port, dst_port, op, flags, 0, src_cid)
            self._put_header(hdr, data)
            self.queues[RXQ].add_used(chain.head, HDR_SIZE)
            self._rx_dirty = True
        return True

    def _can_read_host(self, conn: Connection) -> bool:
        return (
            conn.state is _ESTABLISHED
            and not conn.host_eof
            and not conn.guest_shut & _SHUT_RCV
            and not self._rx_starved
            and conn.peer_free() > 0
        )

    def _pump(self, conn: Connection) -> None:
        """Move host socket data into guest rx buffers, as far as credit and buffers allow.

        One ``recvmsg_into`` fills the payload room of up to :data:`RX_BATCH` rx buffers at
        once, straight in guest memory; each buffer then gets its header and is published, and
        the guest is interrupted once per wake-up (see :meth:`_signal`).
        """
        if not self._flush_ctrl():
            return
        # Drain the guest's tx ring first: what sits there counts against the credit the guest
        # sees, and an echoing guest would otherwise run out of it while we feed it more.
        if self.queues[TXQ].pending() and not self._tx_blocked:
            self._process_tx()
            if conn.token not in self._by_token:
                return
        queue = self.queues[RXQ]
        sock = conn.sock
        layout = self._rx_layout
        budget = PUMP_BUDGET
        conn.host_pending = True
        while budget > 0 and self._can_read_host(conn):
            credit = min(conn.peer_free(), budget)
            batch: list[tuple[DescriptorChain, list[memoryview], int]] = []
            iovecs: list[memoryview] = []
            room = 0
            while room < credit and len(batch) < RX_BATCH:
                chain = self._pop_rx()
                if chain is None:
                    break
                hdr, payload, avail = layout(chain)
                if len(iovecs) + len(payload) > _IOV_MAX:
                    if batch:  # next time, in a batch of its own
                        self._unpop_rx([chain])
                        break
                    payload = payload[:_IOV_MAX]  # a chain of a thousand tiny segments
                    avail = sum(len(view) for view in payload)
                if not avail:  # a header-only buffer: it can carry a credit update
                    if batch:
                        self._unpop_rx([chain])  # first in the next batch
                        break
                    self._write_header(hdr, conn, _OP_CREDIT_UPDATE, 0, 0)
                    queue.add_used(chain.head, HDR_SIZE)
                    self._rx_dirty = True
                    continue
                take = min(avail, MAX_PACKET_PAYLOAD, credit - room)
                if take < avail:  # only part of the buffer: cut the iovecs to ``take``
                    cut, left = [], take
                    for view in payload:
                        if len(view) >= left:
                            cut.append(view[:left])
                            break
                        cut.append(view)
                        left -= len(view)
                    payload = cut
                batch.append((chain, hdr, take))
                iovecs += payload
                room += take
            if not batch:
                break
            self.stats["host_reads"] += 1
            try:
                if len(iovecs) == 1:
                    got = sock.recv_into(iovecs[0])
                else:
                    got = sock.recvmsg_into(iovecs)[0]
            except BlockingIOError:
                got = -1
            except OSError as err:  # ECONNRESET and friends: the host end is gone
                logger.debug("vsock host socket read failed: %s", err)
                chain, hdr, _ = batch[0]
                self._write_header(hdr, conn, _OP_RST, 0, 0)
                queue.add_used(chain.head, HDR_SIZE)
                self._rx_dirty = True
                self.stats["sent_RST"] += 1
                self._unpop_rx([c for c, _, _ in batch[1:]])
                self._drop(conn)
                return
            if got <= 0:
                if got == 0:  # EOF: the host will send no more
                    conn.host_eof = True
                    chain, hdr, _ = batch[0]
                    self._write_header(hdr, conn, _OP_SHUTDOWN, _SHUT_SEND, 0)
                    queue.add_used(chain.head, HDR_SIZE)
                    self._rx_dirty = True
                    self.stats["sent_SHUTDOWN"] += 1
                    batch = batch[1:]
                self._unpop_rx([c for c, _, _ in batch])
                conn.host_pending = False
                break
            left = got
            for i, (chain, hdr, take) in enumerate(batch):
                n = take if take < left else left
                self._write_header(hdr, conn, _OP_RW, 0, n)
                queue.add_used(chain.head, HDR_SIZE + n)
                left -= n
                if not left:
                    self._unpop_rx([c for c, _, _ in batch[i + 1 :]])
                    break
            self._rx_dirty = True
            conn.tx_cnt = (conn.tx_cnt + got) & _U32
            self.stats["rx_bytes"] += got
            budget -= got
            if got < room:  # the socket is drained for now
                conn.host_pending = False
                break
        if conn.host_eof:
            self._check_finished(conn)
        if conn.token in self._by_token:
            self._update_interest(conn)

    # -- tx queue: packets from the guest --------------------------------------------------

    def _process_tx(self) -> None:
        """Serve the guest's packets; RW payloads of one connection go out in one sendmsg.

        A run of data packets for the same connection is gathered (their chains stay unused,
        so the guest memory behind the iovecs is still ours) and written with a single
        ``sendmsg`` when the run ends: another connection, another op, the batch limits, or
        the ring is empty. Everything else goes through :meth:`_handle_packet` in order.
        """
        queue = self.queues[TXQ]
        conns = self._conns
        guest_cid = self.guest_cid
        while True:
            while True:
                if len(self._ctrl) >= MAX_PENDING_CONTROL:
                    # The guest posts no rx buffers for our replies: stop reading its requests
                    # until it does (an rx kick resumes us).
                    self._txb_flush()
                    self._tx_blocked = True
                    return
                chain = queue.pop()
                if chain is None:
                    break
                try:
                    parsed = self._parse_tx(chain)
                    if parsed is not None:
                        fields, views = parsed
                        if (
                            fields[6] == _OP_RW
                            and views is not None
                            and fields[0] == guest_cid
                            and fields[1] == HOST_CID
                            and fields[5] == TYPE_STREAM
                        ):
                            conn = conns.get((fields[3], fields[2]))
                            if conn is not None and self._txb_add(conn, fields, views, chain):
                                continue
                    self._txb_flush()
                    if parsed is not None:
                        self._handle_packet(*parsed)
                except Exception as err:  # a bug must cost one packet, never the queue
                    self._txb_reset()
                    self._bad("tx packet handling failed: %r", err)
                    logger.debug("vsock tx packet", exc_info=True)
                queue.add_used(chain.head, 0)
                self._tx_dirty = True
            self._txb_flush()
            if not queue.enable_notification():
                break
        self._tx_blocked = False

    def _bad(self, what: str, *args: object) -> None:
        self.stats["bad_packet"] += 1
        self.log.warn(what, *args)

    def _parse_tx(self, chain: DescriptorChain) -> _Parsed | None:
        """The header fields and payload iovecs of a tx chain (None: too short, dropped)."""
        segs = chain.readable
        if len(segs) == 1:
            addr, length = segs[0]
            if length >= HDR_SIZE:
                views = chain.ram.views(addr, length)
                if len(views) == 1:
                    buf = views[0]
                    fields = _HDR_UNPACK_FROM(buf)
                    n = fields[4]
                    if n > length - HDR_SIZE or n > MAX_PACKET_PAYLOAD:
                        return fields, None
                    return fields, [buf[HDR_SIZE : HDR_SIZE + n]] if n else []
        reader = chain.reader()
        if reader.available_bytes() < HDR_SIZE:
            self._bad("tx packet of %d bytes is shorter than a header", reader.available_bytes())
            return None
        fields = HDR_STRUCT.unpack(reader.read_exact(HDR_SIZE))
        n = fields[4]
        if n > reader.available_bytes() or n > MAX_PACKET_PAYLOAD:
            return fields, None
        return fields, reader.get_iovecs(n)

    # -- batched guest data ----------------------------------------------------------------

    def _txb_reset(self) -> None:
        self._txb_conn = None
        self._txb_views = []
        self._txb_heads = []
        self._txb_len = 0

    def _txb_add(
        self,
        conn: Connection,
        fields: tuple[int, ...],
        views: list[memoryview],
        chain: DescriptorChain,
    ) -> bool:
        """Gather a well-formed RW for ``conn``; False leaves the packet to the slow path."""
        if conn.state is not _ESTABLISHED or conn.guest_shut & _SHUT_SEND:
            return False
        n = fields[4]
        batched = self._txb_len if self._txb_conn is conn else 0
        if n > conn.our_free() - batched:
            return False  # a credit violation: the slow path resets the connection
        if self._txb_conn is not conn or (
            len(self._txb_views) + len(views) > TX_BATCH_IOVECS or self._txb_len >= TX_BATCH_BYTES
        ):
            self._txb_flush()
            self._txb_conn = conn
        conn.peer_buf_alloc = fields[8]
        conn.peer_fwd_cnt = fields[9]
        self._txb_views += views
        self._txb_heads.append(chain.head)
        self._txb_len += n
        return True

    def _txb_flush(self) -> None:
        """Write the gathered payloads to the host, then give their chains back to the guest."""
        conn = self._txb_conn
        if conn is None:
            return
        views, heads, n = self._txb_views, self._txb_heads, self._txb_len
        self._txb_reset()
        try:
            if n:
                self.stats["tx_bytes"] += n
                self._send_to_host(conn, views, n)
        finally:
            queue = self.queues[TXQ]
            for head in heads:
                queue.add_used(head, 0)
            self._tx_dirty = True
        if conn.token in self._by_token:
            if conn.host_pending:
                self._pump_soon[conn] = None
            self._update_interest(conn)

    def _send_to_host(self, conn: Connection, views: list[memoryview], n: int) -> None:
        """Write ``n`` guest bytes; what the socket does not take now waits in ``conn.out``."""
        if conn.out or conn.prefix:
            for view in views:
                conn.out += view
            self._flush_out(conn)
            return
        self.stats["host_writes"] += 1
        if len(views) > _IOV_MAX:  # only a guest splitting packets into tiny segments
            views = [memoryview(b"".join(views))]
        try:
            sent = conn.sock.sendmsg(views, [], _MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            logger.debug("vsock host socket write failed: %s", err)
            self._drop(conn, rst=True)
            return
        conn.fwd_cnt = (conn.fwd_cnt + sent) & _U32
        if sent < n:
            skip = sent
            for view in views:
                if skip >= len(view):
                    skip -= len(view)
                    continue
                conn.out += view[skip:]
                skip = 0
        self._maybe_credit_update(conn)

    def _handle_packet(self, fields: tuple[int, ...], views: list[memoryview] | None) -> None:
        h = Header._make(fields)
        if h.src_cid != self.guest_cid:
            self._bad("tx packet from CID %d, expected %d: dropped", h.src_cid, self.guest_cid)
            return
        key = (h.dst_port, h.src_port)
        conn = self._conns.get(key)
        if views is None:
            self._bad("tx packet len %d does not fit its buffer (or exceeds 64 KiB)", h.len)
            self._reset(conn, h)
            return
        if h.dst_cid != HOST_CID:
            if h.op != Op.RST:  # only the host is reachable through this device
                self._send_ctrl(
                    None, Op.RST, src_port=h.dst_port, dst_port=h.src_port, src_cid=h.dst_cid
                )
            return
        if h.type != TYPE_STREAM:
            self._bad("tx packet of socket type %d (only stream is supported)", h.type)
            self._reset(conn, h)
            return
        op = h.op
        if conn is None:
            if op == Op.REQUEST:
                self._guest_connect(h)
            elif op != Op.RST:  # nothing there: tell the guest
                self.stats["rst_unknown"] += 1
                self._send_ctrl(None, Op.RST, src_port=h.dst_port, dst_port=h.src_port)
            return
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt)
        if op == Op.RW:
            self._guest_data(conn, h, views)
        elif op == Op.CREDIT_UPDATE:
            if conn.host_pending:
                self._pump_soon[conn] = None
        elif op == Op.CREDIT_REQUEST:
            self._queue_credit_update(conn)
        elif op == Op.RESPONSE:
            if conn.state is not ConnState.CONNECTING:
                self._bad("RESPONSE on a connection that is %s", conn.state.name)
                self._reset(conn, h)
                return
            conn.state = ConnState.ESTABLISHED
            conn.prefix = f"OK {conn.local_port}\n".encode()
            self.stats["host_connected"] += 1
            self._flush_out(conn)
        elif op == Op.RST:
            self._drop(conn)
            return
        elif op == Op.SHUTDOWN:
            if conn.state is ConnState.CONNECTING:
                self._reset(conn, h)
                return
            conn.guest_shut |= h.flags & _SHUT_BOTH
            if conn.guest_shut == _SHUT_BOTH:
                conn.state = ConnState.CLOSING
            self._flush_out(conn)
        elif op == Op.REQUEST:
            self._bad("REQUEST for a connected port pair %d->%d", h.src_port, h.dst_port)
            self._reset(conn, h)
            return
        else:
            self._bad("unknown op %d", op)
            self._reset(conn, h)
            return
        if conn.token in self._by_token:
            self._update_interest(conn)

    def _reset(self, conn: Connection | None, h: Header) -> None:
        """Answer a bad packet with RST; the connection it belonged to (if any) is gone."""
        if conn is not None:
            self._drop(conn)
        if h.op != Op.RST:
            self._send_ctrl(None, Op.RST, src_port=h.dst_port, dst_port=h.src_port)

    def _guest_data(self, conn: Connection, h: Header, views: list[memoryview]) -> None:
        n = h.len
        if conn.state is not ConnState.ESTABLISHED or conn.guest_shut & _SHUT_SEND:
            self._bad("RW on a connection that is %s", conn.state.name)
            self._reset(conn, h)
            return
        if n > conn.our_free():
            self._bad("guest sent %d bytes with %d bytes of credit: reset", n, conn.our_free())
            self.stats["credit_violation"] += 1
            self._reset(conn, h)
            return
        if n:
            self.stats["tx_bytes"] += n
            self._send_to_host(conn, views, n)

    def _flush_out(self, conn: Connection) -> None:
        """Write buffered guest data to the host; finish shutdowns once it is all out."""
        sock = conn.sock
        try:
            while conn.prefix:
                sent = sock.send(conn.prefix, socket.MSG_NOSIGNAL)
                conn.prefix = conn.prefix[sent:]
            while conn.out:
                sent = sock.send(conn.out, socket.MSG_NOSIGNAL)
                del conn.out[:sent]
                conn.fwd_cnt = (conn.fwd_cnt + sent) & _U32
        except BlockingIOError:
            pass
        except OSError as err:
            logger.debug("vsock host socket write failed: %s", err)
            self._drop(conn, rst=True)
            return
        self._maybe_credit_update(conn)
        if not conn.out and not conn.prefix:
            if conn.guest_shut & ShutdownFlags.SEND and not conn.host_wr_shut:
                conn.host_wr_shut = True
                try:
                    sock.shutdown(socket.SHUT_WR)  # the host reader sees EOF
                except OSError:
                    pass
            self._check_finished(conn)

    def _check_finished(self, conn: Connection) -> None:
        """Both directions done (or the guest closed): RST ends it, as the spec's close does."""
        if conn.out or conn.prefix:
            return
        guest_done = conn.guest_shut == ShutdownFlags.BOTH
        both_eof = conn.host_eof and conn.guest_shut & ShutdownFlags.SEND
        if guest_done or both_eof:
            self._drop(conn, rst=True)

    def _maybe_credit_update(self, conn: Connection) -> None:
        if (conn.fwd_cnt - conn.last_fwd_sent) & _U32 >= conn.buf_alloc // 8:
            self._queue_credit_update(conn)

    def _queue_credit_update(self, conn: Connection) -> None:
        if not conn.credit_update_queued:
            conn.credit_update_queued = True
            self._send_ctrl(conn, Op.CREDIT_UPDATE)

    # -- connections -----------------------------------------------------------------------

    def _add_conn(self, conn: Connection) -> None:
        self._conns[conn.key] = conn
        self._by_token[conn.token] = conn

    def _drop(self, conn: Connection, *, rst: bool = False) -> None:
        """Forget ``conn`` and close its host socket (after telling the guest RST if asked)."""
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._by_token.pop(conn.token, None)
        if rst:
            self._send_ctrl(None, Op.RST, src_port=conn.local_port, dst_port=conn.peer_port)
        if conn.registered and self._inner is not None:
            self._inner.delete(conn.sock)
            conn.registered = False
        conn.sock.close()
        self.stats["closed"] += 1

    def _update_interest(self, conn: Connection) -> None:
        inner = self._inner
        if inner is None:
            return
        events = 0
        if self._can_read_host(conn):
            events |= _IN
        if conn.out or conn.prefix:
            events |= _OUT
        if events == conn.interest and conn.registered == bool(events):
            return
        # A socket with nothing wanted is taken out of the set: epoll reports hang-ups even
        # for an empty event mask, and a closed peer would then spin the worker.
        if not events:
            if conn.registered:
                inner.delete(conn.sock)
                conn.registered = False
        elif conn.registered:
            inner.modify(conn.sock, conn.token, events)
        else:
            inner.add(conn.sock, conn.token, events)
            conn.registered = True
        conn.interest = events

    def _refresh_all_interest(self) -> None:
        for conn in list(self._conns.values()):
            self._update_interest(conn)

    def _guest_connect(self, h: Header) -> None:
        """The guest connects to host port ``h.dst_port``: bridge to ``<uds_path>_<port>``."""
        path = f"{self.uds_path}_{h.dst_port}"
        if len(self._conns) >= self.max_connections:
            self.log.warn("too many vsock connections (%d): refusing", len(self._conns))
            self._send_ctrl(None, Op.RST, src_port=h.dst_port, dst_port=h.src_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
        except OSError as err:  # nobody listening (ENOENT/ECONNREFUSED), backlog full (EAGAIN)
            sock.close()
            logger.debug("vsock: guest connect to %s failed: %s", path, err)
            self.stats["rst_refused"] += 1
            self._send_ctrl(None, Op.RST, src_port=h.dst_port, dst_port=h.src_port)
            return
        conn = Connection(
            sock, self._token(), h.dst_port, h.src_port, ConnState.ESTABLISHED, self.buf_alloc
        )
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt)
        self._add_conn(conn)
        self.stats["guest_connected"] += 1
        self._send_ctrl(conn, Op.RESPONSE)
        self._update_interest(conn)

    def _on_accept(self) -> None:
        listener, inner = self._listener, self._inner
        if listener is None or inner is None:
            return
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as err:  # EMFILE and friends: try again on the next wake-up
                self.log.warn("accept on %s failed: %s", self.uds_path, err)
                return
            if len(self._by_token) >= self.max_connections:
                self.log.warn("too many vsock connections: refusing a host connection")
                sock.close()
                continue
            sock.setblocking(False)
            hs = HandshakeSocket(sock, self._token(), self.connect_timeout)
            self._by_token[hs.token] = hs
            inner.add(sock, hs.token, _IN)
            self._arm_timer()

    def _drop_handshake(self, hs: HandshakeSocket) -> None:
        self._by_token.pop(hs.token, None)
        if self._inner is not None:
            self._inner.delete(hs.sock)
        hs.sock.close()

    def _on_handshake(self, hs: HandshakeSocket) -> None:
        """Read ``CONNECT <port>\\n`` without consuming a byte past the newline."""
        try:
            data = hs.sock.recv(_HANDSHAKE_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._drop_handshake(hs)
            return
        nl = data.find(b"\n")
        if not data or len(hs.partial) + (len(data) if nl < 0 else nl) >= _HANDSHAKE_MAX:
            self._drop_handshake(hs)  # EOF, or a line too long to be a handshake
            return
        try:
            # Without a newline, take what is there (no stream byte can be in it): leaving it
            # would keep the socket readable and spin the worker until the rest arrives.
            # With one, take exactly the line; later bytes belong to the stream.
            taken = hs.sock.recv(len(data) if nl < 0 else nl + 1)
        except OSError:
            self._drop_handshake(hs)
            return
        if nl < 0:
            hs.partial += taken
            return
        line = hs.partial + data[:nl]
        match = _CONNECT_RE.fullmatch(line)
        port = int(match.group(1)) if match else -1
        if not 0 <= port <= _U32:
            self.log.warn("bad vsock handshake %r: closing", line)
            self.stats["bad_handshake"] += 1
            self._drop_handshake(hs)
            return
        self._by_token.pop(hs.token, None)
        assert self._inner is not None
        self._inner.delete(hs.sock)
        conn = Connection(
            hs.sock, hs.token, self._alloc_port(port), port, ConnState.CONNECTING, self.buf_alloc
        )
        conn.deadline = time.monotonic() + self.connect_timeout
        self._add_conn(conn)
        self._send_ctrl(conn, Op.REQUEST)
        self._arm_timer()

    def _alloc_port(self, peer_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < _U32 else FIRST_LOCAL_PORT
            if (port, peer_port) not in self._conns:
                return port

    def _on_sockets(self) -> None:
        inner = self._inner
        if inner is None:
            return
        for token, events in inner.wait(0):
            obj = self._by_token.get(token)
            if obj is None:
                continue
            if isinstance(obj, HandshakeSocket):
                self._on_handshake(obj)
                continue
            conn = obj
            if conn.out or conn.prefix:
                self._flush_out(conn)
                if conn.token not in self._by_token:
                    continue
            if events & ~_OUT and self._can_read_host(conn):
                self._pump(conn)
            if conn.token in self._by_token:
                self._update_interest(conn)

    def _on_transport_reset(self) -> None:
        try:
            self._reset_evt.read()
        except BlockingIOError:
            return
        inner = self._inner
        for obj in list(self._by_token.values()):
            if inner is not None and (isinstance(obj, HandshakeSocket) or obj.registered):
                inner.delete(obj.sock)
            obj.sock.close()
        self._by_token.clear()
        self._conns.clear()
        self._pump_soon.clear()
        self._ctrl.clear()  # replies to connections the guest is about to forget
        self.stats["transport_reset"] += 1
        if len(self.queues) <= EVQ or self.interrupt is None:
            return
        queue = self.queues[EVQ]
        chain = queue.pop()
        if chain is None:
            self.log.warn("transport reset: the driver posted no event buffer")
            return
        writer = chain.writer()
        written = 0
        if writer.available_bytes() >= 4:
            writer.write(struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
            written = 4
        queue.add_used(chain.head, written)
        queue.trigger_interrupt(self.interrupt)

    # -- timeouts --------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is not None and not self._timer_armed:
            tick = max(self.connect_timeout / 4, 0.01)
            self._timer.reset(tick, tick)
            self._timer_armed = True

    def _on_timer(self) -> None:
        timer = self._timer
        if timer is None:
            return
        try:
            timer.wait()
        except BlockingIOError:
            return
        now = time.monotonic()
        pending = False
        for obj in list(self._by_token.values()):
            if isinstance(obj, HandshakeSocket):
                if now >= obj.deadline:
                    self.stats["handshake_timeout"] += 1
                    self._drop_handshake(obj)
                else:
                    pending = True
            elif obj.state is ConnState.CONNECTING:
                if now >= obj.deadline:  # the guest never answered our REQUEST
                    self.stats["connect_timeout"] += 1
                    self._drop(obj, rst=True)
                else:
                    pending = True
        if not pending:
            timer.clear()
            self._timer_armed = False


def default_uds_path(cid: int) -> Path:
    """Where ``crosvm run --cid N`` listens when ``--vsock-uds`` is not given."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"crosvm-vsock-{cid}.sock"
