"""virtio-rng (device type 4): fills every writable buffer with ``os.getrandom`` bytes."""

from __future__ import annotations

import os
from collections.abc import Sequence

from devices.virtio._constants import DeviceType
from devices.virtio._device import ThreadedVirtioDevice
from devices.virtio._queue import Queue

__all__ = ["MAX_REQUEST_BYTES", "Rng"]

QUEUE_SIZE = 256
#: Bytes served per request at most (Linux asks for <= 64 bytes; a guest asking for more waits).
MAX_REQUEST_BYTES = 64 * 1024


class Rng(ThreadedVirtioDevice):
    """Entropy for the guest's ``/dev/hwrng``."""

    def debug_label(self) -> str:
        return "virtio-rng"

    @property
    def device_type(self) -> int:
        return DeviceType.RNG

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return [QUEUE_SIZE]

    def process_queue(self, index: int, queue: Queue) -> None:
        interrupt = self.interrupt
        assert interrupt is not None
        while True:
            before = queue.next_used
            while (chain := queue.pop()) is not None:
                writer = chain.writer()
                n = min(writer.available_bytes(), MAX_REQUEST_BYTES)
                if n:
                    writer.write(os.getrandom(n))
                queue.add_used(chain.head, n)
            if queue.next_used != before:  # served something (or completed a bad chain)
                queue.trigger_interrupt(interrupt)
            if not queue.enable_notification():
                return
