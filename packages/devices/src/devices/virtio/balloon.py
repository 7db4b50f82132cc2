"""virtio-balloon (device type 5), the traditional memory balloon of virtio 1.2 section 5.5.

The host sets a target (``num_pages`` in the configuration, :meth:`Balloon.set_target_bytes`)
and raises a configuration-change interrupt; the guest driver gives pages to the balloon through
the inflate queue and takes them back through the deflate queue, then writes how many it holds
to ``actual``. Every inflated page is discarded on the host with ``MADV_REMOVE`` on the shared
guest memfd (:meth:`sys_util.GuestMemory.remove_range`), so the memory really goes back to the
host and the VMM's RSS falls; a page the guest deflates simply faults back in, zeroed, the next
time the guest touches it, so deflate has nothing to do on the host beyond validation.

With ``VIRTIO_BALLOON_F_STATS_VQ`` the guest posts one buffer of ``(u16 tag, u64 value)``
entries on the stats queue at start-up. The device keeps it until the host asks for statistics
(:meth:`Balloon.request_stats`), then gives it back, which is the driver's cue to post a fresh
one. PFNs and stats buffers are guest-controlled: a PFN outside guest RAM is logged
(rate-limited), counted in :attr:`Balloon.invalid_pfns` and skipped; nothing the guest sends
can raise out of the worker or touch host memory outside guest RAM.
"""

from __future__ import annotations

import enum
import mmap
import struct
import threading
from collections.abc import Callable, Sequence

from devices.virtio._constants import DeviceType
from devices.virtio._device import RING_FEATURES, ThreadedVirtioDevice
from devices.virtio._queue import DescriptorChain, Queue
from sys_util import AsRawFd, EventFd, GuestMemory
from sys_util.errors import Error as SysUtilError

__all__ = [
    "BALLOON_PAGE_SIZE",
    "VIRTIO_BALLOON_F_DEFLATE_ON_OOM",
    "VIRTIO_BALLOON_F_MUST_TELL_HOST",
    "VIRTIO_BALLOON_F_STATS_VQ",
    "Balloon",
    "BalloonStat",
]

#: The balloon's page unit: PFNs are guest physical addresses shifted right by 12, whatever
#: the guest's or the host's page size (VIRTIO_BALLOON_PFN_SHIFT).
BALLOON_PAGE_SIZE = 4096
_PFN_SHIFT = 12

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2

INFLATEQ = 0
DEFLATEQ = 1
STATSQ = 2
QUEUE_SIZE = 256
#: A stats buffer longer than this is read only this far (10 tags exist; 400 entries is plenty).
MAX_STATS_BYTES = 4000
#: PFNs taken from one inflate/deflate chain at most (Linux sends 256); a longer chain's tail is
#: ignored, so a hostile chain the size of guest RAM cannot make us copy all of it.
MAX_PFNS_PER_CHAIN = 65536

_U32_MAX = 0xFFFF_FFFF
_CONFIG = struct.Struct("<II")  # num_pages, actual
_STAT = struct.Struct("<HQ")  # packed: 10 bytes
_HOST_PAGE = mmap.PAGESIZE


class BalloonStat(enum.IntEnum):
    """Tags of the stats queue entries (virtio 1.2, 5.5.6.3); memory amounts are in bytes."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9


class Balloon(ThreadedVirtioDevice):
    """The host's side of a memory balloon.

    Thread model: the queues are served by the worker thread; :meth:`set_target_bytes` and
    :meth:`request_stats` are called from the VMM's control thread; configuration reads and
    writes come from vCPU threads. Shared state is plain integers (atomic under the GIL) or
    guarded by ``_stats_cond``.
    """

    def __init__(self, *, deflate_on_oom: bool = True) -> None:
        self._deflate_on_oom = deflate_on_oom
        self._num_pages = 0
        self._actual = 0
        #: Pages discarded on the host (inflate), pages handed back (deflate), PFNs refused.
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.invalid_pfns = 0
        self._stats_cond = threading.Condition()
        self._stats_held: DescriptorChain | None = None
        self._stats_latest: dict[int, int] | None = None
        # Tickets: request_stats takes ticket ``asked``; the worker, when it gives the held
        # buffer back for it, sets ``waiting``; the next buffer to arrive sets ``answered``.
        # So an answer is always a buffer the driver filled after the request was seen.
        self._stats_asked = 0
        self._stats_waiting = 0
        self._stats_answered = 0
        self._stats_request_evt: EventFd | None = None
        super().__init__()

    # -- identity and negotiation ------------------------------------------------------------

    def debug_label(self) -> str:
        return "virtio-balloon"

    @property
    def device_type(self) -> int:
        return DeviceType.BALLOON

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        # The stats queue exists only if STATS_VQ is negotiated; a driver that does not
        # negotiate it leaves queue 2 disabled, which the device tolerates.
        return [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]

    def features(self) -> int:
        bits = RING_FEATURES | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST | 1 << VIRTIO_BALLOON_F_STATS_VQ
        if self._deflate_on_oom:
            bits |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        return bits

    @property
    def stats_enabled(self) -> bool:
        """True once a driver negotiated the stats queue and it is running."""
        if not self.acked_features >> VIRTIO_BALLOON_F_STATS_VQ & 1:
            return False
        queues = self.queues
        return self.active and len(queues) > STATSQ and queues[STATSQ].active

    # -- configuration ------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        """The host's target: how many 4 KiB pages the guest should hold in the balloon."""
        return self._num_pages

    @property
    def actual(self) -> int:
        """How many pages the driver says the balloon holds (driver-written)."""
        return self._actual

    def config_space(self) -> bytes:
        return _CONFIG.pack(self._num_pages, self._actual)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only ``actual`` (bytes 4..7) is driver-writable; partial writes update their bytes.
        if offset < 4 or offset + len(data) > 8:
            self.log.warn("ignored %d-byte config write at %#x", len(data), offset)
            return
        raw = bytearray(self._actual.to_bytes(4, "little"))
        raw[offset - 4 : offset - 4 + len(data)] = data
        self._actual = int.from_bytes(raw, "little")

    def set_target_bytes(self, num_bytes: int) -> None:
        """Ask the guest to hold ``num_bytes`` (rounded down to 4 KiB pages) in the balloon.

        Updates ``num_pages`` and raises a configuration-change interrupt so the driver notices
        (a guest that is not running yet reads the target when its driver starts).
        """
        if num_bytes < 0:
            raise ValueError(f"balloon size {num_bytes} is negative")
        self._num_pages = min(num_bytes >> _PFN_SHIFT, _U32_MAX)
        interrupt = self.interrupt
        if interrupt is not None:
            interrupt.signal_config_changed()

    # -- activation ------------------------------------------------------------------------

    def on_activate(self) -> None:
        self._stats_request_evt = EventFd(nonblocking=True)

    def extra_poll_sources(self) -> list[tuple[int | AsRawFd, Callable[[], None]]]:
        evt = self._stats_request_evt
        return [] if evt is None else [(evt, self._on_stats_request)]

    def on_reset(self) -> None:
        with self._stats_cond:
            self._stats_held = None
            self._stats_latest = None
            # Wake a waiting request_stats; it then finds no stats.
            self._stats_waiting = self._stats_answered = self._stats_asked
            self._stats_cond.notify_all()
        evt, self._stats_request_evt = self._stats_request_evt, None
        if evt is not None:
            evt.close()
        # A reset driver starts with an empty balloon; the host's target stays.
        self._actual = 0

    # -- queues ----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Queue) -> None:
        if index == STATSQ:
            self._take_stats(queue)
            return
        interrupt = self.interrupt
        mem = self.mem
        assert interrupt is not None and mem is not None
        inflate = index == INFLATEQ
        while True:
            before = queue.next_used
            while (chain := queue.pop()) is not None:
                reader = chain.reader()
                n = min(reader.available_bytes(), 4 * MAX_PFNS_PER_CHAIN) & ~3
                if reader.available_bytes() > 4 * MAX_PFNS_PER_CHAIN:
                    self.log.warn("a %d-byte PFN list; only the first %d PFNs are used",
                                  reader.available_bytes(), MAX_PFNS_PER_CHAIN)  # fmt: skip
                if n:
                    data = reader.read_exact(n)
                    pfns = struct.unpack(f"<{n // 4}I", data)
                    if inflate:
                        self._inflate(mem, pfns)
                    else:
                        self._deflate(mem, pfns)
                queue.add_used(chain.head, 0)
            if queue.next_used != before:
                queue.trigger_interrupt(interrupt)
            if not queue.enable_notification():
                return

    def _inflate(self, mem: GuestMemory, pfns: Sequence[int]) -> None:
        """Discard the pages on the host, one ``remove_range`` per run of consecutive PFNs."""
        start = prev = -2
        for pfn in pfns:
            if pfn == prev + 1:
                prev = pfn
                continue
            if start >= 0:
                self._discard(mem, start, prev + 1 - start)
            start = prev = pfn
        if start >= 0:
            self._discard(mem, start, prev + 1 - start)

    def _discard(self, mem: GuestMemory, pfn: int, count: int) -> None:
        addr = pfn << _PFN_SHIFT
        length = count << _PFN_SHIFT
        if not mem.checked_range(addr, length):
            if count > 1:  # keep the valid pages of a run that leaves RAM
                for p in range(pfn, pfn + count):
                    self._discard(mem, p, 1)
                return
            self.invalid_pfns += 1
            self.log.warn("inflate: pfn %#x is outside guest RAM; skipped", pfn)
            return
        # Only whole host pages can be discarded (on x86 the host page is the balloon page).
        lo = -(-addr // _HOST_PAGE) * _HOST_PAGE
        hi = (addr + length) // _HOST_PAGE * _HOST_PAGE
        if hi > lo:
            try:
                mem.remove_range(lo, hi - lo)
            except (SysUtilError, OSError) as err:
                self.log.warn("inflate: discarding [%#x, +%#x) failed: %s", lo, hi - lo, err)
                return
        self.inflated_pages += count

    def _deflate(self, mem: GuestMemory, pfns: Sequence[int]) -> None:
        # Nothing to do on the host: the pages fault back in (zeroed) when the guest uses them.
        for pfn in pfns:
            if mem.checked_range(pfn << _PFN_SHIFT, BALLOON_PAGE_SIZE):
                self.deflated_pages += 1
            else:
                self.invalid_pfns += 1
                self.log.warn("deflate: pfn %#x is outside guest RAM; skipped", pfn)

    # -- statistics ----------------------------------------------------------------------------

    def _take_stats(self, queue: Queue) -> None:
        """A new stats buffer: parse it, hold it until the host asks again, wake the asker."""
        interrupt = self.interrupt
        assert interrupt is not None
        while True:
            while (chain := queue.pop()) is not None:
                reader = chain.reader()
                n = min(reader.available_bytes(), MAX_STATS_BYTES)
                n -= n % _STAT.size
                stats: dict[int, int] = {}
                for tag, value in _STAT.iter_unpack(reader.read_exact(n)):
                    stats[tag] = value
                with self._stats_cond:
                    old, self._stats_held = self._stats_held, chain
                    self._stats_latest = stats
                    if self._stats_waiting > self._stats_answered:
                        self._stats_answered = self._stats_waiting
                        self._stats_cond.notify_all()
                if old is not None:  # a driver that posts twice gets the older buffer back
                    queue.add_used(old.head, 0)
                    queue.trigger_interrupt(interrupt)
            if not queue.enable_notification():
                return

    def _on_stats_request(self) -> None:
        """(worker) Give the held buffer back: the driver refills it with fresh statistics."""
        evt = self._stats_request_evt
        if evt is not None:
            try:
                evt.read()
            except BlockingIOError:
                pass
        if len(self.queues) <= STATSQ:
            return
        queue = self.queues[STATSQ]
        with self._stats_cond:
            held, self._stats_held = self._stats_held, None
            self._stats_waiting = self._stats_asked
        if held is not None and queue.active:
            queue.add_used(held.head, 0)
            interrupt = self.interrupt
            assert interrupt is not None
            queue.trigger_interrupt(interrupt)

    def request_stats(self, timeout: float) -> dict[int, int] | None:
        """Fresh guest statistics ``{tag: value}`` (:class:`BalloonStat` tags), or None.

        Returns None if the stats queue is not in use or the guest posted no new buffer within
        ``timeout`` seconds; never blocks longer than that.
        """
        evt = self._stats_request_evt
        if not self.stats_enabled or evt is None:
            return None
        with self._stats_cond:
            self._stats_asked += 1
            ticket = self._stats_asked
            try:
                evt.write(1)
            except OSError:  # reset meanwhile
                return None
            if not self._stats_cond.wait_for(lambda: self._stats_answered >= ticket, timeout):
                return None
            latest = self._stats_latest
        return None if latest is None else dict(latest)
