"""Fixed-layout typed messages with file descriptors over SOCK_SEQPACKET.

crosvm's ``msg_socket`` in Python: declare a message once, as annotated fields::

    class Adjust(Msg):
        num_bytes: u64

and it has a fixed wire size, a maximum fd count, strict decoding of untrusted input, and a
typed socket (:class:`MsgSocket`) that sends one message per packet with its fds as SCM_RIGHTS.
"""

from msg_socket.__about__ import __version__
from msg_socket._codec import MAX_FDS, decode, encode, max_fd_count, msg_size, wire_size
from msg_socket._message import Msg, TaggedUnion, Unit
from msg_socket._socket import MsgSocket, pair
from msg_socket._types import (
    F32,
    F64,
    FD,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    USIZE,
    Array,
    FixedBytes,
    RawFd,
    f32,
    f64,
    i8,
    i16,
    i32,
    i64,
    register_fd_type,
    u8,
    u16,
    u32,
    u64,
    usize,
)
from msg_socket.errors import (
    BadRecvSize,
    DeclarationError,
    Disconnected,
    EncodeError,
    Error,
    ExpectFd,
    InvalidType,
    MsgError,
    NotExpectFd,
    RecvError,
    SendError,
    Timeout,
)
from sys_util import OwnedFd

__all__ = [
    "F32",
    "F64",
    "FD",
    "I8",
    "I16",
    "I32",
    "I64",
    "MAX_FDS",
    "U8",
    "U16",
    "U32",
    "U64",
    "USIZE",
    "Array",
    "BadRecvSize",
    "DeclarationError",
    "Disconnected",
    "EncodeError",
    "Error",
    "ExpectFd",
    "FixedBytes",
    "InvalidType",
    "Msg",
    "MsgError",
    "MsgSocket",
    "NotExpectFd",
    "OwnedFd",
    "RawFd",
    "RecvError",
    "SendError",
    "TaggedUnion",
    "Timeout",
    "Unit",
    "__version__",
    "decode",
    "encode",
    "f32",
    "f64",
    "i8",
    "i16",
    "i32",
    "i64",
    "max_fd_count",
    "msg_size",
    "pair",
    "register_fd_type",
    "u8",
    "u16",
    "u32",
    "u64",
    "usize",
    "wire_size",
]
