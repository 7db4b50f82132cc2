"""Fixed-layout typed messages with file descriptors over SOCK_SEQPACKET."""

from msg_socket.__about__ import __version__
from msg_socket.errors import Error

__all__ = ["Error", "__version__"]
