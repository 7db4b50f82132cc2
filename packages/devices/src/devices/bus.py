"""The I/O and MMIO bus: maps guest port/physical addresses to devices.

Every guest ``in``/``out`` to an emulated port and every MMIO access outside RAM ends in a vCPU
exit that lands here, so :meth:`Bus.read`/:meth:`Bus.write` are the hottest Python code of the
VMM. Design, for that reason:

* The bus's structure is an immutable *snapshot* (sorted range starts, ends, devices, plus a
  small lookup cache) referenced from one attribute. Lookups read that attribute once and never
  take a lock; :meth:`Bus.insert`/:meth:`Bus.remove` build a new snapshot under a lock and swap
  it in with one reference assignment (atomic in CPython). So concurrent vCPU threads dispatch
  without contention, and the usual order -- build the bus, then start the vCPUs -- needs no
  care at all; inserting while vCPUs run is safe too (an access racing with the insert sees the
  old or the new layout).
* Lookups are a dict hit for addresses seen before (legacy ports are hit millions of times: the
  serial THR, the PCI config address) and ``bisect`` over the sorted starts otherwise. Misses
  are cached too (Linux probes many absent ports), and the cache is bounded because MMIO
  addresses are guest-chosen.
* The bus does no locking for devices: each device serialises its own state (crosvm wraps each
  in a ``Mutex``; here a device that can be reached from several vCPUs or from its own worker
  thread holds its own ``threading.Lock``).

An access must lie entirely inside one inserted range; one that straddles the end of a range is
treated as hitting no device (reads as ``0xff`` bytes, writes are dropped), so a device never
sees an offset/size beyond the length it was inserted with.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from devices.errors import BusError

__all__ = ["Bus", "BusDevice", "BusRange"]

_MAX_ADDRESS = 1 << 64
# Bound on cached distinct addresses per snapshot: plenty for every legacy port and the
# registers of hot MMIO devices, small enough that a guest sweeping MMIO cannot grow memory.
_CACHE_LIMIT = 4096


@runtime_checkable
class BusDevice(Protocol):
    """A device that sits on a :class:`Bus`.

    ``offset`` is relative to the base of the range the device was inserted at (a device
    inserted at several ranges cannot tell them apart by offset alone; insert distinct objects
    or adapters when it must). ``read`` returns exactly ``size`` bytes. Both are called from vCPU
    threads, possibly concurrently, and must not raise for any guest-chosen offset/data: a bad
    access is ignored (write) or answered with filler bytes (read).
    """

    def debug_label(self) -> str:
        """A short human name for logs and error messages ("serial COM1", "i8042")."""
        ...

    def read(self, offset: int, size: int) -> bytes:
        """Answer a guest read of ``size`` bytes at ``offset`` within the device's range."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of ``data`` at ``offset`` within the device's range."""
        ...


@dataclass(frozen=True, slots=True)
class BusRange:
    """One inserted range: ``[base, base + length)`` served by ``device``."""

    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        """The first address after the range."""
        return self.base + self.length

    def __repr__(self) -> str:
        return f"BusRange({self.base:#x}, {self.length:#x}, {self.device.debug_label()!r})"


def _no_read(offset: int, size: int) -> bytes:
    return b"\xff" * size


def _no_write(offset: int, data: bytes) -> None:
    return None


# Cache entry: (device or None, bound read, bound write, offset, bytes left in the range).
# A miss is an entry whose room is -1, so the hot path needs no separate "not found" branch:
# every access, even an empty one, is larger than the room and falls through to "unhandled".
_Entry = tuple[
    BusDevice | None,
    Callable[[int, int], bytes],
    Callable[[int, bytes], None],
    int,
    int,
]
_MISS: _Entry = (None, _no_read, _no_write, 0, -1)


class _Snapshot:
    """Immutable layout of the bus plus its (mutable, per-snapshot) lookup cache."""

    __slots__ = ("cache", "ranges", "starts")

    def __init__(self, ranges: tuple[BusRange, ...]) -> None:
        self.ranges = ranges
        self.starts = [r.base for r in ranges]
        self.cache: dict[int, _Entry] = {}

    def lookup(self, addr: int) -> _Entry:
        i = bisect_right(self.starts, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.base + r.length:
                dev = r.device
                return (dev, dev.read, dev.write, addr - r.base, r.base + r.length - addr)
        return _MISS


class Bus:
    """Address -> device dispatch for one address space (port I/O or MMIO).

    Example::

        bus = Bus()
        bus.insert(serial, 0x3F8, 8)
        bus.write(0x3F8, b"A")     # serial.write(0, b"A"); returns True
        bus.read(0x80, 1)          # no device: b"\\xff"
    """

    __slots__ = ("_lock", "_snap")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = _Snapshot(())

    # -- building -----------------------------------------------------------------------------

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        """Serve ``[base, base + length)`` with ``device``.

        Raises :class:`~devices.errors.BusError` naming both ranges when the range overlaps one
        already inserted, and for an empty, negative or beyond-64-bit range. The same device
        may be inserted at several ranges.
        """
        if not isinstance(device, BusDevice):
            raise TypeError(f"{device!r} does not implement BusDevice")
        if base < 0 or length <= 0 or base + length > _MAX_ADDRESS:
            raise BusError(base, length, "is empty, negative or beyond 64 bits")
        new = BusRange(base, length, device)
        with self._lock:
            snap = self._snap
            i = bisect_right(snap.starts, base)
            for j in (i - 1, i):
                if 0 <= j < len(snap.ranges):
                    r = snap.ranges[j]
                    if base < r.end and r.base < new.end:
                        raise BusError(
                            base, length, "overlaps", r.base, r.length, r.device.debug_label()
                        )
            self._snap = _Snapshot((*snap.ranges[:i], new, *snap.ranges[i:]))

    def remove(self, base: int) -> BusDevice:
        """Remove the range starting exactly at ``base`` and return its device.

        Raises :class:`~devices.errors.BusError` when no range starts there. An access racing
        with the removal may still reach the device once.
        """
        with self._lock:
            snap = self._snap
            i = bisect_right(snap.starts, base) - 1
            if i < 0 or snap.ranges[i].base != base:
                raise BusError(base, 1, "starts no inserted range")
            dev = snap.ranges[i].device
            self._snap = _Snapshot((*snap.ranges[:i], *snap.ranges[i + 1 :]))
            return dev

    # -- lookup -------------------------------------------------------------------------------

    def get_device(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device serving ``addr`` and the offset of ``addr`` in its range, or ``None``."""
        snap = self._snap
        entry = snap.cache.get(addr)
        if entry is None:
            entry = snap.lookup(addr)
        dev = entry[0]
        return None if dev is None else (dev, entry[3])

    def ranges(self) -> Iterator[BusRange]:
        """The inserted ranges in address order (a snapshot)."""
        return iter(self._snap.ranges)

    def __len__(self) -> int:
        return len(self._snap.ranges)

    def __repr__(self) -> str:
        return f"Bus({list(self._snap.ranges)!r})"

    # -- the hot path -------------------------------------------------------------------------

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes at ``addr``; ``b"\\xff" * size`` when no device serves it all."""
        snap = self._snap
        cache = snap.cache
        entry = cache.get(addr)
        if entry is None:
            entry = snap.lookup(addr)
            if len(cache) < _CACHE_LIMIT:
                cache[addr] = entry
        if size > entry[4]:
            return b"\xff" * size
        return entry[1](entry[3], size)

    def write(self, addr: int, data: bytes) -> bool:
        """Write ``data`` at ``addr``; returns whether a device handled it."""
        snap = self._snap
        cache = snap.cache
        entry = cache.get(addr)
        if entry is None:
            entry = snap.lookup(addr)
            if len(cache) < _CACHE_LIMIT:
                cache[addr] = entry
        if len(data) > entry[4]:
            return False
        entry[2](entry[3], data)
        return True
