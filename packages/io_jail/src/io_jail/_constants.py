"""Named constants a policy may use (``arg2 in ~PROT_EXEC``, ``arg0 == PR_SET_NAME``).

Most values come from the stdlib modules that wrap the same C headers (``os``, ``mmap``,
``socket``, ``fcntl``, ``termios``, ``errno``, ``signal``), so they are the values of the running
x86_64 Linux and not hand-copied; the few the stdlib does not expose (``PR_*``, ``CLONE_*``, some
``MADV_*``) are listed from ``<linux/prctl.h>``, ``<linux/sched.h>`` and ``<asm/mman-common.h>``.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import socket
import termios

__all__ = ["CONSTANTS", "ERRNOS"]

_PREFIXES: dict[object, tuple[str, ...]] = {
    os: ("O_", "SEEK_", "F_OK", "R_OK", "W_OK", "X_OK", "AT_", "EFD_", "GRND_", "RWF_", "MFD_"),
    mmap: ("PROT_", "MAP_", "MADV_"),
    socket: ("AF_", "SOCK_", "MSG_", "SOL_", "SO_", "SHUT_", "IPPROTO_"),
    fcntl: ("F_", "FD_", "LOCK_", "FALLOC_"),
    termios: ("FIO", "TIOC", "TC"),
}

_LINUX: dict[str, int] = {
    # <linux/prctl.h>
    "PR_SET_PDEATHSIG": 1,
    "PR_GET_PDEATHSIG": 2,
    "PR_GET_DUMPABLE": 3,
    "PR_SET_DUMPABLE": 4,
    "PR_SET_KEEPCAPS": 8,
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21,
    "PR_SET_SECCOMP": 22,
    "PR_CAPBSET_READ": 23,
    "PR_CAPBSET_DROP": 24,
    "PR_SET_TIMERSLACK": 29,
    "PR_SET_CHILD_SUBREAPER": 36,
    "PR_SET_NO_NEW_PRIVS": 38,
    "PR_GET_NO_NEW_PRIVS": 39,
    "PR_SET_THP_DISABLE": 41,
    "PR_CAP_AMBIENT": 47,
    "PR_SET_VMA": 0x53564D41,
    # <linux/sched.h>
    "CLONE_VM": 0x100,
    "CLONE_FS": 0x200,
    "CLONE_FILES": 0x400,
    "CLONE_SIGHAND": 0x800,
    "CLONE_PIDFD": 0x1000,
    "CLONE_PTRACE": 0x2000,
    "CLONE_VFORK": 0x4000,
    "CLONE_PARENT": 0x8000,
    "CLONE_THREAD": 0x10000,
    "CLONE_NEWNS": 0x20000,
    "CLONE_SYSVSEM": 0x40000,
    "CLONE_SETTLS": 0x80000,
    "CLONE_PARENT_SETTID": 0x100000,
    "CLONE_CHILD_CLEARTID": 0x200000,
    "CLONE_DETACHED": 0x400000,
    "CLONE_UNTRACED": 0x800000,
    "CLONE_CHILD_SETTID": 0x1000000,
    "CLONE_NEWCGROUP": 0x2000000,
    "CLONE_NEWUTS": 0x4000000,
    "CLONE_NEWIPC": 0x8000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_IO": 0x80000000,
    # <asm/mman-common.h> (values the stdlib mmap module may lack)
    "MADV_NORMAL": 0,
    "MADV_RANDOM": 1,
    "MADV_SEQUENTIAL": 2,
    "MADV_WILLNEED": 3,
    "MADV_DONTNEED": 4,
    "MADV_FREE": 8,
    "MADV_REMOVE": 9,
    "MADV_DONTFORK": 10,
    "MADV_DOFORK": 11,
    "MADV_MERGEABLE": 12,
    "MADV_UNMERGEABLE": 13,
    "MADV_HUGEPAGE": 14,
    "MADV_NOHUGEPAGE": 15,
    "MADV_DONTDUMP": 16,
    "MADV_DODUMP": 17,
    # <linux/futex.h>
    "FUTEX_WAIT": 0,
    "FUTEX_WAKE": 1,
    "FUTEX_PRIVATE_FLAG": 128,
    "FUTEX_CLOCK_REALTIME": 256,
    # <linux/eventfd.h>, <linux/timerfd.h>, <linux/memfd.h>
    "TFD_CLOEXEC": 0o2000000,
    "TFD_NONBLOCK": 0o4000,
    "EPOLL_CLOEXEC": 0o2000000,
    # ioctls on block devices
    "BLKDISCARD": 0x1277,
}


def _collect() -> dict[str, int]:
    table: dict[str, int] = {}
    for module, prefixes in _PREFIXES.items():
        for name in dir(module):
            value = getattr(module, name)
            if name.startswith(prefixes) and name.isupper() and isinstance(value, int):
                table[name] = int(value)
    for sig in signal.Signals:
        table[sig.name] = int(sig)
    table.update(_LINUX)
    return table


#: name -> value of every constant a policy may name.
CONSTANTS: dict[str, int] = _collect()
#: errno name -> value, for ``return EPERM``.
ERRNOS: dict[str, int] = {name: code for code, name in errno.errorcode.items()}
