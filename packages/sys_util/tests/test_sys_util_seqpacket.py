from __future__ import annotations

import errno
import fcntl
import os
import pickle
import tempfile
from pathlib import Path

import pytest

from sys_util import EventFd, MessageTruncated, UnixSeqpacket, UnixSeqpacketListener


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_pair_keeps_message_boundaries() -> None:
    a, b = UnixSeqpacket.pair()
    with a, b:
        a.send(b"one")
        a.send(b"two!")
        assert b.next_packet_size() == 3
        assert b.recv(100) == (b"one", [])
        buf = bytearray(10)
        assert b.recv_into(buf) == (4, [])
        assert buf[:4] == b"two!"
        a.close()
        assert b.recv(100) == (b"", [])  # EOF


def test_fd_passing_and_cloexec() -> None:
    a, b = UnixSeqpacket.pair()
    with a, b, EventFd() as evt:
        a.send(b"evt", [evt, evt.fileno()])
        data, fds = b.recv(16, maxfds=4)
        assert data == b"evt"
        assert len(fds) == 2
        try:
            for fd in fds:
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
                os.eventfd_write(fd, 2)
            assert evt.read() == 4
        finally:
            for fd in fds:
                os.close(fd)


def test_too_many_fds_closes_the_ones_that_arrived() -> None:
    a, b = UnixSeqpacket.pair()
    with a, b, EventFd() as evt:
        before = set(os.listdir("/proc/self/fd"))
        a.send(b"x", [evt, evt, evt])
        with pytest.raises(MessageTruncated) as info:
            b.recv(16, maxfds=1)
        assert info.value.what == "fds"
        assert info.value.errno == errno.EMSGSIZE
        after = set(os.listdir("/proc/self/fd"))
        assert after == before  # nothing leaked
        a.send(b"y", [evt])
        with pytest.raises(MessageTruncated):
            b.recv(16)  # no room for fds at all: the kernel drops them
        assert set(os.listdir("/proc/self/fd")) == before


def test_truncated_data_is_refused_and_fds_closed() -> None:
    a, b = UnixSeqpacket.pair()
    with a, b, EventFd() as evt:
        before = set(os.listdir("/proc/self/fd"))
        a.send(b"0123456789", [evt])
        with pytest.raises(MessageTruncated) as info:
            b.recv(4, maxfds=1)
        assert info.value.what == "data"
        assert set(os.listdir("/proc/self/fd")) == before
        assert pickle.loads(pickle.dumps(info.value)).what == "data"


def test_read_timeout() -> None:
    a, b = UnixSeqpacket.pair()
    with a, b:
        b.set_read_timeout(0.02)
        with pytest.raises(TimeoutError):
            b.recv(10)
        with pytest.raises(TimeoutError):
            b.next_packet_size()
        b.set_read_timeout(None)
        a.send(b"late")
        assert b.recv(10) == (b"late", [])
        with pytest.raises(ValueError):
            b.set_read_timeout(0)


def test_write_timeout() -> None:
    a, b = UnixSeqpacket.pair()
    with a, b:
        a.set_write_timeout(0.02)
        with pytest.raises(TimeoutError):
            for _ in range(100_000):
                a.send(b"x" * 4096)


def test_fd_passing_across_fork() -> None:
    parent, child = UnixSeqpacket.pair()
    with parent, child:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                parent.close()
                data, fds = child.recv(64, maxfds=1)
                os.write(fds[0], data.upper())
                os.close(fds[0])
                child.send(b"done")
                code = 0
            finally:
                os._exit(code)
        child.close()
        r, w = os.pipe()
        try:
            parent.send(b"hello", [w])
            os.close(w)
            assert parent.recv(16) == (b"done", [])
            assert os.read(r, 16) == b"HELLO"
            assert os.read(r, 16) == b""  # the child's copy was closed too
        finally:
            os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_listener_connect_accept() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sock"
        with UnixSeqpacketListener(path) as listener:
            assert listener.path == str(path)
            with UnixSeqpacket.connect(path) as client, listener.accept() as server:
                client.send(b"ping")
                assert server.recv(8) == (b"ping", [])
                with server.try_clone() as clone:
                    clone.send(b"pong")
                assert client.recv(8) == (b"pong", [])
        with pytest.raises(ConnectionRefusedError):
            UnixSeqpacket.connect(path)


def test_from_fd_checks_the_socket_type() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            UnixSeqpacket.from_fd(r)
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
    a, b = UnixSeqpacket.pair()
    with a, UnixSeqpacket.from_fd(b.detach()) as b2:
        a.send(b"x")
        assert b2.recv(4) == (b"x", [])


def test_close_idempotent_then_ebadf() -> None:
    a, b = UnixSeqpacket.pair()
    b.close()
    a.close()
    a.close()
    assert a.closed
    for call in (
        a.fileno,
        lambda: a.send(b"x"),
        lambda: a.recv(1),
        a.next_packet_size,
        lambda: a.set_read_timeout(1),
        a.try_clone,
        a.detach,
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    with tempfile.TemporaryDirectory() as d:
        listener = UnixSeqpacketListener(Path(d) / "s")
        listener.close()
        with pytest.raises(OSError) as info:
            listener.accept()
        assert info.value.errno == errno.EBADF


def test_wrapping_a_closed_fd_gives_ebadf() -> None:
    a, b = UnixSeqpacket.pair()
    fd = b.detach()
    os.close(fd)
    with a:
        # The wrapper is built around a number that is no longer open.
        with pytest.raises(OSError) as info:
            UnixSeqpacket.from_fd(fd)
        assert info.value.errno == errno.EBADF
