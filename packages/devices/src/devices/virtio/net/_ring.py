"""Tear-free publication of the used index and avail_event (a workaround, see below).

``struct.Struct.pack_into`` zeroes its destination before it writes the value (CPython's
``s_pack_internal`` starts with a ``memset``), so a ``Queue`` that publishes ``used->idx`` or
``avail_event`` with it lets a vCPU polling the ring see a transient 0: a polling guest then
reports "used index jumped" (measured: the test guest's net-echo failed within ~100 frames), and
a transient avail_event of 0 can suppress a kick. A store through a ``memoryview`` cast to
``"H"`` is one 16-bit store. Until :class:`devices.virtio.Queue` does this itself, the net device
publishes through :class:`RingWriter`.
"""

from __future__ import annotations

import struct

from devices.virtio._queue import Queue

__all__ = ["RingWriter"]

_USED_ELEM = struct.Struct("<II")


class RingWriter:
    """Single-store writes of one activated queue's used idx and avail_event."""

    __slots__ = ("_avail_event", "_idx", "_queue", "_used")

    def __init__(self, queue: Queue) -> None:
        used: memoryview | None = queue._used  # the ring view the queue mapped
        if used is None:
            raise ValueError("queue is not activated")
        size = queue.size
        self._queue = queue
        self._used = used
        self._idx = used[2:4].cast("H")
        self._avail_event = used[4 + 8 * size : 6 + 8 * size].cast("H")
        # Queue.pop() (for invalid chains and avail_event) and enable_notification() call these
        # on the instance: route them here too.
        queue.set_avail_event = self.set_avail_event  # type: ignore[method-assign]
        queue.add_used = self.add_used  # type: ignore[method-assign]

    def detach(self) -> None:
        """Give the queue its own methods back (device reset)."""
        for name in ("set_avail_event", "add_used"):
            self._queue.__dict__.pop(name, None)

    def set_avail_event(self, value: int) -> None:
        self._avail_event[0] = value & 0xFFFF

    def add_used(self, head: int, length: int) -> None:
        """:meth:`Queue.add_used` with the index published in one store."""
        queue = self._queue
        slot = queue.next_used % queue.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, length & 0xFFFF_FFFF)
        queue.next_used = nxt = (queue.next_used + 1) & 0xFFFF
        # The element is visible before the index: x86 does not reorder stores.
        self._idx[0] = nxt
