"""Publish the used index and avail_event of a queue with single 16-bit stores (a workaround).

CPython's ``struct.Struct.pack_into`` clears its destination (a ``memset``) before it writes the
value, so :meth:`devices.virtio.Queue.add_used` / ``set_avail_event`` briefly store 0 into
``used->idx`` / ``avail_event``. A guest polling the used ring can read that 0: the C test guest's
vsock-echo then stops with ``virtio-queueN:used-index-jumped from=... to=0`` (seen on both the rx
and the tx queue within a few MiB of echo). A store through a memoryview cast to ``"H"`` is one
aligned 16-bit store, which x86 makes atomic. Until ``Queue`` publishes that way itself, the vsock
device routes its queues' publication through :func:`single_store_publication`.
"""

from __future__ import annotations

import struct

from devices.virtio._queue import Queue

__all__ = ["single_store_publication"]

_ELEM = struct.Struct("<II")


def single_store_publication(queue: Queue) -> None:
    """Make ``queue`` (activated) publish ``used->idx`` and ``avail_event`` tear-free."""
    used: memoryview | None = queue._used
    if used is None:
        raise ValueError("queue is not activated")
    size = queue.size
    idx = used[2:4].cast("H")
    avail_event = used[4 + 8 * size : 6 + 8 * size].cast("H")

    def add_used(head: int, length: int) -> None:
        slot = queue.next_used % size
        # The element may be cleared-then-written: the driver does not read it before the index.
        _ELEM.pack_into(used, 4 + 8 * slot, head, length & 0xFFFF_FFFF)
        queue.next_used = nxt = (queue.next_used + 1) & 0xFFFF
        idx[0] = nxt  # after the element: x86 keeps stores in order

    def set_avail_event(value: int) -> None:
        avail_event[0] = value & 0xFFFF

    # Queue.pop() and enable_notification() call these through the instance too.
    queue.add_used = add_used  # type: ignore[method-assign]
    queue.set_avail_event = set_avail_event  # type: ignore[method-assign]
