"""Safe Linux system utilities for a VMM: eventfd, epoll, mmap, memfd, guest memory, signals."""

from sys_util.__about__ import __version__
from sys_util.errors import Error

__all__ = ["Error", "__version__"]
