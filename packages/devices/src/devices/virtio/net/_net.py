"""virtio-net (device type 1, virtio 1.2 section 5.1) backed by a TAP interface.

Queue 0 is the receiveq (host -> guest), queue 1 the transmitq; there is no control queue and
one queue pair. Every frame on both queues is preceded by a ``virtio_net_hdr``; the tap is
opened with ``IFF_VNET_HDR`` and the same header size, so headers (checksum and segmentation
offload requests) pass through untouched and the kernel, not Python, validates them.

Transmit: each chain is one frame; its readable part (header + frame) is handed to the tap
with one ``write``/``writev`` of zero-copy views of guest RAM. Receive: a frame is ``readv``'d
straight into the guest's receive buffer; a 64 KiB host buffer catches what does not fit.

Both directions work in batches: every frame the tap or the ring has at a wake-up (up to
``RX_BATCH``/``TX_BATCH``), one used-index store and one interrupt check per batch. Chains of
the common shape (one descriptor in RAM region 0) are read straight off the rings
(:class:`sys_util.FrameRing`, in C), without building a DescriptorChain; every
other chain goes through ``Queue.pop``, which validates it fully. Without
mergeable buffers such a frame is dropped (the guest's buffer is kept for the next one); with
``VIRTIO_NET_F_MRG_RXBUF`` the rest is copied into further buffers and ``num_buffers`` is set.
While the guest has no receive buffer the tap is taken out of the poll set, so the kernel's
tap queue (not our memory) absorbs the backlog; a receiveq kick puts it back.

Hostile chains (too short for a header, too many segments, frames the kernel refuses) fail
that frame only and are counted in :class:`NetStats`.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from devices.virtio._constants import DeviceType
from devices.virtio._device import RING_FEATURES, ThreadedVirtioDevice
from devices.virtio._queue import DescriptorChain, Queue
from devices.virtio.net._features import (
    VIRTIO_NET_S_LINK_UP,
    NetFeatures,
    config_space,
    drop_unmet_dependencies,
    header_len,
    tap_offloads,
)
from devices.virtio.net._ring import frame_ring, region0
from devices.virtio.net._tap import Tap
from sys_util import AsRawFd, FrameRing

__all__ = [
    "MAX_FRAME_BYTES",
    "QUEUE_SIZE",
    "RXQ",
    "TXQ",
    "VIRTIO_NET_S_LINK_UP",
    "Net",
    "NetFeatures",
    "NetStats",
    "parse_mac",
]

QUEUE_SIZE = 256
RXQ = 0
TXQ = 1
#: Largest frame a tap hands over (a 64 KiB GSO super-frame plus Ethernet/VLAN headers).
MAX_FRAME_BYTES = 65550
#: Frames moved per poll wake-up before the worker looks at other sources again.
RX_BATCH = 64
#: Transmitted frames completed per used-ring publish (and interrupt check).
TX_BATCH = 64
#: More segments than this in one chain is refused (the kernel's UIO_MAXIOV is 1024, and one
#: slot is the overflow buffer).
MAX_SEGMENTS = 1000

_U16 = struct.Struct("<H")


_OFFERED = (
    1 << NetFeatures.CSUM
    | 1 << NetFeatures.GUEST_CSUM
    | 1 << NetFeatures.GUEST_TSO4
    | 1 << NetFeatures.GUEST_TSO6
    | 1 << NetFeatures.GUEST_ECN
    | 1 << NetFeatures.HOST_TSO4
    | 1 << NetFeatures.HOST_TSO6
    | 1 << NetFeatures.HOST_ECN
    | 1 << NetFeatures.MRG_RXBUF
    | 1 << NetFeatures.STATUS
)


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes (ValueError for anything else)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    return bytes(int(p, 16) for p in parts)


@dataclass
class NetStats:
    """Counters kept by the worker (read them from any thread; they only grow)."""

    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    rx_bad_chains: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    tx_bad_chains: int = 0


@dataclass
class _Merge:
    """A received frame larger than its first buffer, waiting for more buffers (MRG_RXBUF)."""

    header: list[memoryview]
    length: int
    offset: int
    used: list[tuple[int, int]]
    discard: list[int] = field(default_factory=list)


def _put(iovecs: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the byte stream ``iovecs`` describe."""
    first = iovecs[0]
    if offset + len(data) <= len(first):
        first[offset : offset + len(data)] = data
        return
    for view in iovecs:
        n = len(view)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, len(data))
        view[offset : offset + take] = data[:take]
        data = data[take:]
        offset = 0
        if not data:
            return


class Net(ThreadedVirtioDevice):
    """A virtio NIC whose wire is ``tap`` (owned: :meth:`close` closes it).

    ``mac`` (6 bytes) is offered in the configuration space (VIRTIO_NET_F_MAC); without it the
    guest picks its own address.
    """

    def __init__(self, tap: Tap, *, mac: bytes | None = None) -> None:
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            raise ValueError(f"MAC {mac.hex(':')} is not a 6-byte unicast address")
        self.tap = tap
        self.mac = mac
        self.stats = NetStats()
        self._hdr_len = 12
        self._mrg = False
        self._guest_csum = False
        self._tap_polled = False
        self._rx_held: DescriptorChain | None = None
        self._rx_pending: _Merge | None = None
        self._rx_slow = False
        self._tx_ring: FrameRing | None = None
        self._rx_ring: FrameRing | None = None
        self._rx_ram = memoryview(b"")
        self._stage = bytearray(MAX_FRAME_BYTES + 16)
        self._stage_view = memoryview(self._stage)
        super().__init__()

    def debug_label(self) -> str:
        return f"virtio-net({self.tap.name})"

    @property
    def device_type(self) -> int:
        return DeviceType.NET

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return [QUEUE_SIZE, QUEUE_SIZE]

    def features(self) -> int:
        mac = 1 << NetFeatures.MAC if self.mac is not None else 0
        return RING_FEATURES | _OFFERED | mac

    def ack_features(self, value: int) -> None:
        self.acked_features = drop_unmet_dependencies(value & self.features(), self.log)

    def config_space(self) -> bytes:
        return config_space(self.mac)

    def keep_fds(self) -> list[int]:
        return [self.tap.fileno()]

    @property
    def header_len(self) -> int:
        """Bytes of ``virtio_net_hdr`` before each frame (12 with VERSION_1 or MRG_RXBUF)."""
        return self._hdr_len

    def tap_offloads(self) -> int:
        """The ``TUN_F_*`` flags matching the guest's acked receive offloads."""
        return tap_offloads(self.acked_features)

    # -- lifecycle -----------------------------------------------------------------------------

    def on_activate(self) -> None:
        acked = self.acked_features
        self._mrg = bool(acked >> NetFeatures.MRG_RXBUF & 1)
        self._guest_csum = bool(acked >> NetFeatures.GUEST_CSUM & 1)
        self._hdr_len = header_len(acked)
        self.tap.set_vnet_hdr_size(self._hdr_len)
        self.tap.set_offload(self.tap_offloads())
        self._tap_polled = False
        self._rx_held = None
        self._rx_pending = None
        self._rx_slow = False
        assert self.mem is not None
        self._rx_ram = region0(self.mem)
        if len(self.queues) > RXQ:
            self._rx_ring = frame_ring(self.queues[RXQ], self.mem, self._rx_ram)
            self._rx_ring.set_stage(self._stage)
        if len(self.queues) > TXQ:
            self._tx_ring = frame_ring(self.queues[TXQ], self.mem, self._rx_ram)

    def on_reset(self) -> None:
        self._tap_polled = False
        self._rx_held = None
        self._rx_pending = None
        self._rx_slow = False
        for ring in (self._rx_ring, self._tx_ring):
            if ring is not None:
                ring.close()  # unpin guest memory
        self._rx_ring = self._tx_ring = None
        self._rx_ram = memoryview(b"")

    def close(self) -> None:
        super().close()
        self.tap.close()

    def extra_poll_sources(self) -> list[tuple[int | AsRawFd, Callable[[], None]]]:
        self._tap_polled = True
        return [(self.tap, self._rx)]

    def _set_tap_polling(self, on: bool) -> None:
        poll = self._poll
        if poll is None or on == self._tap_polled:
            return
        if on:
            poll.add(self.tap, 1000)
        else:
            poll.delete(self.tap)
        self._tap_polled = on

    def process_queue(self, index: int, queue: Queue) -> None:
        if index == TXQ:
            self._tx(queue)
        elif index == RXQ:
            # New receive buffers: finish a waiting frame and watch the tap again.
            self._set_tap_polling(True)
            self._rx()

    # -- transmit ------------------------------------------------------------------------------

    def _tx(self, queue: Queue) -> None:
        interrupt = self.interrupt
        assert interrupt is not None
        while True:
            if self._tx_batch(queue):
                queue.trigger_interrupt(interrupt)  # once per batch (EVENT_IDX honoured)
                continue
            if not queue.enable_notification():
                return

    def _tx_batch(self, queue: Queue) -> int:
        """Send up to TX_BATCH available frames; publish their used entries at once.

        Returns how many chains were completed (0: the ring is empty). While this runs the
        driver's avail_event is left behind (only ``enable_notification`` moves it), so a
        driver with EVENT_IDX does not kick a device that is already busy.
        """
        ring = self._tx_ring
        if ring is None or queue.broken:
            return 0
        hdr = self._hdr_len
        b = ring.tx(self.tap.fileno(), queue.next_avail, queue.next_used, TX_BATCH, hdr,
                    hdr + MAX_FRAME_BYTES)  # fmt: skip
        done = (b.next_avail - queue.next_avail) & 0xFFFF
        stats = self.stats
        if done:
            stats.tx_frames += b.frames  # counters first: a test may read them once it sees used
            stats.tx_bytes += b.nbytes - b.frames * hdr
            queue.next_avail = b.next_avail
            queue.next_used = b.next_used
            if b.errors:  # the kernel refused the header or frame
                stats.tx_errors += b.errors
                self.log.warn("%d tx frames dropped: %s", b.errors, os.strerror(b.last_errno))
        if b.status == FrameRing.SLOW or (
            not done and (queue.avail_idx() - queue.next_avail) & 0xFFFF > queue.size
        ):
            chain = queue.pop()  # validates it fully (and reports a driver's index bug)
            if chain is not None:
                self._tx_chain(chain, queue)
                done += 1
        return done

    def _tx_chain(self, chain: DescriptorChain, queue: Queue) -> None:
        """Any other valid chain: its readable segments, in as many descriptors as it has."""
        stats = self.stats
        hdr = self._hdr_len
        n = chain.readable_len
        if n < hdr or n > hdr + MAX_FRAME_BYTES or len(chain.readable) > MAX_SEGMENTS:
            stats.tx_bad_chains += 1
            self.log.warn("tx chain %d: %d bytes in %d segments refused", chain.head, n,
                          len(chain.readable))  # fmt: skip
        else:
            views = chain.ram.views
            iovecs: list[memoryview] = []
            for addr, length in chain.readable:
                iovecs += views(addr, length)
            try:
                os.writev(self.tap.fileno(), iovecs)
            except OSError as err:  # the kernel refused the header or frame
                stats.tx_errors += 1
                self.log.warn("tx frame of %d bytes dropped: %s", n - hdr, err)
            else:
                stats.tx_frames += 1
                stats.tx_bytes += n - hdr
        queue.add_used(chain.head, 0)

    # -- receive -------------------------------------------------------------------------------

    def _rx(self) -> None:
        """Move frames from the tap into receive buffers until either runs out (or a batch)."""
        if not self.queues:
            return
        queue = self.queues[RXQ]
        interrupt = self.interrupt
        assert interrupt is not None
        before = queue.next_used
        try:
            self._rx_frames(queue)
        finally:
            if queue.next_used != before:
                queue.trigger_interrupt(interrupt)

    def _rx_frames(self, queue: Queue) -> None:
        frames = 0
        while frames < RX_BATCH:
            if self._rx_pending is not None:
                if not self._continue_merge(queue) and self._out_of_buffers(queue):
                    return
                continue
            if self._rx_slow or self._rx_held is not None or self._rx_ring is None:
                self._rx_slow = False
                got = self._rx_one_chain(queue)
            else:
                got = self._rx_fast(queue, RX_BATCH - frames)
            if got is None:
                return
            frames += got

    def _rx_fast(self, queue: Queue, budget: int) -> int | None:
        """readv frames straight into single-descriptor receive buffers, up to ``budget``.

        Returns the frames delivered, or None when the tap is empty or the buffers ran out
        (stop until the next wake-up). A buffer of another shape sets ``_rx_slow``: the next
        one is taken with Queue.pop. The used entries of the batch are published at once.
        """
        ring = self._rx_ring
        assert ring is not None
        if queue.broken:
            return None
        hdr = self._hdr_len
        b = ring.rx(self.tap.fileno(), queue.next_avail, queue.next_used, budget, hdr,
                    not self._guest_csum)  # fmt: skip
        stats = self.stats
        stats.rx_frames += b.frames  # counters first: a test may read them once it sees used
        stats.rx_bytes += b.nbytes - b.frames * hdr
        stats.rx_dropped += b.errors
        queue.next_avail = b.next_avail
        queue.next_used = b.next_used
        status = b.status
        if status == FrameRing.DONE:
            if b.frames or b.errors:
                return b.frames
            if (queue.avail_idx() - queue.next_avail) & 0xFFFF > queue.size:
                queue.pop()  # reports the driver bug and stops the queue
                return None
            return None if self._out_of_buffers(queue) else 0
        if status == FrameRing.SLOW:
            self._rx_slow = True  # the next buffer has another shape: Queue.pop takes it
            return b.frames
        if status == FrameRing.OVERSIZE:
            assert b.oversize is not None
            head, off, length, n = b.oversize
            if self._mrg:  # the rest goes into more buffers, copied from the stage
                view = self._rx_ram[off : off + length]
                self._rx_pending = _Merge([view], n - length, 0, [(head, length)])
                stats.rx_bytes += n - hdr
            else:
                # Bigger than the buffer the guest gave (it did not ask for offloads that
                # would produce this): drop the frame, keep the buffer for the next one.
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF
                stats.rx_dropped += 1
                self.log.warn("rx frame of %d bytes dropped: receive buffer holds %d", n, length)
            return b.frames
        if status == FrameRing.FD_ERROR and b.last_errno != errno.EINTR:
            self.log.warn("tap read failed: %s", os.strerror(b.last_errno))
        return None  # EMPTY_FD or FD_ERROR: the buffer stays available

    def _rx_one_chain(self, queue: Queue) -> int | None:
        """One receive buffer of any shape, through Queue.pop: 1 frame delivered, 0, or stop."""
        fd = self.tap.fileno()
        hdr = self._hdr_len
        stats = self.stats
        chain = self._rx_held
        self._rx_held = None
        if chain is None:
            chain = queue.pop()
            if chain is None:
                return None if self._out_of_buffers(queue) else 0
        cap = chain.writable_len
        if cap < hdr or len(chain.writable) > MAX_SEGMENTS:
            stats.rx_bad_chains += 1
            self.log.warn("rx chain %d: %d writable bytes in %d segments refused",
                          chain.head, cap, len(chain.writable))  # fmt: skip
            queue.add_used(chain.head, 0)
            return 0
        views = chain.ram.views
        iovecs: list[memoryview] = []
        for addr, length in chain.writable:
            iovecs += views(addr, length)
        iovecs.append(self._stage_view)
        try:
            n = os.readv(fd, iovecs)
        except BlockingIOError:
            self._rx_held = chain  # the tap is empty; keep the buffer for the next frame
            return None
        except OSError as err:
            self._rx_held = chain
            if err.errno != errno.EINTR:
                self.log.warn("tap read failed: %s", err)
            return None
        iovecs.pop()
        if n < hdr:  # cannot happen with IFF_VNET_HDR; never hand the guest a stub
            self._rx_held = chain
            stats.rx_dropped += 1
            return 0
        if not self._guest_csum:
            _put(iovecs, 0, b"\x00")  # flags: the guest did not ask for DATA_VALID
        if n <= cap:
            if hdr == 12:
                _put(iovecs, 10, b"\x01\x00")  # num_buffers = 1
            stats.rx_frames += 1  # counters first: a test may read them once it sees used
            stats.rx_bytes += n - hdr
            queue.add_used(chain.head, n)
            return 1
        if self._mrg:
            self._rx_pending = _Merge(iovecs, n - cap, 0, [(chain.head, cap)])
            stats.rx_bytes += n - hdr
            return 0
        # Bigger than the buffer the guest gave (it did not ask for offloads that would
        # produce this): drop the frame, reuse the buffer.
        self._rx_held = chain
        stats.rx_dropped += 1
        self.log.warn("rx frame of %d bytes dropped: receive buffer holds %d", n, cap)
        return 0

    def _continue_merge(self, queue: Queue) -> bool:
        """Copy the rest of an oversized frame into more buffers; False when they run out."""
        merge = self._rx_pending
        assert merge is not None
        stage = self._stage_view
        while merge.offset < merge.length:
            chain = queue.pop()
            if chain is None:
                return False
            cap = chain.writable_len
            if cap == 0 or len(chain.writable) > MAX_SEGMENTS:
                self.stats.rx_bad_chains += 1
                merge.discard.append(chain.head)
                continue
            take = min(cap, merge.length - merge.offset)
            chain.writer().write(stage[merge.offset : merge.offset + take])
            merge.offset += take
            merge.used.append((chain.head, take))
        _put(merge.header, 10, _U16.pack(len(merge.used)))
        self.stats.rx_frames += 1
        add_used = self.queues[RXQ].add_used
        for head, length in merge.used:
            add_used(head, length)
        for head in merge.discard:
            add_used(head, 0)
        self._rx_pending = None
        return True

    def _out_of_buffers(self, queue: Queue) -> bool:
        """No receive buffer: stop watching the tap until a kick. True = stop now."""
        self._set_tap_polling(False)
        if queue.enable_notification():  # buffers arrived meanwhile: carry on
            self._set_tap_polling(True)
            return False
        return True
