"""Safe Linux system utilities for a VMM: eventfd, epoll, mmap, memfd, guest memory, signals.

The bottom of pycrosvm's package DAG. Every raw pointer lives here (and in kvm_sys/kvm); callers
get bounds-checked objects that own their file descriptors.
"""

from sys_util.__about__ import __version__
from sys_util._address import GuestAddress
from sys_util._cachestat import CacheStat, cachestat
from sys_util._cpus import number_of_online_cpus, online_cpus, parse_cpu_list, read_online_cpus
from sys_util._eventfd import EventFd
from sys_util._falloc import allocate, fallocate, punch_hole, write_zeroes
from sys_util._fd import AsRawFd, OwnedFd
from sys_util._frame_ring import FrameBatch, FrameRing
from sys_util._guest_memory import (
    SHMEM_THP_SETTING,
    GuestMemory,
    MemoryRegion,
    shmem_hugepages_enabled,
)
from sys_util._logging import init_logging, logging_fds, reset_logging
from sys_util._mmap import BytesLike, MemoryMapping, pagesize
from sys_util._poll import PollContext, PollEvents
from sys_util._seqpacket import UnixSeqpacket, UnixSeqpacketListener
from sys_util._shm import Seals, SharedMemory
from sys_util._signal import (
    KICK_SIGNAL,
    block_signals,
    blocked_signals,
    clear_pending_signal,
    install_kick_handler,
    kick_handler_installed,
    kick_thread,
    signals_blocked,
    unblock_signals,
)
from sys_util._terminal import RawTerminal, restore_mode, set_raw_mode
from sys_util._timerfd import TimerFd
from sys_util._uring import IoUring, uring_supported
from sys_util._vhost import Vhost, VhostNet, VhostVsock
from sys_util.errors import (
    Error,
    GuestMemoryError,
    InvalidArgument,
    MessageTruncated,
    VhostError,
)

__all__ = [
    "KICK_SIGNAL",
    "SHMEM_THP_SETTING",
    "AsRawFd",
    "BytesLike",
    "CacheStat",
    "Error",
    "EventFd",
    "FrameBatch",
    "FrameRing",
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryError",
    "InvalidArgument",
    "IoUring",
    "MemoryMapping",
    "MemoryRegion",
    "MessageTruncated",
    "OwnedFd",
    "PollContext",
    "PollEvents",
    "RawTerminal",
    "Seals",
    "SharedMemory",
    "TimerFd",
    "UnixSeqpacket",
    "UnixSeqpacketListener",
    "Vhost",
    "VhostError",
    "VhostNet",
    "VhostVsock",
    "__version__",
    "allocate",
    "block_signals",
    "blocked_signals",
    "cachestat",
    "clear_pending_signal",
    "fallocate",
    "init_logging",
    "install_kick_handler",
    "kick_handler_installed",
    "kick_thread",
    "logging_fds",
    "number_of_online_cpus",
    "online_cpus",
    "pagesize",
    "parse_cpu_list",
    "punch_hole",
    "read_online_cpus",
    "reset_logging",
    "restore_mode",
    "set_raw_mode",
    "shmem_hugepages_enabled",
    "signals_blocked",
    "unblock_signals",
    "uring_supported",
    "write_zeroes",
]
