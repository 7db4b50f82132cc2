"""virtio-vsock against a mock guest driver: the test plays the guest's vsock transport on the
three virtqueues (through devices.testing.VirtQueueDriver) and real Unix sockets play the host.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from devices.testing import SubmittedChain, VirtQueueDriver, make_guest_memory
from devices.virtio import Interrupt
from devices.virtio.vsock import (
    FIRST_LOCAL_PORT,
    HDR_SIZE,
    HOST_CID,
    TYPE_STREAM,
    VIRTIO_ID_VSOCK,
    Header,
    Op,
    ShutdownFlags,
    Vsock,
    VsockError,
    pack_header,
    unpack_header,
)
from sys_util import EventFd

CID = 3
GUEST_PORT = 5000
RX_BUF = HDR_SIZE + 4096


class Guest:
    """The guest side of a vsock transport over the mock virtqueue driver."""

    def __init__(self, dev: Vsock, *, buf_alloc: int = 64 * 1024, rx_buffers: int = 64) -> None:
        self.dev = dev
        self.mem = make_guest_memory(48 << 20)
        self.rx = VirtQueueDriver(self.mem, 0x10000, 256, data_base=0x100000, data_size=8 << 20)
        self.tx = VirtQueueDriver(self.mem, 0x20000, 256, data_base=0x900000, data_size=8 << 20)
        self.ev = VirtQueueDriver(self.mem, 0x30000, 64, data_base=0x1100000, data_size=1 << 16)
        self.evts = [EventFd(), EventFd(), EventFd()]
        self.irq = EventFd()
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.posted: dict[int, SubmittedChain] = {}
        self.backlog: list[bytes] = []  # used rx buffers read but not returned yet
        dev.ack_features(dev.features())
        queues = [d.make_queue(features=dev.acked_features) for d in (self.rx, self.tx, self.ev)]
        for _ in range(4):
            self.ev.add_request((), [4])
        self.post_rx(rx_buffers)
        dev.activate(self.mem, Interrupt(intx_evt=self.irq), queues, self.evts)

    def post_rx(self, n: int, size: int = RX_BUF, *, kick: bool = True) -> None:
        for _ in range(n):
            chain = self.rx.add_request((), [size])
            self.posted[chain.head] = chain
        if kick:
            self.rx.kick(self.evts[0])

    def send(
        self,
        op: Op | int,
        src_port: int = GUEST_PORT,
        dst_port: int = 1234,
        payload: bytes = b"",
        *,
        flags: int = 0,
        length: int | None = None,
        src_cid: int = CID,
        dst_cid: int = HOST_CID,
        type_: int = TYPE_STREAM,
        raw: bytes | None = None,
    ) -> None:
        hdr = Header(
            src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length,
            type_, int(op), flags, self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip
        data = raw if raw is not None else pack_header(hdr) + payload
        self.tx.add_request([data])
        self.tx.kick(self.evts[1])

    def recv(self, timeout: float = 5.0, *, repost: bool = True) -> tuple[Header, bytes]:
        if not self.backlog:
            for head, length in self.rx.wait_used(1, timeout):
                chain = self.posted.pop(head)
                self.backlog.append(self.rx.read_writable(chain)[:length])
        data = self.backlog.pop(0)
        if repost:
            self.post_rx(1)
        return unpack_header(data), data[HDR_SIZE:]

    def nothing_for(self, seconds: float) -> bool:
        time.sleep(seconds)
        return not self.pending()

    def pending(self) -> bool:
        return bool(self.backlog) or (self.rx.used_idx() - self.rx.last_used) & 0xFFFF != 0

    def close(self) -> None:
        self.dev.close()
        for evt in (*self.evts, self.irq):
            evt.close()
        self.mem.close()


@pytest.fixture
def uds(tmp_path: Path) -> str:
    return str(tmp_path / "v.sock")


@pytest.fixture
def guest(uds: str) -> Iterator[Guest]:
    g = Guest(Vsock(CID, uds, connect_timeout=1.0))
    yield g
    g.close()


def host_connect(g: Guest, uds: str, port: int = GUEST_PORT) -> tuple[socket.socket, int]:
    """Host-initiated connection: CONNECT, the guest answers RESPONSE, the host reads OK."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(uds)
    sock.sendall(f"CONNECT {port}\n".encode())
    h, _ = g.recv()
    assert (h.op, h.src_cid, h.dst_cid, h.dst_port, h.type) == (
        Op.REQUEST, HOST_CID, CID, port, TYPE_STREAM,
    )  # fmt: skip
    assert h.src_port >= FIRST_LOCAL_PORT
    g.send(Op.RESPONSE, port, h.src_port)
    line = b""
    while not line.endswith(b"\n"):
        line += sock.recv(1)
    assert line == f"OK {h.src_port}\n".encode()
    return sock, h.src_port


def assert_closed(sock: socket.socket) -> None:
    """The device closed its end (EOF, or a reset when it closed with our bytes unread)."""
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass


def read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


# -- device basics ---------------------------------------------------------------------------


def test_device_identity_and_config(uds: str) -> None:
    with Vsock(0x1_2345, uds) as dev:
        assert dev.device_type == VIRTIO_ID_VSOCK == 19
        assert len(dev.queue_max_sizes) == 3
        assert dev.read_config(0, 8) == (0x1_2345).to_bytes(8, "little")
        assert dev.read_config(4, 4) == bytes(4)
        assert os.path.exists(uds)
        assert dev.keep_fds()
    assert not os.path.exists(uds)  # close removes the socket


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF, 1 << 40])
def test_reserved_cids_are_refused(uds: str, cid: int) -> None:
    with pytest.raises(VsockError):
        Vsock(cid, uds)
    assert not os.path.exists(uds)


def test_live_socket_path_is_refused_and_stale_one_replaced(uds: str, tmp_path: Path) -> None:
    with Vsock(CID, uds), pytest.raises(VsockError, match="listening"):
        Vsock(CID, uds)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(uds)
    stale.close()  # the file stays, nobody accepts
    with Vsock(CID, uds):
        pass
    regular = tmp_path / "file"
    regular.write_bytes(b"x")
    with pytest.raises(VsockError, match="not a socket"):
        Vsock(CID, str(regular))
    assert regular.read_bytes() == b"x"


# -- connection setup ------------------------------------------------------------------------


def test_host_connects_to_guest_and_data_flows_both_ways(guest: Guest, uds: str) -> None:
    sock, local = host_connect(guest, uds)
    with sock:
        sock.sendall(b"ping from host")
        h, data = guest.recv()
        assert (h.op, h.src_port, h.dst_port, data) == (Op.RW, local, GUEST_PORT, b"ping from host")
        assert h.len == len(data)
        assert h.buf_alloc == guest.dev.buf_alloc
        guest.fwd_cnt += len(data)
        guest.send(Op.RW, GUEST_PORT, local, b"pong from guest")
        assert read_exact(sock, 15) == b"pong from guest"
    assert guest.dev.stats["host_connected"] == 1


def test_guest_connects_to_host_port(guest: Guest, uds: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(f"{uds}_1234")
        listener.listen(1)
        guest.send(Op.REQUEST, 7777, 1234)
        h, _ = guest.recv()
        assert (h.op, h.src_port, h.dst_port, h.src_cid) == (Op.RESPONSE, 1234, 7777, HOST_CID)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            guest.send(Op.RW, 7777, 1234, b"hello host")
            assert read_exact(conn, 10) == b"hello host"
            conn.sendall(b"hello guest")
            h, data = guest.recv()
            assert (h.op, h.dst_port, data) == (Op.RW, 7777, b"hello guest")


def test_guest_connect_to_port_without_listener_is_reset(guest: Guest) -> None:
    guest.send(Op.REQUEST, 7777, 4321)
    h, _ = guest.recv()
    assert (h.op, h.src_port, h.dst_port, h.dst_cid) == (Op.RST, 4321, 7777, CID)
    assert guest.dev.connection_count() == 0


def test_guest_refusing_a_host_connection_closes_the_host_socket(guest: Guest, uds: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(uds)
        sock.sendall(b"CONNECT 6000\n")
        h, _ = guest.recv()
        assert h.op == Op.REQUEST
        guest.send(Op.RST, 6000, h.src_port)
        assert sock.recv(100) == b""  # EOF, no OK line
    assert guest.dev.connection_count() == 0


def test_guest_that_never_answers_times_out(guest: Guest, uds: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(uds)
        sock.sendall(b"CONNECT 6001\n")
        h, _ = guest.recv()
        assert h.op == Op.REQUEST
        assert sock.recv(100) == b""  # closed after connect_timeout
        rst, _ = guest.recv()
        assert (rst.op, rst.src_port, rst.dst_port) == (Op.RST, h.src_port, 6001)
    assert guest.dev.stats["connect_timeout"] == 1


@pytest.mark.parametrize(
    "line", [b"HELLO\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"CONNECT 1" + b"0" * 80]
)
def test_bad_handshake_closes_the_host_socket(guest: Guest, uds: str, line: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(uds)
        sock.sendall(line)
        assert_closed(sock)
    assert guest.nothing_for(0.05)


def test_data_sent_right_after_connect_is_not_eaten_by_the_handshake(
    guest: Guest, uds: str
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(uds)
        sock.sendall(b"CONNECT 5000\nearly bytes")
        h, _ = guest.recv()
        guest.send(Op.RESPONSE, GUEST_PORT, h.src_port)
        h2, data = guest.recv()
        assert (h2.op, data) == (Op.RW, b"early bytes")
        assert read_exact(sock, len(f"OK {h.src_port}\n")) == f"OK {h.src_port}\n".encode()


# -- bulk data and credit ----------------------------------------------------------------------


def test_host_to_guest_bulk_integrity_within_credit(guest: Guest, uds: str) -> None:
    payload = os.urandom(3 << 20)
    sock, local = host_connect(guest, uds)
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    got = bytearray()
    received = 0
    try:
        while len(got) < len(payload):
            h, data = guest.recv()
            if h.op == Op.CREDIT_UPDATE:
                continue
            assert h.op == Op.RW and h.len == len(data) > 0
            received += len(data)
            # never more in flight than the guest's buffer (it consumes in 16 KiB steps)
            assert received - guest.fwd_cnt <= guest.buf_alloc
            got += data
            if received - guest.fwd_cnt >= 16 * 1024:
                guest.fwd_cnt = received
                guest.send(Op.CREDIT_UPDATE, GUEST_PORT, local)
    finally:
        sender.join(10)
        sock.close()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_guest_that_stops_consuming_gets_exactly_its_buf_alloc(uds: str) -> None:
    g = Guest(Vsock(CID, uds), buf_alloc=8192)
    try:
        sock, local = host_connect(g, uds)
        with sock:
            sock.sendall(os.urandom(100_000))
            got = 0
            while got < 8192:
                h, data = g.recv()
                assert h.op == Op.RW
                got += len(data)
            assert got == 8192
            assert g.nothing_for(0.2)  # no credit: the device waits, the host socket fills
            g.fwd_cnt = 8192
            g.send(Op.CREDIT_UPDATE, GUEST_PORT, local)
            h, data = g.recv()
            assert h.op == Op.RW and len(data) == 4096
    finally:
        g.close()


def test_guest_to_host_bulk_integrity_with_a_slow_host_reader(guest: Guest, uds: str) -> None:
    payload = os.urandom(2 << 20)
    sock, local = host_connect(guest, uds)
    host_got = bytearray()

    def slow_reader() -> None:
        while True:
            chunk = sock.recv(32 * 1024)
            if not chunk:
                return
            host_got.extend(chunk)
            time.sleep(0.0005)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    peer_alloc, peer_fwd, sent, pos = guest.dev.buf_alloc, 0, 0, 0
    try:
        while pos < len(payload):
            credit = peer_alloc - (sent - peer_fwd)
            if credit <= 0:
                guest.send(Op.CREDIT_REQUEST, GUEST_PORT, local)
                h, _ = guest.recv()
                assert h.op == Op.CREDIT_UPDATE
                peer_alloc, peer_fwd = h.buf_alloc, h.fwd_cnt
                continue
            n = min(credit, 16 * 1024, len(payload) - pos)
            guest.send(Op.RW, GUEST_PORT, local, payload[pos : pos + n])
            pos += n
            sent += n
            # pick up unsolicited credit updates without waiting
            while guest.pending():
                h, _ = guest.recv()
                assert h.op == Op.CREDIT_UPDATE
                peer_alloc, peer_fwd = h.buf_alloc, h.fwd_cnt
        guest.send(Op.SHUTDOWN, GUEST_PORT, local, flags=ShutdownFlags.BOTH)
        reader.join(30)
        h, _ = guest.recv()
        while h.op == Op.CREDIT_UPDATE:
            h, _ = guest.recv()
        assert h.op == Op.RST
    finally:
        sock.close()
        reader.join(5)
    assert guest.dev.stats["credit_violation"] == 0
    assert hashlib.sha256(host_got).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_guest_overrunning_our_credit_is_reset(guest: Guest, uds: str) -> None:
    sock, local = host_connect(guest, uds)  # the host never reads
    with sock:
        for _ in range(guest.dev.buf_alloc // 16384 + 40):
            guest.send(Op.RW, GUEST_PORT, local, bytes(16384))
            if guest.dev.stats["credit_violation"]:
                break
            time.sleep(0.001)
        deadline = time.monotonic() + 5
        while not guest.dev.stats["credit_violation"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guest.dev.stats["credit_violation"] == 1
        ops = []
        while guest.pending() or Op.RST not in ops:
            ops.append(guest.recv()[0].op)
        assert Op.RST in ops
        assert guest.dev.connection_count() == 0


# -- shutdown ------------------------------------------------------------------------------------


def test_guest_shutdown_send_gives_host_eof_then_host_close_resets(guest: Guest, uds: str) -> None:
    sock, local = host_connect(guest, uds)
    with sock:
        guest.send(Op.RW, GUEST_PORT, local, b"last words")
        guest.send(Op.SHUTDOWN, GUEST_PORT, local, flags=ShutdownFlags.SEND)
        assert read_exact(sock, 10) == b"last words"
        assert sock.recv(10) == b""  # EOF for the host reader
        sock.sendall(b"still talking")  # the other direction stays open
        h, data = guest.recv()
        assert (h.op, data) == (Op.RW, b"still talking")
        sock.shutdown(socket.SHUT_WR)
        h, _ = guest.recv()
        assert (h.op, h.flags) == (Op.SHUTDOWN, ShutdownFlags.SEND)
        h, _ = guest.recv()
        assert h.op == Op.RST  # both directions finished
    assert guest.dev.connection_count() == 0


def test_host_close_becomes_shutdown_and_guest_close_gets_rst(guest: Guest, uds: str) -> None:
    sock, local = host_connect(guest, uds)
    sock.sendall(b"bye")
    sock.close()
    h, data = guest.recv()
    assert (h.op, data) == (Op.RW, b"bye")
    h, _ = guest.recv()
    assert (h.op, h.flags) == (Op.SHUTDOWN, ShutdownFlags.SEND)
    guest.send(Op.SHUTDOWN, GUEST_PORT, local, flags=ShutdownFlags.BOTH)
    h, _ = guest.recv()
    assert (h.op, h.src_port, h.dst_port) == (Op.RST, local, GUEST_PORT)
    assert guest.dev.connection_count() == 0


def test_guest_rst_closes_the_host_socket(guest: Guest, uds: str) -> None:
    sock, local = host_connect(guest, uds)
    with sock:
        guest.send(Op.RST, GUEST_PORT, local)
        assert sock.recv(10) == b""
    assert guest.nothing_for(0.05)  # an RST is never answered


# -- hostile packets -------------------------------------------------------------------------


def test_hostile_packets_are_dropped_or_reset_and_the_device_keeps_serving(
    guest: Guest, uds: str
) -> None:
    sock, local = host_connect(guest, uds)
    with sock:
        guest.send(0, raw=b"\x01" * 20)  # shorter than a header: dropped
        guest.send(Op.RW, GUEST_PORT, local, b"x", src_cid=CID + 1)  # spoofed source: dropped
        assert guest.nothing_for(0.05)
        guest.send(Op.RW, GUEST_PORT, 9, b"abc")  # no such connection
        assert guest.recv()[0].op == Op.RST
        guest.send(Op.REQUEST, 7, 8, dst_cid=42)  # not the host
        h, _ = guest.recv()
        assert (h.op, h.src_cid) == (Op.RST, 42)
        guest.send(Op.REQUEST, 7, 8, type_=2)  # SEQPACKET
        assert guest.recv()[0].op == Op.RST
        guest.send(Op.RW, GUEST_PORT, local, b"abc", length=0xFFFF_FFF0)  # len past the buffer
        h, _ = guest.recv()
        assert (h.op, h.dst_port) == (Op.RST, GUEST_PORT)
        assert sock.recv(10) == b""  # that connection is gone
    sock2, local2 = host_connect(guest, uds)
    with sock2:
        guest.send(99, GUEST_PORT, local2)  # unknown op
        assert guest.recv()[0].op == Op.RST
        assert sock2.recv(10) == b""
    sock3, local3 = host_connect(guest, uds)
    with sock3:
        guest.send(Op.REQUEST, GUEST_PORT, local3)  # REQUEST on a live pair
        assert guest.recv()[0].op == Op.RST
    # still serving
    sock4, local4 = host_connect(guest, uds)
    with sock4:
        guest.send(Op.RW, GUEST_PORT, local4, b"fine")
        assert read_exact(sock4, 4) == b"fine"
    assert guest.dev.stats["bad_packet"] >= 6


def test_tiny_rx_buffers_are_skipped(uds: str) -> None:
    g = Guest(Vsock(CID, uds), rx_buffers=0)
    try:
        g.post_rx(2, size=10)
        g.post_rx(1)
        g.send(Op.REQUEST, 7777, 4321)
        used = g.rx.wait_used(3)
        assert [n for _, n in used] == [0, 0, HDR_SIZE]
        assert g.dev.stats["bad_rx_buffer"] == 2
    finally:
        g.close()


def test_replies_wait_for_rx_buffers_without_loss(uds: str) -> None:
    g = Guest(Vsock(CID, uds), rx_buffers=0)
    try:
        for port in range(20):
            g.send(Op.REQUEST, 7000 + port, 4321)
        assert g.nothing_for(0.05)
        g.post_rx(20)
        ports = sorted(g.recv(repost=False)[0].dst_port for _ in range(20))
        assert ports == list(range(7000, 7020))
    finally:
        g.close()


def test_reset_drops_connections_and_device_can_be_reactivated(uds: str) -> None:
    g = Guest(Vsock(CID, uds))
    try:
        sock, _ = host_connect(g, uds)
        with sock:
            assert g.dev.reset()
            assert sock.recv(10) == b""
            assert g.dev.connection_count() == 0
    finally:
        g.close()


def test_transport_reset_drops_connections_and_posts_the_event(guest: Guest, uds: str) -> None:
    sock, _ = host_connect(guest, uds)
    with sock:
        guest.ev.mem.write_u32(guest.ev.data_base, 0xFFFF_FFFF)  # the device must overwrite it
        guest.dev.transport_reset()
        assert sock.recv(10) == b""
        ((_, length),) = guest.ev.wait_used(1)
        assert length == 4
        assert guest.ev.mem.read_u32(guest.ev.data_base) == 0  # first event buffer, id 0
    assert guest.dev.connection_count() == 0
    sock2, local2 = host_connect(guest, uds)  # new connections work afterwards
    with sock2:
        guest.send(Op.RW, GUEST_PORT, local2, b"after reset")
        assert read_exact(sock2, 11) == b"after reset"


def test_transport_reset_while_inactive_is_forgotten(uds: str) -> None:
    dev = Vsock(CID, uds)
    dev.transport_reset()
    g = Guest(dev)
    try:
        assert g.nothing_for(0.05)
        assert g.ev.pop_used() == []
        assert dev.stats["transport_reset"] == 0
    finally:
        g.close()


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([CID, CID, CID, CID + 1]),
            st.sampled_from([HOST_CID, HOST_CID, HOST_CID, 1, 7]),
            st.integers(0, 3),
            st.integers(0, 3),
            st.one_of(st.integers(0, 64), st.integers(0, 0xFFFF_FFFF)),
            st.sampled_from([TYPE_STREAM, TYPE_STREAM, 0, 2, 0xFFFF]),
            st.integers(0, 9),
            st.integers(0, 0xFFFF_FFFF),
            st.binary(max_size=80),
        ),
        max_size=40,
    )
)
def test_random_packets_never_stop_the_device(
    packets: list[tuple[int, int, int, int, int, int, int, int, bytes]],
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        uds = os.path.join(tmp, "v.sock")
        g = Guest(Vsock(CID, uds, connect_timeout=0.2), rx_buffers=128)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(f"{uds}_1")  # so some REQUESTs succeed
                listener.listen(8)
                for src_cid, dst_cid, sport, dport, length, type_, op, credit, body in packets:
                    g.buf_alloc = credit
                    g.send(
                        op, sport, dport, body, length=length, src_cid=src_cid,
                        dst_cid=dst_cid, type_=type_, flags=credit & 3,
                    )  # fmt: skip
                g.tx.wait_used(0)
                deadline = time.monotonic() + 5
                while g.tx.used_idx() != g.tx.avail_idx and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert g.tx.used_idx() == g.tx.avail_idx  # every packet was consumed
                g.buf_alloc = 64 * 1024
                g.backlog.clear()
                g.rx.pop_used()
                sock, local = host_connect_skipping(g, uds)
                with sock:
                    g.send(Op.RW, GUEST_PORT, local, b"alive")
                    assert read_exact(sock, 5) == b"alive"
            assert g.dev.active
        finally:
            g.close()


def host_connect_skipping(g: Guest, uds: str) -> tuple[socket.socket, int]:
    """host_connect after random traffic: skip replies to earlier packets."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(uds)
    sock.sendall(f"CONNECT {GUEST_PORT}\n".encode())
    while True:
        h, _ = g.recv()
        if h.op == Op.REQUEST and h.dst_port == GUEST_PORT and h.src_port >= FIRST_LOCAL_PORT:
            break
    g.send(Op.RESPONSE, GUEST_PORT, h.src_port)
    line = b""
    while not line.endswith(b"\n"):
        line += sock.recv(1)
    assert line == f"OK {h.src_port}\n".encode()
    return sock, h.src_port


def test_handshake_split_across_writes(guest: Guest, uds: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(uds)
        for piece in (b"CONN", b"ECT 50", b"00\nda", b"ta"):
            sock.sendall(piece)
            time.sleep(0.02)
        h, _ = guest.recv()
        assert (h.op, h.dst_port) == (Op.REQUEST, GUEST_PORT)
        guest.send(Op.RESPONSE, GUEST_PORT, h.src_port)
        h2, data = guest.recv()
        assert (h2.op, data) == (Op.RW, b"data")
        assert read_exact(sock, len(f"OK {h.src_port}\n")) == f"OK {h.src_port}\n".encode()


def test_incomplete_handshake_does_not_spin_and_times_out(guest: Guest, uds: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(uds)
        sock.sendall(b"CONNECT 50")
        deadline = time.monotonic() + 5
        # The partial line is taken off the socket (so it stops polling readable, no spin) ...
        while time.monotonic() < deadline and not any(
            getattr(o, "partial", b"") == b"CONNECT 50" for o in list(guest.dev._by_token.values())
        ):
            time.sleep(0.01)
        assert any(getattr(o, "partial", b"") for o in list(guest.dev._by_token.values()))
        assert_closed(sock)  # ... and the socket is dropped after connect_timeout (1 s here)
    assert guest.dev.stats["handshake_timeout"] == 1


# -- batched data path ---------------------------------------------------------------------------


def _send_batch(g: Guest, packets: list[bytes]) -> None:
    """Publish several raw tx packets, then kick once (the device sees them as one run)."""
    heads = [g.tx.add_request([p], publish=False).head for p in packets]
    for head in heads:
        g.tx.publish(head)
    g.tx.kick(g.evts[1])


def _connect_keeping_buffers(g: Guest, uds: str) -> tuple[socket.socket, int]:
    """host_connect that does not post a replacement for the buffer the REQUEST used."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(uds)
    sock.sendall(f"CONNECT {GUEST_PORT}\n".encode())
    h, _ = g.recv(repost=False)
    assert h.op == Op.REQUEST
    g.send(Op.RESPONSE, GUEST_PORT, h.src_port)
    line = b""
    while not line.endswith(b"\n"):
        line += sock.recv(1)
    assert line == f"OK {h.src_port}\n".encode()
    return sock, h.src_port


def _rw(g: Guest, src: int, dst: int, payload: bytes) -> bytes:
    h = Header(CID, HOST_CID, src, dst, len(payload), TYPE_STREAM, Op.RW, 0, g.buf_alloc, 0)
    return pack_header(h) + payload


def test_one_read_fills_many_small_rx_buffers_in_order_up_to_the_credit(uds: str) -> None:
    """Eight 1000-byte buffers and 5000 bytes of credit: one host write is spread over the
    buffers in order, stops exactly at the credit, and the unused buffers serve later packets.
    """
    g = Guest(Vsock(CID, uds), buf_alloc=5000, rx_buffers=0)
    try:
        g.post_rx(8, HDR_SIZE + 1000)
        sock, local = _connect_keeping_buffers(g, uds)
        payload = os.urandom(12_000)
        with sock:
            sock.sendall(payload)
            got = bytearray()
            while len(got) < 5000:
                h, data = g.recv(repost=False)
                assert h.op == Op.RW and h.len == len(data) <= 1000
                assert (h.src_port, h.dst_port, h.buf_alloc) == (local, GUEST_PORT, g.dev.buf_alloc)
                got += data
            assert len(got) == 5000 and g.nothing_for(0.2)  # credit exhausted, nothing more
            assert g.dev.stats["host_reads"] < 5  # not one read per buffer
            g.fwd_cnt = 5000
            g.send(Op.CREDIT_UPDATE, GUEST_PORT, local)
            g.post_rx(8, HDR_SIZE + 1000)
            while len(got) < len(payload):
                h, data = g.recv()
                if h.op == Op.RW:
                    got += data
                    g.fwd_cnt += len(data)
                    g.send(Op.CREDIT_UPDATE, GUEST_PORT, local)
            assert bytes(got) == payload
    finally:
        g.close()


def test_rx_buffers_with_the_header_split_across_descriptors(uds: str) -> None:
    """Header in 20 + 24 bytes, payload in two more descriptors (older Linux drivers split)."""
    g = Guest(Vsock(CID, uds), rx_buffers=0)
    try:
        for _ in range(8):
            chain = g.rx.add_request((), [20, 24, 100, 3000])
            g.posted[chain.head] = chain
        g.rx.kick(g.evts[0])
        sock, _ = _connect_keeping_buffers(g, uds)
        with sock:
            payload = os.urandom(3100 * 3)
            sock.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                h, data = g.recv(repost=False)
                assert h.op == Op.RW and h.dst_port == GUEST_PORT and len(data) <= 3100
                got += data
            assert bytes(got) == payload
    finally:
        g.close()


def test_guest_packets_with_split_header_and_payload_reach_the_host(guest: Guest, uds: str) -> None:
    sock, local = host_connect(guest, uds)
    with sock:
        payload = os.urandom(5000)
        h = Header(CID, HOST_CID, GUEST_PORT, local, 5000, TYPE_STREAM, Op.RW, 0, 65536, 0)
        raw = pack_header(h)
        guest.tx.add_request([raw[:10], raw[10:], payload[:1234], payload[1234:]])
        guest.tx.kick(guest.evts[1])
        assert read_exact(sock, 5000) == payload


def test_a_run_of_guest_packets_keeps_order_across_connections_and_shutdown(
    guest: Guest, uds: str
) -> None:
    """RW runs for two connections interleaved with a SHUTDOWN: each host socket gets its own
    bytes in order, and the SHUTDOWN(SEND) takes effect only after the data before it.
    """
    a, la = host_connect(guest, uds)
    b, lb = host_connect(guest, uds)
    with a, b:
        chunks = [os.urandom(3000) for _ in range(12)]
        packets = [_rw(guest, GUEST_PORT, la, c) for c in chunks[:5]]
        packets += [_rw(guest, GUEST_PORT, lb, c) for c in chunks[5:8]]
        packets += [_rw(guest, GUEST_PORT, la, c) for c in chunks[8:10]]
        shut = Header(CID, HOST_CID, GUEST_PORT, la, 0, TYPE_STREAM, Op.SHUTDOWN, 2, 65536, 0)
        packets.append(pack_header(shut))
        packets += [_rw(guest, GUEST_PORT, lb, c) for c in chunks[10:]]
        _send_batch(guest, packets)
        assert read_exact(a, 7 * 3000) == b"".join(chunks[:5] + chunks[8:10])
        assert a.recv(10) == b""  # EOF after exactly the data sent before the SHUTDOWN
        assert read_exact(b, 5 * 3000) == b"".join(chunks[5:8] + chunks[10:])
        assert guest.dev.stats["bad_packet"] == 0
        assert guest.dev.stats["host_writes"] <= 4  # one sendmsg per run, not per packet


def test_credit_overrun_inside_a_run_is_reset_after_the_bytes_before_it(
    guest: Guest, uds: str
) -> None:
    """The host reads nothing; in runs of packets the one that overruns our buffer resets the
    connection, and what the host then reads is an unbroken prefix of the guest's stream.
    """
    sock, local = host_connect(guest, uds)
    with sock:
        chunk = os.urandom(60_000)
        base = guest.tx.used_idx()
        sent = 0
        for _ in range(2 * guest.dev.buf_alloc // (8 * len(chunk)) + 2):
            _send_batch(guest, [_rw(guest, GUEST_PORT, local, chunk)] * 8)
            sent += 8
            deadline = time.monotonic() + 5
            while (guest.tx.used_idx() - base) & 0xFFFF != sent and time.monotonic() < deadline:
                time.sleep(0.005)
            if guest.dev.stats["credit_violation"]:
                break
        assert guest.dev.stats["credit_violation"] == 1
        ops = []
        while guest.pending() or Op.RST not in ops:
            ops.append(guest.recv()[0].op)
        assert Op.RST in ops and guest.dev.connection_count() == 0
        got = bytearray()
        try:
            while data := sock.recv(1 << 16):
                got += data
        except ConnectionResetError:
            pass
        assert len(got) > 0
        assert got == (chunk * (len(got) // len(chunk) + 1))[: len(got)]


def test_chains_of_more_segments_than_one_syscall_takes(uds: str) -> None:
    """1500-segment chains (indirect) both ways: more iovecs than the kernel accepts at once
    must cost a shorter packet or a copy, never the connection.
    """
    g = Guest(Vsock(CID, uds), rx_buffers=1)
    try:
        sock, local = _connect_keeping_buffers(g, uds)
        with sock:
            chain = g.rx.add_request((), [HDR_SIZE] + [2] * 1500, indirect=True)
            g.posted[chain.head] = chain
            g.rx.kick(g.evts[0])
            payload = os.urandom(5000)
            sock.sendall(payload)
            h, data = g.recv(repost=False)
            assert h.op == Op.RW and 0 < len(data) <= 2048 and data == payload[: len(data)]
            g.post_rx(4)
            got = bytearray(data)
            while len(got) < len(payload):
                h, data = g.recv()
                got += data
            assert bytes(got) == payload
            out = os.urandom(1500)
            hdr = Header(CID, HOST_CID, GUEST_PORT, local, 1500, TYPE_STREAM, Op.RW, 0, 65536, 0)
            g.tx.add_request(
                [pack_header(hdr), *(out[i : i + 1] for i in range(1500))], indirect=True
            )
            g.tx.kick(g.evts[1])
            assert read_exact(sock, 1500) == out
            assert g.dev.connection_count() == 1
    finally:
        g.close()


def test_buffers_held_back_after_a_short_read_still_take_later_data(uds: str) -> None:
    """A read that used one of four popped buffers keeps the other three: with no buffer left
    on the ring the device must still watch the socket and fill them when more data comes.
    """
    g = Guest(Vsock(CID, uds), rx_buffers=0)
    try:
        g.post_rx(5)
        sock, _ = _connect_keeping_buffers(g, uds)
        with sock:
            for i in range(3):
                sock.sendall(bytes([i]) * 100)
                h, data = g.recv(repost=False)
                assert (h.op, data) == (Op.RW, bytes([i]) * 100)
    finally:
        g.close()


def test_header_only_rx_buffers_carry_credit_updates_instead_of_spinning(uds: str) -> None:
    g = Guest(Vsock(CID, uds), rx_buffers=0)
    try:
        g.post_rx(1)
        sock, _ = _connect_keeping_buffers(g, uds)
        with sock:
            sock.sendall(b"waiting")
            time.sleep(0.1)
            g.post_rx(3, HDR_SIZE)
            for _ in range(3):
                h, data = g.recv(repost=False)
                assert (h.op, data) == (Op.CREDIT_UPDATE, b"")
            assert g.nothing_for(0.1)
            g.post_rx(1)
            h, data = g.recv(repost=False)
            assert (h.op, data) == (Op.RW, b"waiting")
    finally:
        g.close()


_KINDS = ["rw"] * 8 + ["rw_badlen", "shut_send", "shut_rcv", "shut_both", "rst",
                       "credit_update", "credit_request", "bad_op"]  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from(_KINDS), st.integers(0, 3000)),
        min_size=4,
        max_size=30,
    )
)
@example([(0, "rw", 100), (1, "rw", 200), (0, "rw", 300), (1, "shut_send", 0), (0, "rw", 50)])
def test_runs_of_mixed_packets_deliver_exactly_the_model_stream(
    script: list[tuple[int, str, int]],
) -> None:
    """Random runs of packets for two live connections, published at once (so the device
    gathers RW runs): each host socket gets exactly the payloads a simple model of the spec
    says it should, in order, then EOF; a bad packet ends only its own connection.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        uds = os.path.join(tmp, "v.sock")
        g = Guest(Vsock(CID, uds), rx_buffers=128)
        try:
            socks, locals_ = zip(*(host_connect(g, uds) for _ in range(2)), strict=True)
            expected = [bytearray(), bytearray()]
            open_ = [True, True]  # the connection exists and takes data
            packets = []
            seed = 0
            for idx, kind, size in script:
                seed += 1
                payload = bytes([seed & 0xFF]) * size
                h = Header(CID, HOST_CID, GUEST_PORT, locals_[idx], size, TYPE_STREAM,
                           Op.RW, 0, 65536, 0)  # fmt: skip
                if kind == "rw":
                    packets.append(pack_header(h) + payload)
                    if open_[idx]:
                        expected[idx] += payload
                    continue
                if kind == "rw_badlen":
                    packets.append(pack_header(h._replace(len=size + 10)) + payload)
                    open_[idx] = False
                    continue
                op, flags = {
                    "shut_send": (Op.SHUTDOWN, 2), "shut_rcv": (Op.SHUTDOWN, 1),
                    "shut_both": (Op.SHUTDOWN, 3), "rst": (Op.RST, 0),
                    "credit_update": (Op.CREDIT_UPDATE, 0),
                    "credit_request": (Op.CREDIT_REQUEST, 0), "bad_op": (9, 0),
                }[kind]  # fmt: skip
                packets.append(pack_header(h._replace(len=0, op=op, flags=flags)))
                if op == Op.RST or op == 9 or flags & 2:
                    open_[idx] = False  # reset, or no more data (a later RW resets)
            for idx in range(2):  # end what is still open, so the host reads to EOF
                h = Header(CID, HOST_CID, GUEST_PORT, locals_[idx], 0, TYPE_STREAM,
                           Op.SHUTDOWN, 3, 65536, 0)  # fmt: skip
                packets.append(pack_header(h))
            _send_batch(g, packets)
            for idx, sock in enumerate(socks):
                got = bytearray()
                with sock:
                    try:
                        while data := sock.recv(1 << 16):
                            got += data
                    except ConnectionResetError:
                        pass
                assert got == expected[idx]
            deadline = time.monotonic() + 5  # the host saw EOF just before the device let go
            while g.dev.connection_count() and time.monotonic() < deadline:
                time.sleep(0.002)
            assert g.dev.connection_count() == 0
            sock, _ = host_connect_skipping(g, uds)  # and the device still serves
            sock.close()
        finally:
            g.close()
