"""The interface every virtio device implements, and a worker-thread base for queue devices.

A device knows nothing about its transport: the transport negotiates features, collects the
queues the driver configured and calls :meth:`VirtioDevice.activate` once the driver sets
DRIVER_OK. A :class:`ThreadedVirtioDevice` then serves its queues in one worker thread that
sleeps in a :class:`~sys_util.PollContext` on the queues' ioeventfds, the INTx resample eventfd
and a kill eventfd used by :meth:`reset`/:meth:`close`.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Self

from devices.virtio._constants import Features
from devices.virtio._log import RateLimitedLog
from sys_util import AsRawFd, EventFd, PollContext

if TYPE_CHECKING:
    from devices.virtio._interrupt import Interrupt
    from devices.virtio._queue import Queue
    from sys_util import GuestMemory

__all__ = ["RING_FEATURES", "ThreadedVirtioDevice", "VirtioDevice"]

logger = logging.getLogger(__name__)

#: Ring features every device here supports.
RING_FEATURES = (
    1 << Features.RING_INDIRECT_DESC | 1 << Features.RING_EVENT_IDX | 1 << Features.VERSION_1
)


class VirtioDevice(abc.ABC):
    """A virtio device behind any transport."""

    acked_features: int = 0

    @property
    @abc.abstractmethod
    def device_type(self) -> int:
        """virtio device ID (:class:`~devices.virtio.DeviceType`)."""

    @property
    @abc.abstractmethod
    def queue_max_sizes(self) -> Sequence[int]:
        """Maximum size of each queue; the length is the number of queues."""

    def debug_label(self) -> str:
        return f"virtio-{type(self).__name__.lower()}"

    def features(self) -> int:
        """Feature bits the device offers (including ring features and VERSION_1)."""
        return RING_FEATURES

    def ack_features(self, value: int) -> None:
        """The driver accepted ``value`` (the transport checked it is a subset of features())."""
        self.acked_features = value & self.features()

    def read_config(self, offset: int, length: int) -> bytes:
        """Read device-specific configuration; out-of-range bytes read as zero."""
        space = self.config_space()
        data = space[offset : offset + length] if 0 <= offset < len(space) else b""
        return data + b"\x00" * (length - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Most devices have a read-only configuration; writes are ignored."""
        return

    def config_space(self) -> bytes:
        """The device configuration structure (override, or override read_config)."""
        return b""

    @abc.abstractmethod
    def activate(
        self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Sequence[Queue],
        queue_evts: Sequence[EventFd],
    ) -> None:
        """Start serving ``queues`` (already validated and mapped) until :meth:`reset`."""

    def reset(self) -> bool:
        """Stop serving and drop activation state; True if the device can be activated again."""
        return False

    def keep_fds(self) -> list[int]:
        """File descriptors this device needs if it is moved into a jailed process."""
        return []

    def close(self) -> None:
        """Release every resource (idempotent)."""
        self.reset()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadedVirtioDevice(VirtioDevice):
    """Base for devices that process their queues in one worker thread.

    Subclasses implement :meth:`process_queue` (and optionally :meth:`extra_poll_sources`).
    """

    def __init__(self) -> None:
        self._worker: threading.Thread | None = None
        self._kill_evt: EventFd | None = None
        self._state_lock = threading.Lock()
        self.mem: GuestMemory | None = None
        self.interrupt: Interrupt | None = None
        self.queues: list[Queue] = []
        self.log = RateLimitedLog(logger, self.debug_label())
        self._poll: PollContext[int] | None = None

    @property
    def active(self) -> bool:
        return self._worker is not None

    @abc.abstractmethod
    def process_queue(self, index: int, queue: Queue) -> None:
        """Serve every available chain of ``queue`` (called in the worker thread)."""

    def extra_poll_sources(self) -> list[tuple[int | AsRawFd, Callable[[], None]]]:
        """Additional ``(fd_or_obj, handler)`` pairs for the worker's poll loop."""
        return []

    def on_activate(self) -> None:
        """Hook run in activate() before the worker starts."""

    def on_reset(self) -> None:
        """Hook run in reset() after the worker stopped."""

    def activate(
        self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Sequence[Queue],
        queue_evts: Sequence[EventFd],
    ) -> None:
        with self._state_lock:
            if self._worker is not None:
                raise RuntimeError(f"{self.debug_label()} is already active")
            self.mem = mem
            self.interrupt = interrupt
            self.queues = list(queues)
            for q in self.queues:
                q.log = self.log
            self.on_activate()
            kill = EventFd()
            self._kill_evt = kill
            evts = list(queue_evts)
            self._worker = threading.Thread(
                target=self._run, args=(kill, evts), name=self.debug_label(), daemon=True
            )
            self._worker.start()

    def _run(self, kill: EventFd, queue_evts: list[EventFd]) -> None:
        try:
            self._serve(kill, queue_evts)
        except Exception:  # e.g. an fd closed underneath us: log it, never kill the VMM
            logger.exception("%s: worker thread stopped", self.debug_label())
        finally:
            self._poll = None

    def _serve(self, kill: EventFd, queue_evts: list[EventFd]) -> None:
        interrupt = self.interrupt
        assert interrupt is not None
        handlers: dict[int, Callable[[], None]] = {}
        with PollContext[int]() as poll:
            poll.add(kill, -1)
            for i, evt in enumerate(queue_evts):
                if i < len(self.queues):
                    poll.add(evt, i)
                    handlers[i] = self._queue_handler(i, evt)
            resample = interrupt.resample_event
            if resample is not None:
                poll.add(resample, -2)
                handlers[-2] = interrupt.resample
            for n, (src, handler) in enumerate(self.extra_poll_sources()):
                poll.add(src, 1000 + n)
                handlers[1000 + n] = handler
            self._poll = poll
            # Chains made available before activation (or before a kick) are served at once.
            for i, queue in enumerate(self.queues):
                self._safe(self.process_queue, i, queue)
            while True:
                events = poll.wait()
                for token, _ in events:
                    if token == -1:
                        return
                    found = handlers.get(token)
                    if found is not None:
                        self._safe(found)

    def _queue_handler(self, index: int, evt: EventFd) -> Callable[[], None]:
        queue = self.queues[index]

        def handle() -> None:
            try:
                evt.read()
            except BlockingIOError:
                pass
            self.process_queue(index, queue)

        return handle

    def _safe(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception as err:  # never let a guest-triggered bug kill the worker
            self.log.warn("worker error: %r", err)
            logger.debug("%s worker error", self.debug_label(), exc_info=True)

    def reset(self) -> bool:
        with self._state_lock:
            worker, kill = self._worker, self._kill_evt
            self._worker = None
            self._kill_evt = None
        if worker is not None and kill is not None:
            kill.write(1)
            worker.join()
            kill.close()
        self.on_reset()
        self.mem = None
        self.interrupt = None
        self.queues = []
        return True
