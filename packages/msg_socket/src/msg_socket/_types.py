"""Field type vocabulary: fixed-width numbers, fixed-length bytes/arrays, and fd-bearing types.

Python's ``int`` and ``bytes`` have no size, so a field says its wire width with
``typing.Annotated``: ``Annotated[int, U32]`` (spelled ``u32``), ``Annotated[bytes,
FixedBytes(8)]``, ``Annotated[tuple[u8, ...], Array(16)]``. Type checkers see plain ``int`` /
``bytes`` / ``tuple``; msg_socket reads the marker to pick the layout.
"""

from __future__ import annotations

import fcntl
import io
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

__all__ = [
    "F32",
    "F64",
    "FD",
    "I8",
    "I16",
    "I32",
    "I64",
    "U8",
    "U16",
    "U32",
    "U64",
    "USIZE",
    "Array",
    "FdMarker",
    "FixedBytes",
    "Float",
    "Int",
    "RawFd",
    "f32",
    "f64",
    "i8",
    "i16",
    "i32",
    "i64",
    "register_fd_type",
    "u8",
    "u16",
    "u32",
    "u64",
    "usize",
]


@dataclass(frozen=True)
class Int:
    """Marker: an integer of ``size`` bytes, little endian, ``signed`` or not."""

    size: int
    signed: bool

    @property
    def fmt(self) -> str:
        """The :mod:`struct` format of this integer (little endian)."""
        code = {1: "b", 2: "h", 4: "i", 8: "q"}[self.size]
        return "<" + (code if self.signed else code.upper())

    @property
    def min(self) -> int:
        return -(1 << (self.size * 8 - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return (1 << (self.size * 8 - (1 if self.signed else 0))) - 1


@dataclass(frozen=True)
class Float:
    """Marker: an IEEE 754 float of ``size`` (4 or 8) bytes, little endian."""

    size: int

    @property
    def fmt(self) -> str:
        return "<f" if self.size == 4 else "<d"


@dataclass(frozen=True)
class FixedBytes:
    """Marker for ``Annotated[bytes, FixedBytes(n)]``: exactly ``n`` raw bytes."""

    length: int


@dataclass(frozen=True)
class Array:
    """Marker for ``Annotated[tuple[T, ...], Array(n)]`` (or ``list[T]``): exactly ``n`` values
    of type ``T`` laid out back to back. Decodes to the container named in the annotation."""

    length: int


@dataclass(frozen=True)
class FdMarker:
    """Marker for ``RawFd``: a file descriptor travelling as SCM_RIGHTS, decoded as a bare int
    that the receiver owns (and must close)."""


U8 = Int(1, False)
U16 = Int(2, False)
U32 = Int(4, False)
U64 = Int(8, False)
#: crosvm encodes ``usize`` as a u64 whatever the platform.
USIZE = U64
I8 = Int(1, True)
I16 = Int(2, True)
I32 = Int(4, True)
I64 = Int(8, True)
F32 = Float(4)
F64 = Float(8)
FD = FdMarker()

u8 = Annotated[int, U8]
u16 = Annotated[int, U16]
u32 = Annotated[int, U32]
u64 = Annotated[int, U64]
usize = Annotated[int, USIZE]
i8 = Annotated[int, I8]
i16 = Annotated[int, I16]
i32 = Annotated[int, I32]
i64 = Annotated[int, I64]
f32 = Annotated[float, F32]
f64 = Annotated[float, F64]
RawFd = Annotated[int, FD]


T = TypeVar("T")

_FD_TYPES: dict[type[Any], Callable[[int], Any]] = {}


def register_fd_type(cls: type[T], from_fd: Callable[[int], T]) -> None:
    """Teach msg_socket to decode fields annotated ``cls`` from a received fd.

    ``from_fd`` takes ownership of the fd, or raises (``OSError``/``ValueError``/``TypeError``)
    without taking it when the fd is not of the right kind; the decoder then closes the fd and
    reports :class:`~msg_socket.errors.InvalidType`. Classes with a ``from_fd(fd)`` (or
    ``from_raw_fd(fd)``) classmethod -- every ``sys_util.OwnedFd`` subclass: ``EventFd``,
    ``SharedMemory``... -- need no registration.
    """
    _FD_TYPES[cls] = from_fd


def fd_factory(cls: type[Any]) -> Callable[[int], Any] | None:
    """How to turn a received fd into a ``cls``, or None if ``cls`` is not an fd type."""
    for klass in cls.__mro__:
        if klass in _FD_TYPES:
            return _FD_TYPES[klass]
    for name in ("from_fd", "from_raw_fd"):
        from_raw = getattr(cls, name, None)
        if callable(from_raw):
            return from_raw  # type: ignore[no-any-return]
    return None


def _file_from_fd(fd: int) -> io.FileIO:
    """A received fd as an unbuffered binary file, opened with the fd's own access mode."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    mode = {os.O_RDONLY: "rb", os.O_WRONLY: "wb"}.get(flags & os.O_ACCMODE, "r+b")
    if flags & os.O_APPEND and mode != "rb":
        mode = "ab" if mode == "wb" else "a+b"
    return io.FileIO(fd, mode, closefd=True)


def _socket_from_fd(fd: int) -> socket.socket:
    """A received fd as a socket (raises OSError ENOTSOCK, without taking the fd, if it is not)."""
    return socket.socket(fileno=fd)


register_fd_type(io.FileIO, _file_from_fd)
register_fd_type(socket.socket, _socket_from_fd)
