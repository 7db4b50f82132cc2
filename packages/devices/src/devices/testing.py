"""Test helpers shipped with the package (STYLE.md #18): a mock virtqueue *driver*, a fake
:class:`~devices.irq.IrqRouter`, and guest-memory construction.

``VirtQueueDriver`` plays the guest: it lays out a descriptor table, available ring and used ring
in a :class:`sys_util.GuestMemory`, writes request buffers, publishes chains (direct or indirect,
or raw hostile descriptors), kicks, and reads back used entries. Devices under test see exactly
what a Linux driver would produce. No pytest import here.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from devices.irq import FileDescriptorLike
from devices.virtio._queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
)
from sys_util import EventFd, GuestMemory

__all__ = [
    "FakeIrqRouter",
    "SubmittedChain",
    "VirtQueueDriver",
    "make_guest_memory",
]

_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<II")
PAGE = 4096


def make_guest_memory(size: int = 16 << 20, base: int = 0) -> GuestMemory:
    """One RAM region of ``size`` bytes at ``base`` (both page aligned)."""
    return GuestMemory([(base, size)])


@dataclass
class SubmittedChain:
    """What :meth:`VirtQueueDriver.add_request` put in the ring, for checking the result."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    descriptors: list[int] = field(default_factory=list)


class VirtQueueDriver:
    """The driver side of one split virtqueue.

    Layout from ``base``: descriptor table, available ring (with used_event), used ring (with
    avail_event, 4-byte aligned); request buffers come from a bump allocator over
    ``[data_base, data_base + data_size)`` that wraps around (old buffers are then reused, so
    check a request's results before submitting ``data_size`` more bytes).
    """

    def __init__(
        self,
        mem: GuestMemory,
        base: int,
        size: int = 256,
        *,
        data_base: int | None = None,
        data_size: int = 1 << 20,
    ) -> None:
        self.mem = mem
        self.size = size
        self.desc_table = base
        self.avail_ring = base + 16 * size
        self.used_ring = (self.avail_ring + 6 + 2 * size + 3) & ~3
        ring_end = self.used_ring + 6 + 8 * size
        if data_base is None:
            data_base = (ring_end + PAGE - 1) & ~(PAGE - 1)
        self.data_base = data_base
        self.data_size = data_size
        self._data_next = data_base
        self._free = list(range(size))
        self._chains: dict[int, SubmittedChain] = {}
        self.avail_idx = 0
        self.last_used = 0
        # Zero the rings, as a driver allocating them would.
        mem.write(base, bytes(ring_end - base))

    # -- queue configuration (what the driver writes through common config) -----------------

    def configure(self, queue: Queue) -> Queue:
        """Point ``queue`` at this driver's rings and mark it ready."""
        queue.size = self.size
        queue.desc_table = self.desc_table
        queue.avail_ring = self.avail_ring
        queue.used_ring = self.used_ring
        queue.ready = True
        return queue

    def make_queue(self, max_size: int | None = None, *, features: int = 0) -> Queue:
        """A :class:`Queue` configured for this driver and activated with ``features``."""
        q = self.configure(Queue(max_size or self.size))
        q.activate(self.mem, features)
        return q

    # -- buffers -----------------------------------------------------------------------------

    def alloc(self, length: int, align: int = 16) -> int:
        """Guest address of ``length`` bytes of scratch buffer space."""
        if length > self.data_size:
            raise ValueError("buffer larger than the driver's data area")
        addr = (self._data_next + align - 1) & ~(align - 1)
        if addr + length > self.data_base + self.data_size:
            addr = self.data_base
        self._data_next = addr + length
        return addr

    def _take_descriptor(self) -> int:
        if not self._free:
            self.reclaim()
        if not self._free:
            raise RuntimeError("no free descriptors: the device has not used enough chains")
        return self._free.pop(0)

    def write_descriptor(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Raw descriptor write into the main table (hostile tests use this directly)."""
        self.mem.write_struct(self.desc_table + 16 * index, _DESC, addr, length, flags, next_)

    def add_request(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
        align: int = 16,
    ) -> SubmittedChain:
        """Submit a chain of device-readable buffers (with contents) then writable ones, each
        buffer at a multiple of ``align`` (4096 puts them on pages, as a kernel driver does)."""
        segs: list[tuple[int, int, int]] = []
        for data in readable:
            addr = self.alloc(len(data), align)
            self.mem.write(addr, data)
            segs.append((addr, len(data), 0))
        for length in writable:
            addr = self.alloc(length, align)
            self.mem.write(addr, bytes(length))
            segs.append((addr, length, VIRTQ_DESC_F_WRITE))
        chain = SubmittedChain(
            head=-1,
            readable=[(a, n) for a, n, f in segs if not f],
            writable=[(a, n) for a, n, f in segs if f],
        )
        if indirect:
            table = self.alloc(16 * len(segs))
            for i, (addr, length, flags) in enumerate(segs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(segs) else 0
                self.mem.write_struct(table + 16 * i, _DESC, addr, length, flags | more, i + 1)
            head = self._take_descriptor()
            self.write_descriptor(head, table, 16 * len(segs), VIRTQ_DESC_F_INDIRECT, 0)
            chain.descriptors = [head]
        else:
            idxs = [self._take_descriptor() for _ in segs]
            for i, (addr, length, flags) in enumerate(segs):
                last = i + 1 == len(segs)
                self.write_descriptor(
                    idxs[i], addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                    0 if last else idxs[i + 1],
                )  # fmt: skip
            chain.descriptors = idxs
        chain.head = chain.descriptors[0]
        self._chains[chain.head] = chain
        if publish:
            self.publish(chain.head)
        return chain

    def publish(self, head: int) -> None:
        """Put ``head`` in the next available-ring slot and advance avail idx."""
        slot = self.avail_idx % self.size
        self.mem.write_u16(self.avail_ring + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail_ring + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Force avail idx (hostile tests: jump the index past the ring size)."""
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_ring + 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_ring + 4 + 2 * self.size, value & 0xFFFF)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_ring, flags)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_ring + 4 + 8 * self.size)

    # -- completion ----------------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_ring + 2)

    def pop_used(self) -> list[tuple[int, int]]:
        """New ``(id, len)`` used entries since the last call."""
        out: list[tuple[int, int]] = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            out.append(self.mem.read_struct(self.used_ring + 4 + 8 * slot, _USED))
            self.last_used = (self.last_used + 1) & 0xFFFF
        for head, _ in out:
            chain = self._chains.pop(head, None)
            if chain is not None:
                self._free.extend(chain.descriptors)
        return out

    def reclaim(self) -> None:
        self.pop_used()

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Wait until ``count`` new used entries appeared; return them (TimeoutError if not)."""
        deadline = time.monotonic() + timeout
        while ((self.used_idx() - self.last_used) & 0xFFFF) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"device used {(self.used_idx() - self.last_used) & 0xFFFF} of {count}"
                )
            time.sleep(0.0005)
        return self.pop_used()

    def read_writable(self, chain: SubmittedChain) -> bytes:
        """Everything in the chain's writable buffers, concatenated."""
        return b"".join(self.mem.read(a, n) for a, n in chain.writable)

    def kick(self, evt: EventFd) -> None:
        """Notify the device (what the ioeventfd would do on the guest's notify write)."""
        evt.write(1)


class FakeIrqRouter:
    """Records what a device asks of the :class:`~devices.irq.IrqRouter` (thread-safe)."""

    def __init__(self, first_gsi: int = 24) -> None:
        self._lock = threading.Lock()
        self._next = first_gsi
        self.routes: dict[int, tuple[int, int]] = {}
        self.irqfds: dict[int, FileDescriptorLike] = {}
        self.released: list[int] = []
        self.calls: list[tuple[object, ...]] = []

    def allocate_gsi(self) -> int:
        with self._lock:
            gsi = self._next
            self._next += 1
            self.calls.append(("allocate_gsi", gsi))
            return gsi

    def release_gsi(self, gsi: int) -> None:
        with self._lock:
            self.routes.pop(gsi, None)
            self.released.append(gsi)
            self.calls.append(("release_gsi", gsi))

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            self.routes[gsi] = (address, data)
            self.calls.append(("set_msi_route", gsi, address, data))

    def register_irqfd(
        self, evt: FileDescriptorLike, gsi: int, resample_evt: FileDescriptorLike | None = None
    ) -> None:
        with self._lock:
            self.irqfds[gsi] = evt
            self.calls.append(("register_irqfd", gsi))

    def unregister_irqfd(self, evt: FileDescriptorLike, gsi: int) -> None:
        with self._lock:
            self.irqfds.pop(gsi, None)
            self.calls.append(("unregister_irqfd", gsi))
