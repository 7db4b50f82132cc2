"""virtio-console (device type 3) with a single port (hvc0) and no multiport.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) guest output to the
host. Input is read from ``input_fd`` (e.g. stdin) straight into the guest's receive buffers
with ``os.readv``; while the guest has no receive buffer posted the input fd is not polled, so a
stalled guest makes the host side block instead of making us buffer without bound.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Sequence

from devices.virtio._constants import DeviceType
from devices.virtio._device import RING_FEATURES, ThreadedVirtioDevice
from devices.virtio._queue import Queue
from sys_util import AsRawFd

__all__ = ["VIRTIO_CONSOLE_F_SIZE", "Console"]

QUEUE_SIZE = 256
RECEIVEQ = 0
TRANSMITQ = 1
VIRTIO_CONSOLE_F_SIZE = 0
_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr


class Console(ThreadedVirtioDevice):
    """``input_fd`` (may be None) feeds the guest; guest output is written to ``output_fd``.

    The fds are borrowed, not owned: the caller closes them (they are often stdin/stdout).
    """

    def __init__(
        self, input_fd: int | None, output_fd: int | None, *, cols: int = 80, rows: int = 25
    ) -> None:
        self._input_fd = input_fd
        self._output_fd = output_fd
        self._cols = cols
        self._rows = rows
        self._input_eof = False
        self._input_polled = False
        super().__init__()

    def debug_label(self) -> str:
        return "virtio-console"

    @property
    def device_type(self) -> int:
        return DeviceType.CONSOLE

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return [QUEUE_SIZE, QUEUE_SIZE]

    def features(self) -> int:
        return RING_FEATURES | 1 << VIRTIO_CONSOLE_F_SIZE

    def config_space(self) -> bytes:
        return _CONFIG.pack(self._cols, self._rows, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # emerg_wr (offset 8): an early-boot character the guest writes without queues.
        if offset == 8 and data and self._output_fd is not None:
            try:
                os.write(self._output_fd, data[:1])
            except OSError as err:
                self.log.warn("console output failed: %s", err)

    def keep_fds(self) -> list[int]:
        return [fd for fd in (self._input_fd, self._output_fd) if fd is not None]

    def on_activate(self) -> None:
        self._input_polled = False

    def extra_poll_sources(self) -> list[tuple[int | AsRawFd, Callable[[], None]]]:
        if self._input_fd is None or self._input_eof:
            return []
        self._input_polled = True
        return [(self._input_fd, self._on_input)]

    # -- queues ----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Queue) -> None:
        if index == TRANSMITQ:
            self._drain_transmit(queue)
        elif index == RECEIVEQ:
            # New receive buffers: make sure input is being watched again.
            self._set_input_polling(True)

    def _drain_transmit(self, queue: Queue) -> None:
        interrupt = self.interrupt
        assert interrupt is not None
        while True:
            before = queue.next_used
            while (chain := queue.pop()) is not None:
                reader = chain.reader()
                n = reader.available_bytes()
                iovecs = reader.get_iovecs(n)
                if self._output_fd is not None and n:
                    try:
                        _writev_all(self._output_fd, iovecs)
                    except OSError as err:
                        self.log.warn("console output failed: %s", err)
                queue.add_used(chain.head, 0)
            if queue.next_used != before:  # served something (or completed a bad chain)
                queue.trigger_interrupt(interrupt)
            if not queue.enable_notification():
                return

    def _set_input_polling(self, on: bool) -> None:
        fd = self._input_fd
        poll = getattr(self, "_poll", None)
        if fd is None or self._input_eof or poll is None or on == self._input_polled:
            return
        if on:
            poll.add(fd, 1000)
        else:
            poll.delete(fd)
        self._input_polled = on

    def _on_input(self) -> None:
        if not self.queues:
            return
        queue = self.queues[RECEIVEQ]
        interrupt = self.interrupt
        assert interrupt is not None and self._input_fd is not None
        chain = queue.pop()
        if chain is None:
            # No buffer: stop watching input until the guest posts one (a receiveq kick).
            self._set_input_polling(False)
            if queue.enable_notification():
                self._set_input_polling(True)
            return
        writer = chain.writer()
        n = writer.available_bytes()
        got = 0
        if n:
            try:
                got = os.readv(self._input_fd, writer.get_iovecs(n))
            except BlockingIOError:
                got = 0
            except OSError as err:
                if err.errno != errno.EIO:
                    self.log.warn("console input failed: %s", err)
                got = 0
                self._input_eof = True
            else:
                if got == 0:
                    self._input_eof = True
            if self._input_eof:
                poll = getattr(self, "_poll", None)
                if poll is not None and self._input_polled:
                    poll.delete(self._input_fd)
                    self._input_polled = False
        queue.add_used(chain.head, got)
        queue.trigger_interrupt(interrupt)


def _writev_all(fd: int, iovecs: list[memoryview]) -> None:
    want = sum(len(v) for v in iovecs)
    done = os.writev(fd, iovecs)
    while done < want:
        skip = done
        rest: list[memoryview] = []
        for v in iovecs:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        done += os.writev(fd, rest)
