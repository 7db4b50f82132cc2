"""The kernel's vhost API (``<linux/vhost.h>``): virtqueues served by the host kernel.

A vhost device (``/dev/vhost-net``, ``/dev/vhost-vsock``) is a file whose ioctls hand the kernel
everything it needs to run a virtqueue on its own: the VMM's memory table (guest physical ->
VMM virtual addresses), each ring's size, start index and *userspace* addresses, and three
eventfds per ring: ``kick`` (the guest notified the queue: an ioeventfd), ``call`` (the kernel
put buffers in the used ring: interrupt the guest) and ``err``. The data path then never enters
the VMM. This is crosvm's ``vhost`` crate: a :class:`Vhost` base with the generic ioctls, and
:class:`VhostNet` / :class:`VhostVsock` for the two backends' own ioctls.

Semantics worth knowing (``drivers/vhost/vhost.c``, ``net.c``, ``vsock.c``):

* ``VHOST_SET_OWNER`` binds the device to the *calling process's* address space (its ``mm``)
  and starts the kernel worker. Every userspace address given afterwards is interpreted in that
  process, so it must run in the process that maps guest memory (the jailed device process).
  A second ``SET_OWNER`` fails with ``EBUSY``; every other ioctl must come from the owner.
* Ring size and base can only change while the ring has no backend (``EBUSY`` otherwise).
* ``VHOST_NET_SET_BACKEND`` with fd ``-1`` detaches a ring from its tap; ``VHOST_GET_VRING_BASE``
  then reports where the kernel stopped (its ``last_avail_idx``).
* vhost-vsock has no ``VHOST_RESET_OWNER``: the owner lasts as long as the fd.

The ioctl request numbers are computed from the ``_IOC`` encoding and the struct sizes below,
as the kernel header does, and a unit test checks them against a C program compiled with
``<linux/vhost.h>``. Arguments are packed into Python buffers with :mod:`struct`; the kernel
copies them in or out during the call (``copy_from_user``/``copy_to_user``), so no pointer
outlives an ioctl.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from typing import Self

from sys_util._fd import AsRawFd, OwnedFd, raw_fd
from sys_util.errors import VhostError

__all__ = [
    "VHOST_FILE_UNBIND",
    "VHOST_GET_FEATURES",
    "VHOST_GET_VRING_BASE",
    "VHOST_NET_PATH",
    "VHOST_NET_SET_BACKEND",
    "VHOST_RESET_OWNER",
    "VHOST_SET_FEATURES",
    "VHOST_SET_MEM_TABLE",
    "VHOST_SET_OWNER",
    "VHOST_SET_VRING_ADDR",
    "VHOST_SET_VRING_BASE",
    "VHOST_SET_VRING_CALL",
    "VHOST_SET_VRING_ERR",
    "VHOST_SET_VRING_KICK",
    "VHOST_SET_VRING_NUM",
    "VHOST_VSOCK_PATH",
    "VHOST_VSOCK_SET_GUEST_CID",
    "VHOST_VSOCK_SET_RUNNING",
    "VRING_ADDR",
    "VRING_FILE",
    "VRING_STATE",
    "Vhost",
    "VhostNet",
    "VhostVsock",
    "ioc",
]

VHOST_NET_PATH = "/dev/vhost-net"
VHOST_VSOCK_PATH = "/dev/vhost-vsock"
#: The fd that detaches a ring from its backend / eventfd.
VHOST_FILE_UNBIND = -1
#: A sanity bound on one memory table; the kernel itself refuses more regions than its
#: ``max_mem_regions`` module parameter (64 by default) with ``E2BIG``.
MAX_MEM_REGIONS = 4096

# -- the _IOC encoding of <asm-generic/ioctl.h> (x86: 8 bits nr, 8 type, 14 size, 2 dir) ------

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``: the request number of an ioctl."""
    if not (0 <= nr < 256 and 0 <= type_ < 256 and 0 <= size < 1 << 14 and 0 <= direction < 4):
        raise ValueError(f"_IOC({direction}, {type_:#x}, {nr:#x}, {size}) out of range")
    return (
        direction << _IOC_DIRSHIFT
        | size << _IOC_SIZESHIFT
        | type_ << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
    )


def _io(nr: int) -> int:
    return ioc(_IOC_NONE, VHOST_VIRTIO, nr, 0)


def _ior(nr: int, size: int) -> int:
    return ioc(_IOC_READ, VHOST_VIRTIO, nr, size)


def _iow(nr: int, size: int) -> int:
    return ioc(_IOC_WRITE, VHOST_VIRTIO, nr, size)


def _iowr(nr: int, size: int) -> int:
    return ioc(_IOC_READ | _IOC_WRITE, VHOST_VIRTIO, nr, size)


# -- <linux/vhost_types.h> layouts (native byte order, natural alignment) ----------------------

#: struct vhost_vring_state { unsigned int index; unsigned int num; }
VRING_STATE = struct.Struct("=II")
#: struct vhost_vring_file { unsigned int index; int fd; }
VRING_FILE = struct.Struct("=Ii")
#: struct vhost_vring_addr { unsigned index, flags; u64 desc, used, avail, log_guest_addr; }
VRING_ADDR = struct.Struct("=IIQQQQ")
#: struct vhost_memory { u32 nregions; u32 padding; struct vhost_memory_region regions[]; }
MEMORY = struct.Struct("=II")
#: struct vhost_memory_region { u64 guest_phys_addr, memory_size, userspace_addr, flags_padding; }
MEMORY_REGION = struct.Struct("=QQQQ")
_U64 = struct.Struct("=Q")
_INT = struct.Struct("=i")

VHOST_VIRTIO = 0xAF
VHOST_GET_FEATURES = _ior(0x00, _U64.size)
VHOST_SET_FEATURES = _iow(0x00, _U64.size)
VHOST_SET_OWNER = _io(0x01)
VHOST_RESET_OWNER = _io(0x02)
VHOST_SET_MEM_TABLE = _iow(0x03, MEMORY.size)
VHOST_SET_VRING_NUM = _iow(0x10, VRING_STATE.size)
VHOST_SET_VRING_ADDR = _iow(0x11, VRING_ADDR.size)
VHOST_SET_VRING_BASE = _iow(0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE = _iowr(0x12, VRING_STATE.size)
VHOST_SET_VRING_KICK = _iow(0x20, VRING_FILE.size)
VHOST_SET_VRING_CALL = _iow(0x21, VRING_FILE.size)
VHOST_SET_VRING_ERR = _iow(0x22, VRING_FILE.size)
VHOST_NET_SET_BACKEND = _iow(0x30, VRING_FILE.size)
VHOST_VSOCK_SET_GUEST_CID = _iow(0x60, _U64.size)
VHOST_VSOCK_SET_RUNNING = _iow(0x61, _INT.size)

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = (1 << 64) - 1


def _fd_arg(fd: int | AsRawFd | None) -> int:
    if fd is None:
        return VHOST_FILE_UNBIND
    value = raw_fd(fd)
    if value < VHOST_FILE_UNBIND:
        raise VhostError("(argument check)", errno.EBADF, f"fd {value} is not a file descriptor")
    return value


def _u32(name: str, value: int) -> int:
    if not 0 <= value <= _U32_MAX:
        raise VhostError("(argument check)", errno.EINVAL, f"{name} {value} is not a u32")
    return value


def _u64(name: str, value: int) -> int:
    if not 0 <= value <= _U64_MAX:
        raise VhostError("(argument check)", errno.EINVAL, f"{name} {value:#x} is not a u64")
    return value


class Vhost(OwnedFd):
    """An open vhost device: the ioctls every vhost backend shares.

    Wraps an fd with :meth:`from_fd` or opens a node with :meth:`open`. Every failing ioctl
    raises :class:`~sys_util.errors.VhostError` naming the ioctl and the errno; use after
    :meth:`close` raises ``OSError(EBADF)``.
    """

    __slots__ = ()

    #: The node :meth:`open` uses by default (set by the subclasses).
    DEFAULT_PATH: str = ""
    #: What the node provides, for error messages.
    KIND: str = "vhost"

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Self:
        """Open ``path`` (default :attr:`DEFAULT_PATH`) read-write, close-on-exec.

        A missing node raises :class:`VhostError` with ``ENOENT`` and a message saying the
        kernel backend is not available on this host.
        """
        where = os.fspath(path) if path is not None else cls.DEFAULT_PATH
        if not where:
            raise VhostError("open", errno.EINVAL, f"{cls.__name__} needs a device path")
        try:
            fd = os.open(where, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VhostError(
                "open",
                errno.ENOENT,
                f"{cls.KIND} not available on this host ({where} missing)",
                path=where,
            ) from None
        except OSError as err:
            code = err.errno or errno.EIO
            raise VhostError("open", code, f"{where}: {os.strerror(code)}", path=where) from None
        return cls(fd)

    # -- raw calls --------------------------------------------------------------------------

    def _ioctl(self, name: str, request: int, arg: int | bytearray = 0) -> None:
        fd = self.fileno()
        try:
            # SAFETY: `arg` is an int passed by value, or a bytearray of exactly the size
            # encoded in `request` (or, for SET_MEM_TABLE, header plus regions) that the kernel
            # copies in/out before the call returns.
            fcntl.ioctl(fd, request, arg)
        except OSError as err:
            raise VhostError(name, err.errno or errno.EIO) from None

    def _vring_state(self, name: str, request: int, index: int, num: int) -> bytearray:
        buf = bytearray(VRING_STATE.pack(_u32("queue index", index), _u32("num", num)))
        self._ioctl(name, request, buf)
        return buf

    def _vring_file(self, name: str, request: int, index: int, fd: int | AsRawFd | None) -> None:
        buf = bytearray(VRING_FILE.pack(_u32("queue index", index), _fd_arg(fd)))
        self._ioctl(name, request, buf)

    # -- the generic vhost ioctls --------------------------------------------------------------

    def set_owner(self) -> None:
        """Make the calling process the owner (its address space, a kernel worker)."""
        self._ioctl("VHOST_SET_OWNER", VHOST_SET_OWNER)

    def reset_owner(self) -> None:
        """Give up ownership: stop the worker, forget memory table and rings (vhost-net only)."""
        self._ioctl("VHOST_RESET_OWNER", VHOST_RESET_OWNER)

    def get_features(self) -> int:
        """The virtio feature bits the kernel backend supports."""
        buf = bytearray(_U64.size)
        self._ioctl("VHOST_GET_FEATURES", VHOST_GET_FEATURES, buf)
        value: int = _U64.unpack(buf)[0]
        return value

    def set_features(self, features: int) -> None:
        """The features the driver acked (only bits :meth:`get_features` reported)."""
        buf = bytearray(_U64.pack(_u64("features", features)))
        self._ioctl("VHOST_SET_FEATURES", VHOST_SET_FEATURES, buf)

    def set_mem_table(self, regions: Sequence[tuple[int, int, int]]) -> None:
        """Guest RAM as ``(guest_addr, size, host_userspace_addr)`` triples (owner's mappings)."""
        if not regions:
            raise VhostError("VHOST_SET_MEM_TABLE", errno.EINVAL, "no memory regions")
        if len(regions) > MAX_MEM_REGIONS:
            raise VhostError("VHOST_SET_MEM_TABLE", errno.E2BIG, f"{len(regions)} regions")
        buf = bytearray(MEMORY.size + MEMORY_REGION.size * len(regions))
        MEMORY.pack_into(buf, 0, len(regions), 0)
        for i, (guest, size, host) in enumerate(regions):
            if size <= 0 or guest + size - 1 > _U64_MAX or host + size - 1 > _U64_MAX:
                raise VhostError(
                    "VHOST_SET_MEM_TABLE",
                    errno.EINVAL,
                    f"region {guest:#x}+{size:#x} at {host:#x} is empty or overflows",
                )
            MEMORY_REGION.pack_into(
                buf, MEMORY.size + i * MEMORY_REGION.size, _u64("guest address", guest), size,
                _u64("host address", host), 0,
            )  # fmt: skip
        self._ioctl("VHOST_SET_MEM_TABLE", VHOST_SET_MEM_TABLE, buf)

    def set_vring_num(self, index: int, num: int) -> None:
        """Ring ``index`` has ``num`` entries (a power of two, at most 32768)."""
        self._vring_state("VHOST_SET_VRING_NUM", VHOST_SET_VRING_NUM, index, num)

    def set_vring_addr(
        self,
        index: int,
        desc_user_addr: int,
        used_user_addr: int,
        avail_user_addr: int,
        log_addr: int = 0,
        flags: int = 0,
    ) -> None:
        """The ring's descriptor table, used and available rings, as owner userspace addresses."""
        buf = bytearray(
            VRING_ADDR.pack(
                _u32("queue index", index), _u32("flags", flags), _u64("desc", desc_user_addr),
                _u64("used", used_user_addr), _u64("avail", avail_user_addr),
                _u64("log", log_addr),
            )
        )  # fmt: skip
        self._ioctl("VHOST_SET_VRING_ADDR", VHOST_SET_VRING_ADDR, buf)

    def set_vring_base(self, index: int, num: int) -> None:
        """The next available index the kernel will read (0 for a fresh ring)."""
        self._vring_state("VHOST_SET_VRING_BASE", VHOST_SET_VRING_BASE, index, num)

    def get_vring_base(self, index: int) -> int:
        """Where the kernel stopped reading ring ``index`` (its last_avail_idx)."""
        buf = self._vring_state("VHOST_GET_VRING_BASE", VHOST_GET_VRING_BASE, index, 0)
        value: int = VRING_STATE.unpack(buf)[1]
        return value

    def set_vring_kick(self, index: int, fd: int | AsRawFd | None) -> None:
        """The eventfd the guest's notifications arrive on (``None``/-1: none)."""
        self._vring_file("VHOST_SET_VRING_KICK", VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | AsRawFd | None) -> None:
        """The eventfd the kernel signals after adding used buffers (``None``/-1: none)."""
        self._vring_file("VHOST_SET_VRING_CALL", VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | AsRawFd | None) -> None:
        """The eventfd the kernel signals when the guest broke the ring (``None``/-1: none)."""
        self._vring_file("VHOST_SET_VRING_ERR", VHOST_SET_VRING_ERR, index, fd)


class VhostNet(Vhost):
    """``/dev/vhost-net``: rings served by the kernel, frames to and from a tap."""

    __slots__ = ()
    DEFAULT_PATH = VHOST_NET_PATH
    KIND = "vhost-net"

    def set_backend(self, index: int, fd: int | AsRawFd | None) -> None:
        """Attach ring ``index`` to the tap ``fd`` (starts it); ``None``/-1 detaches it."""
        self._vring_file("VHOST_NET_SET_BACKEND", VHOST_NET_SET_BACKEND, index, fd)


class VhostVsock(Vhost):
    """``/dev/vhost-vsock``: the guest's rx/tx rings served by the host kernel's vsock stack."""

    __slots__ = ()
    DEFAULT_PATH = VHOST_VSOCK_PATH
    KIND = "vhost-vsock"

    def set_guest_cid(self, cid: int) -> None:
        """The guest's context ID (3..2^32-2; ``EADDRINUSE`` if another VM has it)."""
        buf = bytearray(_U64.pack(_u64("cid", cid)))
        self._ioctl("VHOST_VSOCK_SET_GUEST_CID", VHOST_VSOCK_SET_GUEST_CID, buf)

    def set_running(self, running: bool) -> None:
        """Start (rings must be set up) or stop serving the rings."""
        buf = bytearray(_INT.pack(1 if running else 0))
        self._ioctl("VHOST_VSOCK_SET_RUNNING", VHOST_VSOCK_SET_RUNNING, buf)
