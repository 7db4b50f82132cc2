"""A Linux TAP interface opened through ``/dev/net/tun`` (Documentation/networking/tuntap.rst).

The TUN ioctls take either an integer or a ``struct ifreq`` / ``int`` by pointer; both are done
with :func:`fcntl.ioctl` on a Python-owned buffer (the kernel copies in and out of it), so no raw
pointer leaves this module. The tap is opened ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: every
frame read or written is preceded by a ``virtio_net_hdr``, which is exactly what a virtio-net
driver puts in front of its frames, so the device passes headers through untouched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Self

from devices.virtio.net._errors import TapError

__all__ = [
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "Tap",
]

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16

# <linux/if_tun.h>: _IOW('T', nr, int) = 0x40045400 | nr, _IOR = 0x80045400 | nr.
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

#: struct ifreq: char ifr_name[16]; union { short ifr_flags; ... } (24 bytes).
_IFREQ = struct.Struct("=16sh22x")
_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")


def _ifreq(name: str, flags: int) -> bytearray:
    raw = name.encode()
    if len(raw) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise TapError("TUNSETIFF", errno.EINVAL, f"invalid interface name {name!r}", name)
    return bytearray(_IFREQ.pack(raw, flags))


class Tap:
    """One queue of a TAP interface; owns its file descriptor (non-blocking, close-on-exec)."""

    def __init__(self, fd: int, name: str) -> None:
        """Wrap an fd already attached to a TAP with a vnet header (use the constructors)."""
        self._fd = fd
        self._name = name

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str = "vmtap%d", *, vnet_hdr_size: int = 12) -> Self:
        """Attach to (or create) the TAP ``name``; a ``%d`` in it lets the kernel pick a number.

        Creating needs CAP_NET_ADMIN; attaching to an existing persistent tap needs to be its
        owner. The interface is not brought up: that is host configuration, the caller's job.
        """
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise TapError(f"open {TUN_PATH}", err.errno or 0, err.strerror or str(err)) from None
        try:
            req = _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                # SAFETY: the kernel copies a struct ifreq (40 bytes) in and out of `req`.
                fcntl.ioctl(fd, TUNSETIFF, req)
            except OSError as err:
                reason = err.strerror or str(err)
                raise TapError("TUNSETIFF", err.errno or 0, reason, name) from None
            got = bytes(req[:IFNAMSIZ]).split(b"\0", 1)[0].decode()
            tap = cls(fd, got)
            tap.set_vnet_hdr_size(vnet_hdr_size)
            return tap
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, *, vnet_hdr_size: int = 12) -> Self:
        """Take ownership of an inherited fd (``--tap-fd``) after checking it is a usable TAP.

        The fd must be a TAP opened with ``IFF_NO_PI | IFF_VNET_HDR`` (those flags cannot be
        changed once attached). It is made non-blocking and close-on-exec. On error the fd is
        left open (it still belongs to the caller).
        """
        req = bytearray(_IFREQ.size)
        try:
            # SAFETY: TUNGETIFF writes a struct ifreq (40 bytes) into `req`.
            fcntl.ioctl(fd, TUNGETIFF, req)
        except OSError as err:
            reason = f"fd {fd} is not a TUN/TAP device ({err.strerror or err})"
            raise TapError("TUNGETIFF", err.errno or 0, reason) from None
        raw, flags = _IFREQ.unpack(req)
        name = raw.split(b"\0", 1)[0].decode()
        if not flags & IFF_TAP:
            raise TapError("TUNGETIFF", 0, f"fd {fd} is a TUN (layer 3) device, not a TAP", name)
        if not flags & IFF_VNET_HDR or not flags & IFF_NO_PI:
            raise TapError(
                "TUNGETIFF", 0, f"fd {fd} was opened without IFF_VNET_HDR|IFF_NO_PI", name
            )
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        tap = cls(fd, name)
        tap.set_vnet_hdr_size(vnet_hdr_size)
        return tap

    # -- configuration -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The interface name (e.g. ``vmtap0``)."""
        return self._name

    def set_vnet_hdr_size(self, size: int) -> None:
        """Bytes of header before each frame (10, or 12 with num_buffers)."""
        buf = bytearray(_INT.pack(size))
        try:
            # SAFETY: TUNSETVNETHDRSZ reads one int from `buf`.
            fcntl.ioctl(self.fileno(), TUNSETVNETHDRSZ, buf)
        except OSError as err:
            raise TapError(
                "TUNSETVNETHDRSZ", err.errno or 0, err.strerror or str(err), self._name
            ) from None

    def vnet_hdr_size(self) -> int:
        buf = bytearray(_INT.size)
        # SAFETY: TUNGETVNETHDRSZ writes one int into `buf`.
        fcntl.ioctl(self.fileno(), TUNGETVNETHDRSZ, buf)
        value: int = _INT.unpack(buf)[0]
        return value

    def set_offload(self, flags: int) -> None:
        """Which offloaded frames (``TUN_F_*``) we accept from the host: partial checksums,
        TSO super-frames. Anything not listed is segmented/checksummed by the kernel first."""
        try:
            # SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
            fcntl.ioctl(self.fileno(), TUNSETOFFLOAD, flags)
        except OSError as err:
            raise TapError(
                "TUNSETOFFLOAD", err.errno or 0, err.strerror or str(err), self._name
            ) from None

    def features(self) -> int:
        """The IFF_* flags this kernel's tun driver supports (TUNGETFEATURES)."""
        buf = bytearray(_UINT.size)
        # SAFETY: TUNGETFEATURES writes one unsigned int into `buf`.
        fcntl.ioctl(self.fileno(), TUNGETFEATURES, buf)
        value: int = _UINT.unpack(buf)[0]
        return value

    def set_persist(self, persist: bool) -> None:
        """Keep the interface after the last fd closes (tests create named taps this way)."""
        # SAFETY: TUNSETPERSIST takes its argument by value.
        fcntl.ioctl(self.fileno(), TUNSETPERSIST, int(persist))

    # -- fd protocol ---------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "Tap is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"Tap({self._name!r}, {state})"
