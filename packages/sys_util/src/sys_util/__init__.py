"""Safe Linux system utilities for a VMM: eventfd, epoll, mmap, memfd, guest memory, signals.

The bottom of pycrosvm's package DAG. Every raw pointer lives here (and in kvm_sys/kvm); callers
get bounds-checked objects that own their file descriptors.
"""

from sys_util.__about__ import __version__
from sys_util._address import GuestAddress
from sys_util._eventfd import EventFd
from sys_util._fd import AsRawFd, OwnedFd
from sys_util._guest_memory import GuestMemory, MemoryRegion
from sys_util._mmap import BytesLike, MemoryMapping, pagesize
from sys_util._poll import PollContext, PollEvents
from sys_util._shm import Seals, SharedMemory
from sys_util.errors import Error, GuestMemoryError, InvalidArgument

__all__ = [
    "AsRawFd",
    "BytesLike",
    "Error",
    "EventFd",
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryError",
    "InvalidArgument",
    "MemoryMapping",
    "MemoryRegion",
    "OwnedFd",
    "PollContext",
    "PollEvents",
    "Seals",
    "SharedMemory",
    "__version__",
    "pagesize",
]
