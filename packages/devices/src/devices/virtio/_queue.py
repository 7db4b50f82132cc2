"""Split virtqueues (virtio 1.2 section 2.7) and descriptor chains.

Everything the guest wrote is untrusted: the rings' addresses are checked once when the queue is
activated (the rings are then accessed through cached zero-copy memoryviews of guest RAM), and
every descriptor chain is walked and fully validated before a device sees it. A chain that breaks
a rule raises :class:`~devices.virtio.InvalidChain` for that request alone; :meth:`Queue.pop`
turns that into "used with length 0", logs (rate-limited) and moves on to the next request.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from devices.virtio._constants import VIRTIO_MSI_NO_VECTOR, Features
from devices.virtio._errors import InvalidChain, InvalidQueue
from devices.virtio._log import RateLimitedLog
from devices.virtio._reader_writer import Reader, Writer

if TYPE_CHECKING:
    from devices.virtio._interrupt import Interrupt
    from sys_util import GuestMemory

__all__ = [
    "MAX_INDIRECT_DESCRIPTORS",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "DescriptorChain",
    "Queue",
    "RamMap",
    "vring_need_event",
]

logger = logging.getLogger(__name__)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
#: An indirect table longer than this is refused (a guest could otherwise make us walk 2^28).
MAX_INDIRECT_DESCRIPTORS = 10_000
#: Largest total byte count of one chain (virtio lengths are 32-bit).
MAX_CHAIN_BYTES = 0xFFFF_FFFF

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class RamMap:
    """Guest RAM as ``(base, end, view)`` per region, for fast checks and zero-copy slices.

    Built once per activation so the per-descriptor hot path is a couple of integer compares
    and a memoryview slice instead of a GuestMemory method call.
    """

    __slots__ = ("_base0", "_end0", "_regions", "_view0")

    def __init__(self, mem: GuestMemory) -> None:
        regions = sorted((r.guest_base, r.guest_base + r.size) for r in mem.regions)
        self._regions = [(b, e, mem.view(b, e - b)) for b, e in regions]
        self._base0, self._end0, self._view0 = self._regions[0]

    def contains(self, addr: int, length: int) -> bool:
        """True if ``[addr, addr+length)`` lies in guest RAM (adjacent regions allowed)."""
        if self._base0 <= addr and addr + length <= self._end0:
            return True
        end = addr + length
        cur = addr
        for base, rend, _ in self._regions:
            if base <= cur < rend:
                if end <= rend:
                    return True
                cur = rend
        return False

    def views(self, addr: int, length: int) -> list[memoryview]:
        """Zero-copy views of ``[addr, addr+length)`` (call only after :meth:`contains`)."""
        base0 = self._base0
        if base0 <= addr and addr + length <= self._end0:
            off = addr - base0
            return [self._view0[off : off + length]]
        out: list[memoryview] = []
        cur, left = addr, length
        for base, rend, view in self._regions:
            if left and base <= cur < rend:
                take = min(left, rend - cur)
                out.append(view[cur - base : cur - base + take])
                cur += take
                left -= take
        if left:
            raise InvalidChain(None, f"range [{addr:#x}, +{length:#x}) outside guest RAM")
        return out


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` crosses ``event_idx``.

    All three are u16 ring indexes; the comparison is done modulo 2^16 so it stays right across
    wraparound (the formula of the spec's section 2.7.10 / Linux ``vring_need_event``).
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class DescriptorChain:
    """A validated chain: readable segments first, then writable ones, as ``(addr, len)``.

    ``reader()``/``writer()`` give zero-copy access to the two directions.
    """

    __slots__ = ("head", "ram", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        ram: RamMap,
        head: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        readable_len: int | None = None,
        writable_len: int | None = None,
    ) -> None:
        self.ram = ram
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = sum(n for _, n in readable) if readable_len is None else readable_len
        self.writable_len = sum(n for _, n in writable) if writable_len is None else writable_len

    def reader(self) -> Reader:
        return Reader(self.ram, self.readable, self.readable_len)

    def writer(self) -> Writer:
        return Writer(self.ram, self.writable, self.writable_len)

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"
        )


class Queue:
    """One split virtqueue: its driver-programmed configuration and the device's ring state.

    The transport writes ``size``, ``ready``, ``vector`` and the three ring addresses; the device
    (from its worker thread) calls :meth:`pop`, :meth:`add_used` and :meth:`trigger_interrupt`.
    """

    def __init__(self, max_size: int) -> None:
        if max_size <= 0 or max_size > 32768 or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two <= 32768")
        self.max_size = max_size
        self.log: RateLimitedLog = RateLimitedLog(logger, "virtqueue")
        #: Called (from the worker) once when the driver breaks the ring protocol; the transport
        #: sets DEVICE_NEEDS_RESET. Must not take locks a device reset holds.
        self.on_broken: Callable[[str], None] | None = None
        self._fence_lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset."""
        self.size = self.max_size
        self.ready = False
        self.vector = VIRTIO_MSI_NO_VECTOR
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.indirect = False
        self.invalid_chains = 0
        self.broken = False
        self._signalled_used: int | None = None
        #: avail_event already asks for a kick at next_avail (EVENT_IDX): pop() found the ring
        #: empty and armed it; popping anything clears this.
        self._armed = False
        self._mem: GuestMemory | None = None
        self._ram: RamMap | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._used_idx: memoryview | None = None  # used->idx as one u16 (see activate)
        self._avail_event: memoryview | None = None

    # -- activation ------------------------------------------------------------------------

    def validate(self, mem: GuestMemory) -> None:
        """Raise :class:`InvalidQueue` unless the configured rings are usable."""
        size = self.size
        if not self.ready:
            raise InvalidQueue("not enabled")
        if size <= 0 or size > self.max_size or size & (size - 1):
            raise InvalidQueue(f"size {size} (max {self.max_size}) is not a power of two")
        checks = (
            ("descriptor table", self.desc_table, 16 * size, 16),
            ("available ring", self.avail_ring, 6 + 2 * size, 2),
            ("used ring", self.used_ring, 6 + 8 * size, 4),
        )
        for name, addr, length, align in checks:
            if addr % align:
                raise InvalidQueue(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not mem.checked_range(addr, length):
                raise InvalidQueue(f"{name} [{addr:#x}, +{length:#x}) is outside guest RAM")

    def activate(self, mem: GuestMemory, features: int) -> None:
        """Validate and map the rings; ``features`` are the negotiated device features."""
        self.validate(mem)
        try:
            self._desc = mem.view(self.desc_table, 16 * self.size)
            self._avail = mem.view(self.avail_ring, 6 + 2 * self.size)
            self._used = mem.view(self.used_ring, 6 + 8 * self.size)
            # Single-store views of the two u16 fields the driver polls. struct.pack_into must
            # not be used for them: CPython zeroes the destination before writing the value, so
            # a guest polling from another CPU could read a transient 0 ("used index jumped").
            self._used_idx = self._used[2:4].cast("H")
            self._avail_event = self._used[4 + 8 * self.size : 6 + 8 * self.size].cast("H")
        except Exception as err:  # a ring straddling two memory regions
            raise InvalidQueue(f"ring not contiguous in one memory region: {err}") from err
        self._mem = mem
        self._ram = RamMap(mem)
        self.event_idx = bool(features >> Features.RING_EVENT_IDX & 1)
        self.indirect = bool(features >> Features.RING_INDIRECT_DESC & 1)
        self.next_avail = 0
        self.next_used = 0
        self._signalled_used = None
        self._armed = False

    @property
    def active(self) -> bool:
        return self._mem is not None

    # -- ring access -----------------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        idx: int = _U16.unpack_from(self._avail, 2)[0]
        return idx

    def used_idx(self) -> int:
        assert self._used is not None
        idx: int = _U16.unpack_from(self._used, 2)[0]
        return idx

    def used_event(self) -> int:
        """The driver's "interrupt me when used idx passes this" (EVENT_IDX)."""
        assert self._avail is not None
        value: int = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
        return value

    def set_avail_event(self, value: int) -> None:
        """Tell the driver to kick only once avail idx passes ``value`` (EVENT_IDX)."""
        assert self._avail_event is not None
        self._avail_event[0] = value & 0xFFFF

    def full_fence(self) -> None:
        """A full memory barrier (store->load ordering) between us and the guest's vCPUs.

        x86 may reorder our store of used idx / avail_event with a later load of
        used_event / avail idx; an uncontended lock acquire is a LOCK-prefixed instruction,
        which orders both.
        """
        self._fence_lock.acquire()
        self._fence_lock.release()

    def pending(self) -> int:
        """How many chains the driver has made available that we have not popped."""
        if self._avail is None or self.broken:
            return 0
        return (self.avail_idx() - self.next_avail) & 0xFFFF

    def pop(self) -> DescriptorChain | None:
        """The next valid available chain, or ``None`` when the ring is empty.

        Invalid chains are completed here (used, length 0), counted and logged; the loop then
        continues with the next entry, so one bad request never stalls the queue.
        """
        while True:
            avail = self._avail
            if avail is None or self._mem is None or self.broken:
                return None
            pending = (self.avail_idx() - self.next_avail) & 0xFFFF
            if pending == 0:
                if not self.event_idx or self._armed:
                    return None
                # Empty: ask for a kick at the next entry. Only here, not on every pop, so a
                # driver adding chains while we are busy with a batch does not kick (one VM
                # exit each) for entries we are about to find anyway. The fence orders our
                # avail_event store before the re-read: an entry added in between is seen
                # here or kicks (virtio 1.2, 2.7.10).
                self.set_avail_event(self.next_avail)
                self._armed = True
                self.full_fence()
                if self.avail_idx() == self.next_avail:
                    return None
                continue
            if pending > self.size:
                # No valid driver does this and no entry can be trusted any more: the queue is
                # dead until the driver resets the device (virtio 1.2, 2.1.2 DEVICE_NEEDS_RESET).
                self._break(
                    f"available index moved by {pending} entries on a {self.size}-entry queue"
                )
                return None
            slot = self.next_avail % self.size
            head: int = _U16.unpack_from(avail, 4 + 2 * slot)[0]
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            self._armed = False
            try:
                return self._parse_chain(head)
            except InvalidChain as err:
                self.invalid_chains += 1
                self.log.warn("%s", err)
                if err.head is not None:
                    self.add_used(err.head, 0)

    def _break(self, reason: str) -> None:
        self.broken = True
        self.log.warn("%s; queue stopped until the device is reset", reason)
        if self.on_broken is not None:
            self.on_broken(reason)

    def _parse_chain(self, head: int) -> DescriptorChain:
        mem = self._mem
        ram = self._ram
        table = self._desc
        assert mem is not None and ram is not None and table is not None
        table_size = self.size
        if head >= table_size:
            raise InvalidChain(None, f"head index {head} >= queue size {table_size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        rlen = 0
        idx = head
        count = 0
        in_indirect = False
        unpack = _DESC.unpack_from
        checked_range = ram.contains
        while True:
            addr, length, flags, nxt = unpack(table, idx * 16)
            count += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise InvalidChain(head, "indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise InvalidChain(head, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise InvalidChain(head, "indirect descriptor with the NEXT flag")
                if length == 0 or length % 16:
                    raise InvalidChain(head, f"indirect table length {length} not a multiple of 16")
                if length // 16 > MAX_INDIRECT_DESCRIPTORS:
                    raise InvalidChain(head, f"indirect table of {length // 16} descriptors")
                if not checked_range(addr, length):
                    raise InvalidChain(
                        head, f"indirect table [{addr:#x}, +{length:#x}) outside RAM"
                    )
                views = ram.views(addr, length)
                if len(views) != 1:
                    raise InvalidChain(head, "indirect table spans two memory regions")
                table = views[0]
                table_size = length // 16
                idx = 0
                count = 0
                in_indirect = True
                continue
            if length:
                if not checked_range(addr, length):
                    raise InvalidChain(head, f"buffer [{addr:#x}, +{length:#x}) outside guest RAM")
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise InvalidChain(head, "total length overflows 32 bits")
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append((addr, length))
                elif writable:
                    raise InvalidChain(head, "device-readable descriptor after a writable one")
                else:
                    readable.append((addr, length))
                    rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(ram, head, readable, writable, rlen, total - rlen)
            if nxt >= table_size:
                raise InvalidChain(head, f"next index {nxt} >= table size {table_size}")
            if count >= table_size:
                raise InvalidChain(head, "chain longer than its table (a loop?)")
            idx = nxt

    def add_used(self, head: int, length: int) -> None:
        """Publish ``head`` as used with ``length`` bytes written into its writable buffers."""
        used = self._used
        used_idx = self._used_idx
        if used is None or used_idx is None:
            return
        slot = self.next_used % self.size
        # pack_into zeroes then fills the element: harmless, the driver only reads it after the
        # index moves. The element must be visible before the index (x86 keeps store order).
        _USED_ELEM.pack_into(used, 4 + 8 * slot, head, length & 0xFFFF_FFFF)
        self.next_used = (self.next_used + 1) & 0xFFFF
        used_idx[0] = self.next_used  # one 16-bit store: never a torn or transient index

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the entries used since the last one."""
        if self._avail is None:
            return False
        new = self.next_used
        self.full_fence()  # our used idx store must be visible before we read the driver's state
        if self.event_idx:
            old = self._signalled_used
            self._signalled_used = new
            if old is None:
                return True
            return vring_need_event(self.used_event(), new, old)
        flags: int = _U16.unpack_from(self._avail, 0)[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def trigger_interrupt(self, interrupt: Interrupt) -> bool:
        """Signal the driver if it asked for it (EVENT_IDX / NO_INTERRUPT honoured)."""
        if self.needs_interrupt():
            interrupt.signal_used_queue(self.vector)
            return True
        return False

    def enable_notification(self) -> bool:
        """Re-arm driver kicks; return True if new chains arrived meanwhile (process them)."""
        if self._avail is None:
            return False
        if self.event_idx:
            self.set_avail_event(self.next_avail)
        self.full_fence()
        return self.pending() != 0
