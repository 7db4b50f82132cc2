"""MsgSocket: typed messages over a SOCK_SEQPACKET Unix socket, one message per packet.

The socket is usually a ``sys_util.UnixSeqpacket``; anything with ``fileno()`` that is an
AF_UNIX SOCK_SEQPACKET socket works (a plain :class:`socket.socket` too). MsgSocket owns it.
I/O goes through a private duplicate of the fd driven with ``poll`` + ``MSG_DONTWAIT``, so
timeouts never flip the shared socket to non-blocking mode under another user of the fd.
"""

from __future__ import annotations

import array
import errno as _errno
import importlib
import os
import select
import socket
import struct
import time
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from msg_socket._codec import codec_for, decode, encode
from msg_socket.errors import (
    Disconnected,
    NotExpectFd,
    RecvError,
    SendError,
    Timeout,
)

__all__ = ["MsgSocket", "pair"]

S = TypeVar("S")
R = TypeVar("R")

_FD_SIZE = array.array("i").itemsize


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class _Default:
    """Sentinel: "use the socket's default timeout"."""


_DEFAULT = _Default()


class MsgSocket(Generic[S, R]):
    """Sends messages of type ``S`` and receives messages of type ``R`` over one socket.

    Args:
        sock: a connected AF_UNIX SOCK_SEQPACKET socket (``sys_util.UnixSeqpacket``,
            :class:`socket.socket`, ...). The MsgSocket takes ownership and closes it.
        send_type: the message type sent (a :class:`~msg_socket.Msg` subclass, a
            :class:`~msg_socket.TaggedUnion`, or :class:`~msg_socket.Unit`).
        recv_type: the message type received.
        send_timeout, recv_timeout: default timeouts in seconds (None: block, or obey the
            socket's own SO_SNDTIMEO/SO_RCVTIMEO if it has them).
    """

    def __init__(
        self,
        sock: _HasFileno,
        send_type: type[S],
        recv_type: type[R],
        *,
        send_timeout: float | None = None,
        recv_timeout: float | None = None,
    ) -> None:
        # Build (and validate) both layouts before touching the socket.
        self._send_codec = codec_for(send_type)
        self._recv_codec = codec_for(recv_type)
        self._send_type = send_type
        self._recv_type = recv_type
        self._recv_size = max(1, self._recv_codec.size)
        # One fd more than the message can use: "too many fds" is then seen, not truncated away.
        self._recv_maxfds = self._recv_codec.max_fds + 1
        self._ancbufsize = socket.CMSG_SPACE(self._recv_maxfds * _FD_SIZE)
        self._owner: _HasFileno | None
        if isinstance(sock, socket.socket):
            self._owner, own = None, sock
        else:
            fd = os.dup(sock.fileno())
            try:
                own = socket.socket(fileno=fd)
            except BaseException:
                os.close(fd)
                raise
            self._owner = sock
        if own.family != socket.AF_UNIX or own.type != socket.SOCK_SEQPACKET:
            if self._owner is not None:
                own.close()
            raise ValueError("MsgSocket needs an AF_UNIX SOCK_SEQPACKET socket")
        self._sock = own
        self.send_timeout = send_timeout
        self.recv_timeout = recv_timeout

    @property
    def send_type(self) -> type[S]:
        return self._send_type

    @property
    def recv_type(self) -> type[R]:
        return self._recv_type

    def fileno(self) -> int:
        """The fd to poll for readability (a message or a hang-up is waiting)."""
        if self._sock.fileno() < 0:
            raise OSError(_errno.EBADF, "MsgSocket is closed")
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock.fileno() >= 0:
            self._sock.close()
            close = getattr(self._owner, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> MsgSocket[S, R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wait(self, events: int, deadline: float | None, op: str, timeout: float) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), events)
        while True:
            if deadline is None:
                ms = -1
            else:
                ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            if poller.poll(ms):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(op, timeout)

    def _sockopt_timeout(self, opt: int) -> float:
        """The socket-level timeout (``set_read_timeout`` etc. of sys_util.UnixSeqpacket)."""
        sec, usec = struct.unpack("@ll", self._sock.getsockopt(socket.SOL_SOCKET, opt, 16))
        return float(sec + usec / 1e6)

    def send(self, msg: S, *, timeout: float | _Default | None = _DEFAULT) -> None:
        """Send one message (and the fds it carries, by SCM_RIGHTS; they stay open here).

        Raises :class:`~msg_socket.errors.EncodeError` if ``msg`` does not fit its type (nothing
        is sent), :class:`~msg_socket.errors.Timeout`, :class:`~msg_socket.errors.Disconnected`
        if the peer is gone, :class:`~msg_socket.errors.SendError` for other failures.
        """
        data, fds = encode(self._send_type, msg)
        t = self.send_timeout if isinstance(timeout, _Default) else timeout
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        deadline = None if t is None else time.monotonic() + t
        while True:
            if t is not None:
                self._wait(select.POLLOUT, deadline, "send", t)
            try:
                flags = socket.MSG_NOSIGNAL | (socket.MSG_DONTWAIT if t is not None else 0)
                self._sock.sendmsg([data], anc, flags)
                return
            except BlockingIOError:
                if t is None:  # SO_SNDTIMEO set on the socket itself expired
                    raise Timeout("send", self._sockopt_timeout(socket.SO_SNDTIMEO)) from None
                continue
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == _errno.EBADF and self.closed:
                    raise
                if e.errno in (_errno.EPIPE, _errno.ECONNRESET, _errno.ENOTCONN):
                    raise Disconnected() from e
                raise SendError(e.errno or 0, e.strerror or str(e)) from e

    def recv(self, *, timeout: float | _Default | None = _DEFAULT) -> R:
        """Receive one message, taking ownership of the fds that came with it.

        Raises :class:`~msg_socket.errors.Disconnected` when the peer hung up, a
        :class:`~msg_socket.errors.MsgError` subclass for a malformed message (its fds are
        closed), :class:`~msg_socket.errors.Timeout` when nothing arrived in time.
        """
        t = self.recv_timeout if isinstance(timeout, _Default) else timeout
        deadline = None if t is None else time.monotonic() + t
        flags = socket.MSG_CMSG_CLOEXEC
        while True:
            if t is not None:
                self._wait(select.POLLIN, deadline, "recv", t)
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(
                    self._recv_size + 1,
                    self._ancbufsize,
                    flags | (socket.MSG_DONTWAIT if t is not None else 0),
                )
                break
            except BlockingIOError:
                if t is None:  # SO_RCVTIMEO set on the socket itself expired
                    raise Timeout("recv", self._sockopt_timeout(socket.SO_RCVTIMEO)) from None
                continue
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == _errno.EBADF and self.closed:
                    raise
                if e.errno in (_errno.ECONNRESET, _errno.ENOTCONN):
                    raise Disconnected(self._recv_size, 0) from e
                raise RecvError(e.errno or 0, e.strerror or str(e)) from e
        fds = _fds_from_ancdata(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            raise NotExpectFd(self._recv_codec.max_fds, -1)
        if not data:
            _close_fds(fds)
            raise Disconnected(self._recv_size, 0)
        # decode() checks the size (a packet longer than the buffer shows as size + 1), the
        # layout and the fd count, and closes the fds on any failure.
        result: R = decode(self._recv_type, data, fds)
        return result

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._sock.fileno()}"
        return (
            f"MsgSocket[{getattr(self._send_type, '__qualname__', self._send_type)}, "
            f"{getattr(self._recv_type, '__qualname__', self._recv_type)}]({state})"
        )


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:whole]))
    return fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _socketpair() -> tuple[Any, Any]:
    """A connected SOCK_SEQPACKET pair: sys_util's when it provides one, else the socket module's
    (both are O_CLOEXEC)."""
    seqpacket = getattr(importlib.import_module("sys_util"), "UnixSeqpacket", None)
    if seqpacket is None:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a, b = seqpacket.pair()
    return a, b


def pair(
    send_type: type[S],
    recv_type: type[R],
    *,
    send_timeout: float | None = None,
    recv_timeout: float | None = None,
) -> tuple[MsgSocket[S, R], MsgSocket[R, S]]:
    """A connected pair: the first sends ``send_type`` and receives ``recv_type``, the second
    the other way round (crosvm's ``pair::<Req, Resp>()``)."""
    a, b = _socketpair()
    try:
        first: MsgSocket[S, R] = MsgSocket(
            a, send_type, recv_type, send_timeout=send_timeout, recv_timeout=recv_timeout
        )
    except BaseException:
        a.close()
        b.close()
        raise
    try:
        second: MsgSocket[R, S] = MsgSocket(
            b, recv_type, send_type, send_timeout=send_timeout, recv_timeout=recv_timeout
        )
    except BaseException:
        first.close()
        b.close()
        raise
    return first, second
