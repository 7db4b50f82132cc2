"""MsgSocket over real SOCK_SEQPACKET sockets: fds across fork, timeouts, hang-ups, bad peers."""

from __future__ import annotations

import array
import io
import os
import socket
import time
from collections.abc import Iterator

import pytest

from msg_socket import (
    BadRecvSize,
    Disconnected,
    ExpectFd,
    InvalidType,
    Msg,
    MsgSocket,
    NotExpectFd,
    OwnedFd,
    TaggedUnion,
    Timeout,
    Unit,
    pair,
    u8,
    u32,
    u64,
    wire_size,
)
from sys_util import EventFd, SharedMemory


class Request(TaggedUnion):
    pass


class Ping(Request):
    seq: u32


class Signal(Request):
    evt: EventFd
    value: u64


class Share(Request):
    shm: SharedMemory
    log: io.FileIO | None


class Stop(Request):
    pass


class Response(TaggedUnion):
    pass


class Pong(Response):
    seq: u32


class Done(Response):
    code: u8
    ok: bool


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {leaked}"


@pytest.mark.usefixtures("no_fd_leak")
def test_request_response_round_trip() -> None:
    a, b = pair(Request, Response, recv_timeout=5)
    with a, b:
        a.send(Ping(7))
        assert b.recv() == Ping(7)
        b.send(Pong(7))
        assert a.recv() == Pong(7)
        assert repr(a).startswith("MsgSocket[Request, Response](fd=")


@pytest.mark.usefixtures("no_fd_leak")
def test_fds_cross_a_fork() -> None:
    """A child process receives an EventFd, a SharedMemory and a file, and uses all three."""
    parent, child = pair(Request, Response)
    pid = os.fork()
    if pid == 0:  # child: serve until Stop, then exit without running pytest's teardown
        status = 1
        try:
            parent.close()
            while True:
                req = child.recv(timeout=10)
                if isinstance(req, Ping):
                    child.send(Pong(req.seq + 1))
                elif isinstance(req, Signal):
                    req.evt.write(req.value)
                    req.evt.close()
                    child.send(Done(0, True))
                elif isinstance(req, Share):
                    with req.shm as shm:
                        data = os.pread(shm.fileno(), 5, 0)
                    if req.log is not None:
                        req.log.write(data[::-1])
                        req.log.close()
                    child.send(Done(len(data), data == b"hello"))
                elif isinstance(req, Stop):
                    status = 0
                    break
        finally:
            os._exit(status)
    child.close()
    try:
        evt = EventFd()
        shm = SharedMemory("msg-socket-test", 4096)
        os.pwrite(shm.fileno(), b"hello", 0)
        r, w = os.pipe()
        log = io.FileIO(w, "wb")
        with parent, evt, shm:
            parent.send(Ping(41))
            assert parent.recv(timeout=10) == Pong(42)
            parent.send(Signal(evt, 5))
            assert parent.recv(timeout=10) == Done(0, True)
            assert evt.read() == 5
            parent.send(Share(shm, log))
            log.close()  # the child has its own copy now
            assert parent.recv(timeout=10) == Done(5, True)
            assert os.read(r, 10) == b"olleh"
            os.close(r)
            parent.send(Stop())
            # the child exits: its end closes, and a recv sees the hang-up
            with pytest.raises(Disconnected):
                parent.recv(timeout=10)
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.usefixtures("no_fd_leak")
def test_recv_timeout_consumes_nothing() -> None:
    a, b = pair(Request, Response)
    with a, b:
        t0 = time.monotonic()
        with pytest.raises(Timeout) as e:
            b.recv(timeout=0.05)
        assert isinstance(e.value, TimeoutError)
        assert time.monotonic() - t0 >= 0.05
        a.send(Ping(1))
        assert b.recv(timeout=1) == Ping(1)


@pytest.mark.usefixtures("no_fd_leak")
def test_send_timeout_when_the_peer_does_not_read() -> None:
    a, b = pair(Request, Response, send_timeout=0.05)
    with a, b, pytest.raises(Timeout):
        for _ in range(100_000):
            a.send(Ping(0))


@pytest.mark.usefixtures("no_fd_leak")
def test_hang_up_is_disconnected_on_both_sides() -> None:
    a, b = pair(Request, Response)
    b.close()
    with pytest.raises(Disconnected) as e:
        a.recv(timeout=1)
    assert isinstance(e.value, BadRecvSize) and e.value.actual == 0
    with pytest.raises(Disconnected):
        a.send(Ping(1))
    a.close()
    a.close()  # idempotent
    assert a.closed
    with pytest.raises(OSError):
        a.fileno()


@pytest.fixture
def raw_peer() -> Iterator[tuple[socket.socket, MsgSocket[Unit, Request]]]:
    """A MsgSocket receiving Requests, and the raw socket of a misbehaving peer."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock: MsgSocket[Unit, Request] = MsgSocket(mine, Unit, Request, recv_timeout=5)
    with theirs, sock:
        yield theirs, sock


def send_raw(peer: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    peer.sendmsg([data], anc)


@pytest.mark.usefixtures("no_fd_leak")
def test_bad_packets_raise_and_close_their_fds(
    raw_peer: tuple[socket.socket, MsgSocket[Unit, Request]],
) -> None:
    peer, sock = raw_peer
    size = wire_size(Request)
    r, w = os.pipe()
    try:
        cases: list[tuple[bytes, int, type[Exception]]] = [
            (bytes(size - 1), 1, BadRecvSize),  # short
            (bytes(size + 7), 2, BadRecvSize),  # long
            (b"\x09" + bytes(size - 1), 1, InvalidType),  # unknown tag
            (b"\x00" + bytes(size - 1), 1, NotExpectFd),  # Ping needs no fd
            (b"\x01" + bytes(size - 1), 0, ExpectFd),  # Signal needs one
            (b"\x00" + bytes(size - 1), 8, NotExpectFd),  # beyond the buffer: MSG_CTRUNC
        ]
        for data, nfds, error in cases:
            send_raw(peer, data, [r] * nfds)
            with pytest.raises(error):
                sock.recv()
        # the socket is still usable after all of that
        send_raw(peer, encode_ping(3), [])
        assert sock.recv() == Ping(3)
        # and a 0-byte packet reads as a hang-up, whatever fds it carried
        send_raw(peer, b"", [r])
        with pytest.raises(Disconnected):
            sock.recv()
    finally:
        os.close(r)
        os.close(w)


def encode_ping(seq: int) -> bytes:
    from msg_socket import encode

    data, _ = encode(Request, Ping(seq))
    return data


@pytest.mark.usefixtures("no_fd_leak")
def test_received_fds_are_cloexec_and_owned() -> None:
    a, b = pair(Request, Response)
    with a, b, EventFd() as evt:
        a.send(Signal(evt, 1))
        got = b.recv(timeout=1)
        assert isinstance(got, Signal)
        import fcntl

        assert fcntl.fcntl(got.evt.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert got.evt.fileno() != evt.fileno()
        got.evt.close()


def test_msgsocket_refuses_a_stream_socket() -> None:
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with s1, s2, pytest.raises(ValueError, match="SEQPACKET"):
        MsgSocket(s1, Unit, Unit)


def test_owned_fd_fields() -> None:
    class Carry(Msg):
        fd: OwnedFd

    a, b = pair(Carry, Carry)
    r, w = os.pipe()
    with a, b, OwnedFd(r) as rfd:
        a.send(Carry(rfd))
        got = b.recv(timeout=1)
        with got.fd:
            os.write(w, b"z")
            assert os.read(got.fd.fileno(), 1) == b"z"
    os.close(w)


@pytest.mark.usefixtures("no_fd_leak")
def test_fds_beyond_the_receive_buffer_are_reported_and_closed(
    raw_peer: tuple[socket.socket, MsgSocket[Unit, Request]],
) -> None:
    peer, sock = raw_peer
    r, w = os.pipe()
    try:
        send_raw(peer, encode_ping(1), [r] * 20)
        with pytest.raises(NotExpectFd) as e:
            sock.recv()
        assert e.value.received == -1  # MSG_CTRUNC: the kernel closed what did not fit
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.usefixtures("no_fd_leak")
def test_socket_level_timeouts_of_a_unix_seqpacket_are_obeyed() -> None:
    from sys_util import UnixSeqpacket

    x, y = UnixSeqpacket.pair()
    x.set_read_timeout(0.05)
    a: MsgSocket[Request, Response] = MsgSocket(x, Request, Response)
    b: MsgSocket[Response, Request] = MsgSocket(y, Response, Request)
    with a, b:
        with pytest.raises(Timeout) as e:
            a.recv()
        assert e.value.seconds == pytest.approx(0.05, abs=0.01)  # kernel rounds to ticks
        b.send(Pong(1))
        assert a.recv() == Pong(1)
    assert x.closed and y.closed  # the MsgSockets owned them
