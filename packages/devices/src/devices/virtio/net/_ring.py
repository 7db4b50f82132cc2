"""Direct views of one split virtqueue for virtio-net's per-frame fast path.

:meth:`Queue.pop <devices.virtio.Queue.pop>` builds a :class:`~devices.virtio.DescriptorChain`
(two lists of tuples, a Python object) and :meth:`Queue.add_used` publishes the used index once
per chain; at 1.5 KB frames that bookkeeping costs more than the tap's ``write`` itself. Almost
every network chain has one shape: a single descriptor (the test guest, Linux's transmit of
linear frames with the header pushed in front, Linux's receive buffers, mergeable or small).
:class:`FastRing` lets the device recognise that shape from the raw rings, check it (in RAM
region 0, right direction, right length) and write its used element without allocating; any
other chain, and anything odd about one, is left to ``Queue.pop`` (which validates it fully and
completes broken ones), so the hostile-input rules live in one place.

Everything here is built from the queue's public, already validated configuration
(``desc_table``, ``avail_ring``, ``used_ring``, ``size``) and views of guest memory; the
device keeps ``Queue.next_avail``/``next_used`` in step so ``Queue.pop``,
``Queue.enable_notification`` and ``Queue.trigger_interrupt`` keep working between batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devices.virtio._queue import Queue
    from sys_util import GuestMemory

__all__ = ["FastRing"]


class FastRing:
    """Cached views of a queue's rings and of guest RAM region 0 (built at activation).

    ``avail[1]`` is the driver's avail idx, ``avail[2 + slot]`` a head; ``desc[2 * i]`` is
    descriptor ``i``'s address and ``desc[2 * i + 1]`` its ``len | flags << 32 | next << 48``;
    ``used[slot] = id | len << 32`` writes a used element in one store; ``used_idx[0]`` is the
    used index (one aligned 16-bit store, as ``Queue.add_used`` does); ``ram`` covers guest
    addresses ``[base, end)``. (64-bit items halve the per-frame work of struct unpacking and
    element packing; memoryview reads and writes them with memcpy, so alignment is not needed.)
    """

    __slots__ = ("avail", "base", "desc", "end", "mask", "ram", "size", "used", "used_idx")

    def __init__(self, queue: Queue, mem: GuestMemory) -> None:
        size = queue.size
        self.size = size
        self.mask = size - 1
        # Queue.activate checked that each ring lies in guest RAM, in one region, aligned.
        self.avail = mem.view(queue.avail_ring, 4 + 2 * size).cast("H")
        self.desc = mem.view(queue.desc_table, 16 * size).cast("Q")
        used = mem.view(queue.used_ring, 4 + 8 * size)
        self.used_idx = used[2:4].cast("H")
        self.used = used[4:].cast("Q")
        region = mem.regions[0]
        self.base = int(region.guest_base)
        self.end = self.base + region.size
        self.ram = mem.view(self.base, region.size)

    def publish(self, queue: Queue, next_used: int) -> None:
        """Make the used elements written so far visible: one index store for the batch."""
        queue.next_used = next_used
        self.used_idx[0] = next_used  # elements were stored first (x86 keeps store order)
