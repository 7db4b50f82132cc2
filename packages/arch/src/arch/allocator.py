"""Address-space allocator for guest I/O ports and MMIO windows.

PCI BARs, virtio-mmio windows and I/O port ranges must never overlap each other or the fixed
platform ranges; an overlap is silent corruption (two devices answer one address). One
:class:`AddressAllocator` owns one window and hands out aligned, non-overlapping ranges, first fit
from the bottom, each tagged with its owner for diagnostics.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

from arch.errors import AddressExhausted, AllocatorError

__all__ = ["AddressAllocator", "Allocation"]


@dataclass(frozen=True, slots=True)
class Allocation:
    """One allocated range ``[address, address + size)``."""

    address: int
    size: int
    tag: str

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.address + self.size


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class AddressAllocator:
    """Allocates ranges from the window ``[base, base + size)``.

    Thread-safe: devices may allocate from any thread.

    Example:
        >>> a = AddressAllocator(0xC000, 0x4000)
        >>> hex(a.allocate(0x100, 0x100, "virtio-blk"))
        '0xc000'
        >>> hex(a.allocate(0x40, 0x1000, "virtio-net"))
        '0xd000'
    """

    def __init__(self, base: int, size: int) -> None:
        if base < 0 or size <= 0:
            raise AllocatorError(f"invalid window base {base:#x} size {size:#x}")
        self._base = base
        self._end = base + size
        self._starts: list[int] = []
        self._allocs: list[Allocation] = []
        self._lock = threading.Lock()

    @property
    def base(self) -> int:
        """First address of the window."""
        return self._base

    @property
    def size(self) -> int:
        """Size of the window."""
        return self._end - self._base

    def __repr__(self) -> str:
        return f"AddressAllocator({self._base:#x}, {self.size:#x}, {len(self._allocs)} allocated)"

    @staticmethod
    def _check(size: int, alignment: int) -> None:
        if size <= 0:
            raise AllocatorError(f"allocation size {size:#x} must be positive")
        if alignment <= 0 or alignment & (alignment - 1):
            raise AllocatorError(f"alignment {alignment:#x} is not a power of two")

    def allocate(self, size: int, alignment: int = 1, tag: str = "") -> int:
        """Reserve the lowest free ``size``-byte range aligned to ``alignment``; return its start.

        Raises:
            AllocatorError: size not positive or alignment not a power of two.
            AddressExhausted: no free range fits.
        """
        self._check(size, alignment)
        with self._lock:
            candidate = _align_up(self._base, alignment)
            index = 0
            for index, alloc in enumerate(self._allocs):  # noqa: B007 (index used below)
                if candidate + size <= alloc.address:
                    break
                candidate = max(candidate, _align_up(alloc.end, alignment))
            else:
                index = len(self._allocs)
            if candidate + size > self._end:
                raise AddressExhausted(size, alignment, tag)
            self._insert(index, Allocation(candidate, size, tag))
            return candidate

    def allocate_at(self, address: int, size: int, tag: str = "") -> int:
        """Reserve exactly ``[address, address + size)`` (a fixed BAR, a legacy port range)."""
        self._check(size, 1)
        if address < self._base or address + size > self._end:
            raise AllocatorError(
                f"range {address:#x}+{size:#x} for {tag!r} is outside the window "
                f"{self._base:#x}-{self._end:#x}"
            )
        with self._lock:
            index = bisect.bisect_right(self._starts, address)
            if index > 0 and self._allocs[index - 1].end > address:
                other = self._allocs[index - 1]
                raise AllocatorError(
                    f"range {address:#x}+{size:#x} for {tag!r} overlaps {other.tag!r} "
                    f"at {other.address:#x}"
                )
            if index < len(self._allocs) and self._allocs[index].address < address + size:
                other = self._allocs[index]
                raise AllocatorError(
                    f"range {address:#x}+{size:#x} for {tag!r} overlaps {other.tag!r} "
                    f"at {other.address:#x}"
                )
            self._insert(index, Allocation(address, size, tag))
            return address

    def _insert(self, index: int, alloc: Allocation) -> None:
        self._starts.insert(index, alloc.address)
        self._allocs.insert(index, alloc)

    def release(self, address: int) -> Allocation:
        """Free the allocation that starts at ``address`` and return it."""
        with self._lock:
            index = bisect.bisect_left(self._starts, address)
            if index == len(self._starts) or self._starts[index] != address:
                raise AllocatorError(f"no allocation starts at {address:#x}")
            del self._starts[index]
            return self._allocs.pop(index)

    def find(self, address: int) -> Allocation | None:
        """The allocation containing ``address``, if any."""
        with self._lock:
            index = bisect.bisect_right(self._starts, address) - 1
            if index >= 0 and address < self._allocs[index].end:
                return self._allocs[index]
            return None

    def allocations(self) -> list[Allocation]:
        """All current allocations, sorted by address."""
        with self._lock:
            return list(self._allocs)
