"""AF_UNIX SOCK_SEQPACKET sockets with file descriptor passing (SCM_RIGHTS).

Seqpacket keeps message boundaries (one send is one recv) and is connection oriented, so a peer's
death is seen as EOF. It is the transport of msg_socket and of the device-process proxy.

Ownership of passed fds: ``send`` never closes what it sends (the kernel duplicates the fds into
the message). ``recv`` returns the received fds as ints that the *caller* now owns and must close;
when a message is refused (truncated data or fds) every fd that did arrive is closed first, so
an error never leaks descriptors.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from sys_util._fd import AsRawFd, ebadf, raw_fd
from sys_util._mmap import BytesLike
from sys_util.errors import MessageTruncated

__all__ = ["UnixSeqpacket", "UnixSeqpacketListener"]

_TIMEVAL = struct.Struct("@ll")
_INT_SIZE = array.array("i").itemsize
#: Most fds the kernel accepts in one SCM_RIGHTS message (SCM_MAX_FD).
MAX_FDS = 253


def _timeval(seconds: float | None) -> bytes:
    if seconds is None:
        return _TIMEVAL.pack(0, 0)  # zero = block forever
    if seconds <= 0:
        raise ValueError(f"timeout must be positive or None, got {seconds}")
    usec = max(1, round(seconds * 1_000_000))
    return _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _SocketOwner:
    __slots__ = ("__weakref__", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    def _s(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise ebadf(type(self).__name__)
        return sock

    def fileno(self) -> int:
        return self._s().fileno()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Close the socket. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def detach(self) -> int:
        """Give up ownership of the fd and return it."""
        fd = self._s().detach()
        self._sock = None
        return fd

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._sock.fileno()}"
        return f"<{type(self).__name__} {state}>"


class UnixSeqpacket(_SocketOwner):
    """One end of a connected seqpacket socket."""

    __slots__ = ()

    @classmethod
    def pair(cls) -> tuple[UnixSeqpacket, UnixSeqpacket]:
        """A connected pair (both ends close-on-exec)."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    @classmethod
    def connect(cls, path: str | os.PathLike[str]) -> Self:
        """Connect to a :class:`UnixSeqpacketListener` bound at ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def from_fd(cls, fd: int) -> Self:
        """Wrap a connected seqpacket socket fd, taking ownership."""
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            sock.detach()
            raise OSError(errno.ENOTSOCK, f"fd {fd} is not an AF_UNIX SOCK_SEQPACKET socket")
        return cls(sock)

    def try_clone(self) -> Self:
        """A new object on a dup of this socket."""
        return type(self)(self._s().dup())

    # -- timeouts -------------------------------------------------------------------------------

    def set_read_timeout(self, seconds: float | None) -> None:
        """Make ``recv`` raise TimeoutError after ``seconds`` without a message (None: never).

        Implemented with SO_RCVTIMEO, so the fd stays blocking for any process sharing it.
        """
        self._s().setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))

    def set_write_timeout(self, seconds: float | None) -> None:
        """Make ``send`` raise TimeoutError after ``seconds`` with a full buffer (None: never)."""
        self._s().setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))

    # -- data -----------------------------------------------------------------------------------

    def send(self, data: BytesLike, fds: Iterable[int | AsRawFd] = ()) -> int:
        """Send one message carrying ``data`` and duplicates of ``fds``; return bytes sent."""
        sock = self._s()
        raw = [raw_fd(f) for f in fds]
        if len(raw) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} fds per message, got {len(raw)}")
        try:
            if not raw:
                return sock.send(data, socket.MSG_NOSIGNAL)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", raw))]
            return sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
        except BlockingIOError as err:
            raise TimeoutError(errno.EAGAIN, "send timed out") from err

    def recv(self, bufsize: int = 65536, maxfds: int = 0) -> tuple[bytes, list[int]]:
        """Receive one message: ``(data, fds)``; the caller owns (must close) the fds.

        ``b""`` with no fds means the peer closed the connection (or sent an empty message).
        Raises :class:`~sys_util.errors.MessageTruncated` if the message was longer than
        ``bufsize`` or carried more than ``maxfds`` fds (after closing any that arrived), and
        ``TimeoutError`` when a read timeout expires.
        """
        sock = self._s()
        ancbufsize = socket.CMSG_SPACE(maxfds * _INT_SIZE) if maxfds > 0 else 0
        try:
            data, ancdata, flags, _ = sock.recvmsg(bufsize, ancbufsize, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError as err:
            raise TimeoutError(errno.EAGAIN, "recv timed out") from err
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _INT_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise MessageTruncated("fds")
        if flags & socket.MSG_TRUNC:
            _close_all(fds)
            raise MessageTruncated("data")
        return data, fds

    def recv_into(self, buffer: memoryview | bytearray, maxfds: int = 0) -> tuple[int, list[int]]:
        """Like :meth:`recv` but into ``buffer``; return ``(nbytes, fds)``."""
        sock = self._s()
        ancbufsize = socket.CMSG_SPACE(maxfds * _INT_SIZE) if maxfds > 0 else 0
        try:
            nbytes, ancdata, flags, _ = sock.recvmsg_into(
                [buffer], ancbufsize, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError as err:
            raise TimeoutError(errno.EAGAIN, "recv timed out") from err
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _INT_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            _close_all(fds)
            raise MessageTruncated("fds" if flags & socket.MSG_CTRUNC else "data")
        return nbytes, fds

    def next_packet_size(self) -> int:
        """Size of the next message without consuming it (blocks like recv)."""
        probe = bytearray(1)
        try:
            # With MSG_TRUNC the kernel returns the full length even though one byte is copied.
            return self._s().recv_into(probe, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        except BlockingIOError as err:
            raise TimeoutError(errno.EAGAIN, "recv timed out") from err

    def shutdown(self) -> None:
        """Shut down both directions (the peer sees EOF) without closing the fd."""
        self._s().shutdown(socket.SHUT_RDWR)


class UnixSeqpacketListener(_SocketOwner):
    """A listening seqpacket socket bound to a filesystem path."""

    __slots__ = ("_path",)

    def __init__(self, path: str | os.PathLike[str], backlog: int = 128) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(os.fspath(path))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        super().__init__(sock)
        self._path = os.fspath(path)

    @property
    def path(self) -> str:
        return self._path

    def accept(self) -> UnixSeqpacket:
        """Wait for and return the next connection."""
        conn, _ = self._s().accept()
        return UnixSeqpacket(conn)
