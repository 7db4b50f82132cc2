"""The per-frame fast path's view of one split virtqueue: a :class:`sys_util.FrameRing`.

:meth:`Queue.pop <devices.virtio.Queue.pop>` builds a :class:`~devices.virtio.DescriptorChain`
(two lists of tuples, a Python object) and :meth:`Queue.add_used` publishes the used index once
per chain; at 1.5 KB frames that bookkeeping costs more than the tap's ``write`` itself. Almost
every network chain has one shape: a single descriptor (the test guest, Linux's transmit of
linear frames with the header pushed in front, Linux's receive buffers, mergeable or small).
``FrameRing`` moves a batch of such chains through the tap in C with the GIL released, checking
each descriptor (in RAM region 0, right direction, right length); any other chain, and anything
odd about one, is left to ``Queue.pop`` (which validates it fully and completes broken ones), so
the hostile-input rules live in one place.

Everything here is built from the queue's public, already validated configuration
(``desc_table``, ``avail_ring``, ``used_ring``, ``size``) and views of guest memory; the
device keeps ``Queue.next_avail``/``next_used`` in step so ``Queue.pop``,
``Queue.enable_notification`` and ``Queue.trigger_interrupt`` keep working between batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sys_util import FrameRing

if TYPE_CHECKING:
    from devices.virtio._queue import Queue
    from sys_util import GuestMemory

__all__ = ["frame_ring", "region0"]


def region0(mem: GuestMemory) -> memoryview:
    """A view of guest RAM region 0 (where the fast path accepts buffers)."""
    region = mem.regions[0]
    return mem.view(int(region.guest_base), region.size)


def frame_ring(queue: Queue, mem: GuestMemory, ram: memoryview) -> FrameRing:
    """A FrameRing over ``queue``'s rings and ``ram`` (:func:`region0` of ``mem``)."""
    size = queue.size
    # Queue.activate checked that each ring lies in guest RAM, in one region, aligned.
    return FrameRing(
        ram,
        int(mem.regions[0].guest_base),
        mem.view(queue.desc_table, 16 * size),
        mem.view(queue.avail_ring, 4 + 2 * size),
        mem.view(queue.used_ring, 4 + 8 * size),
        size,
    )
