"""Errors raised by msg_socket. Every error of this package derives from :class:`Error`.

Two families:

* :class:`DeclarationError` -- a message *type* cannot have a fixed-size layout (``str``,
  ``list``, a plain ``int`` with no width...). It is raised when the class is declared (or, for a
  forward reference, the first time the type is used), never when a message travels.
* :class:`MsgError` -- one message could not be encoded, sent, received or decoded. The peer of a
  socket is untrusted (a sandboxed device process may be compromised), so every way its bytes and
  fds can be wrong maps to one of these subclasses, and whatever fds came with the bad message
  have been closed by the time the error is raised.

Every error pickles (``__reduce__``), so a device process can report one to its parent.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRecvSize",
    "DeclarationError",
    "Disconnected",
    "EncodeError",
    "Error",
    "ExpectFd",
    "InvalidType",
    "MsgError",
    "NotExpectFd",
    "RecvError",
    "SendError",
    "Timeout",
]


class Error(Exception):
    """Base class of every msg_socket error."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class DeclarationError(Error, TypeError):
    """A type cannot be used in a message: it has no fixed size, or is not supported at all.

    Attributes:
        where: the field or type being declared, e.g. ``"Foo.name"``.
        reason: what is wrong and what to use instead.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(where, reason)

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class MsgError(Error):
    """One message could not be encoded, transported or decoded. Any received fds are closed."""


class EncodeError(MsgError, ValueError):
    """A value does not fit its declared type (an int out of range, bytes of the wrong length,
    an object that is not a variant of the union...). Nothing was sent.

    Attributes:
        where: the field path, e.g. ``"DiskCommand.disk_index"``.
        reason: what is wrong with the value.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(where, reason)

    def __str__(self) -> str:
        return f"cannot encode {self.where}: {self.reason}"


class BadRecvSize(MsgError):
    """A received packet does not have the message's fixed size.

    Attributes:
        expected: the size of the message type on the wire.
        actual: the number of bytes received (at least ``expected + 1`` means "too long").
    """

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(expected, actual)

    def __str__(self) -> str:
        if self.actual > self.expected:
            return f"received a packet longer than the {self.expected}-byte message"
        return f"received {self.actual} bytes, expected a {self.expected}-byte message"


class Disconnected(BadRecvSize):
    """The peer hung up (a 0-byte receive, or a send to a closed socket).

    A subclass of :class:`BadRecvSize` with ``actual == 0``, because that is what a hang-up
    looks like on a SOCK_SEQPACKET socket; catch this class to tell it apart from garbage.
    """

    def __init__(self, expected: int = 0, actual: int = 0) -> None:
        super().__init__(expected, actual)

    def __str__(self) -> str:
        return "the peer closed its end of the socket"


class InvalidType(MsgError):
    """A received byte pattern is not a value of the declared type: a bool byte other than
    0/1, an enum value that is no member, an unknown union tag, an option tag other than 0/1,
    non-zero padding, or an fd of the wrong kind.

    Attributes:
        where: the field path being decoded.
        reason: what was found.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(where, reason)

    def __str__(self) -> str:
        return f"invalid {self.where}: {self.reason}"


class ExpectFd(MsgError):
    """The message needs more file descriptors than arrived with it.

    Attributes:
        received: how many fds arrived.
    """

    def __init__(self, received: int) -> None:
        self.received = received
        super().__init__(received)

    def __str__(self) -> str:
        return f"the message needs more file descriptors than the {self.received} received"


class NotExpectFd(MsgError):
    """More file descriptors arrived than the decoded message uses (all of them were closed).

    Attributes:
        used: how many fds the decoded message consumed.
        received: how many arrived (``-1``: more than the receive buffer could hold; the
            kernel closed the excess).
    """

    def __init__(self, used: int, received: int) -> None:
        self.used = used
        self.received = received
        super().__init__(used, received)

    def __str__(self) -> str:
        got = "too many" if self.received < 0 else str(self.received)
        return f"received {got} file descriptors, the message uses {self.used}"


class SendError(MsgError):
    """The send system call failed. Attributes: ``errno``, ``strerror``."""

    def __init__(self, errno: int, strerror: str) -> None:
        self.errno = errno
        self.strerror = strerror
        super().__init__(errno, strerror)

    def __str__(self) -> str:
        return f"send failed: [Errno {self.errno}] {self.strerror}"


class RecvError(MsgError):
    """The receive system call failed. Attributes: ``errno``, ``strerror``."""

    def __init__(self, errno: int, strerror: str) -> None:
        self.errno = errno
        self.strerror = strerror
        super().__init__(errno, strerror)

    def __str__(self) -> str:
        return f"recv failed: [Errno {self.errno}] {self.strerror}"


class Timeout(MsgError, TimeoutError):
    """No message could be sent or received within the timeout. Nothing was consumed.

    Attributes:
        operation: ``"send"`` or ``"recv"``.
        seconds: the timeout that expired.
    """

    def __init__(self, operation: str, seconds: float) -> None:
        self.operation = operation
        self.seconds = seconds
        super().__init__(operation, seconds)

    def __str__(self) -> str:
        return f"{self.operation} timed out after {self.seconds:g} s"
