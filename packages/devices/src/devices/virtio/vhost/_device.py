"""The part every kernel-vhost virtio device shares: ring handover, interrupts, reset.

A vhost device is a virtio device whose rings the host kernel serves. Our side of the work is
all in :meth:`VhostDevice.activate` and :meth:`VhostDevice.reset`:

activate (in the process that maps guest memory: the jailed device process)
    ``SET_OWNER`` (once per fd: the kernel binds it to this process's address space),
    ``SET_FEATURES`` (the acked bits the kernel handles), ``SET_MEM_TABLE`` (every RAM region
    with its host address), then per kernel ring ``SET_VRING_NUM``, ``SET_VRING_BASE``,
    ``SET_VRING_ADDR`` (desc/used/avail translated to host addresses, each checked to lie in
    one RAM region first), ``SET_VRING_KICK`` (the queue's ioeventfd, so a guest notification
    goes from KVM straight to the kernel worker), ``SET_VRING_CALL`` and ``SET_VRING_ERR``, and
    finally the backend-specific start (:meth:`start_backend`).
reset
    :meth:`stop_backend`, ``GET_VRING_BASE`` per ring (kept in :attr:`vring_bases`), and every
    ring's eventfds unbound so the kernel drops its references to them.

The call eventfds are not irqfds: a worker thread here waits on them and raises the queue's
interrupt through :class:`~devices.virtio.Interrupt`, exactly as a userspace device does. That
keeps MSI-X masking, INTx and the ISR right at the cost of one wake-up per interrupt (crosvm
does the same).

The backend is anything with :class:`VhostBackend`'s methods (``sys_util.VhostNet`` /
``sys_util.VhostVsock`` in production, a recording fake in tests).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from devices.virtio._constants import Features
from devices.virtio._device import VirtioDevice
from devices.virtio._errors import InvalidQueue, VirtioError
from devices.virtio._log import RateLimitedLog
from sys_util import AsRawFd, EventFd, PollContext

if TYPE_CHECKING:
    from devices.virtio._interrupt import Interrupt
    from devices.virtio._queue import Queue
    from sys_util import GuestMemory

__all__ = [
    "RING_KERNEL_FEATURES",
    "VhostBackend",
    "VhostDevice",
    "VhostDeviceError",
    "ring_host_addresses",
]

logger = logging.getLogger(__name__)

#: Transport-level feature bits whose work the kernel does (ring layout, notification
#: suppression, endianness/header rules): offered only if the kernel reports them.
RING_KERNEL_FEATURES = (
    1 << Features.RING_INDIRECT_DESC | 1 << Features.RING_EVENT_IDX | 1 << Features.VERSION_1
)

_KILL = -1
_RESAMPLE = -2
_ERR_BASE = 1000
_USER_BASE = 2000


class VhostBackend(Protocol):
    """The generic vhost ioctls (``sys_util.Vhost``)."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...

    def set_owner(self) -> None: ...

    def get_features(self) -> int: ...

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, regions: Sequence[tuple[int, int, int]]) -> None: ...

    def set_vring_num(self, index: int, num: int) -> None: ...

    def set_vring_addr(
        self,
        index: int,
        desc_user_addr: int,
        used_user_addr: int,
        avail_user_addr: int,
        log_addr: int = 0,
        flags: int = 0,
    ) -> None: ...

    def set_vring_base(self, index: int, num: int) -> None: ...

    def get_vring_base(self, index: int) -> int: ...

    def set_vring_kick(self, index: int, fd: int | AsRawFd | None) -> None: ...

    def set_vring_call(self, index: int, fd: int | AsRawFd | None) -> None: ...

    def set_vring_err(self, index: int, fd: int | AsRawFd | None) -> None: ...


class VhostDeviceError(VirtioError):
    """A vhost device cannot be created or activated (the kernel refused a step, or lacks a
    feature we need). ``device`` names it, ``reason`` says what failed."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"{device}: {reason}")
        self.device = device
        self.reason = reason

    def __reduce__(self) -> tuple[type[VhostDeviceError], tuple[str, str]]:
        return (type(self), (self.device, self.reason))


def _host_address(
    regions: Sequence[tuple[int, int, int]], index: int, name: str, addr: int, length: int
) -> int:
    for guest, size, host in regions:
        if guest <= addr and addr + length <= guest + size:
            return host + (addr - guest)
    raise InvalidQueue(
        f"queue {index}: {name} [{addr:#x}, +{length:#x}) is not inside one guest RAM region"
    )


def ring_host_addresses(mem: GuestMemory, index: int, queue: Queue) -> tuple[int, int, int]:
    """``(desc, used, avail)`` host addresses of ``queue``'s rings (VHOST_SET_VRING_ADDR order).

    Every ring must be aligned as the spec and the kernel require and lie entirely inside one
    RAM region (the kernel accesses it as one virtually contiguous range); anything else is an
    :class:`~devices.virtio.InvalidQueue` naming the queue, raised before the kernel sees it.
    """
    size = queue.size
    if size <= 0 or size > queue.max_size or size & (size - 1):
        raise InvalidQueue(f"queue {index}: size {size} (max {queue.max_size})")
    regions = mem.host_regions()
    out = []
    for name, addr, length, align in (
        ("descriptor table", queue.desc_table, 16 * size, 16),
        ("used ring", queue.used_ring, 6 + 8 * size, 4),
        ("available ring", queue.avail_ring, 6 + 2 * size, 2),
    ):
        if addr < 0 or addr % align:
            raise InvalidQueue(f"queue {index}: {name} at {addr:#x} is not {align}-byte aligned")
        out.append(_host_address(regions, index, name, addr, length))
    return out[0], out[1], out[2]


class VhostDevice(VirtioDevice):
    """Base of the vhost devices: ``kernel_queues`` rings go to ``vhost``, the rest (if any)
    stay here (:meth:`userspace_queue`).

    Subclasses give :attr:`device_type`, :attr:`queue_max_sizes`, :meth:`device_features`,
    :attr:`kernel_feature_mask` and the backend start/stop.
    """

    #: Feature bits the kernel implements for this device type (offered if it reports them).
    kernel_feature_mask: int = RING_KERNEL_FEATURES

    def __init__(self, vhost: VhostBackend, kernel_queues: int) -> None:
        self.vhost = vhost
        self.kernel_queues = kernel_queues
        self.log = RateLimitedLog(logger, self.debug_label())
        try:
            self.kernel_features = vhost.get_features()
        except OSError as err:
            raise VhostDeviceError(self.debug_label(), f"cannot read features: {err}") from err
        if not self.kernel_features >> Features.VERSION_1 & 1:
            raise VhostDeviceError(
                self.debug_label(), "the kernel backend lacks VIRTIO_F_VERSION_1 (kernel too old)"
            )
        self._owned = False
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._kill: EventFd | None = None
        self._calls: list[EventFd] = []
        self._errs: list[EventFd] = []
        self._started = False
        self.mem: GuestMemory | None = None
        self.interrupt: Interrupt | None = None
        self.queues: list[Queue] = []
        #: Each kernel ring's next available index, read by the last :meth:`reset`.
        self.vring_bases: list[int] = []
        #: Interrupts raised for the kernel and errors it reported, for tests and debugging.
        self.interrupts = 0
        self.ring_errors = 0

    # -- VirtioDevice -------------------------------------------------------------------------

    def device_features(self) -> int:
        """The device-type bits we implement ourselves (MAC, offloads...)."""
        return 0

    def features(self) -> int:
        return self.device_features() | self.kernel_features & self.kernel_feature_mask

    def keep_fds(self) -> list[int]:
        return [self.vhost.fileno()]

    @property
    def active(self) -> bool:
        return self._worker is not None

    def start_backend(self) -> None:
        """Point the kernel's rings at the backend (tap, vsock) and start them."""

    def stop_backend(self) -> None:
        """Detach the rings from the backend (the kernel stops touching guest memory)."""

    def userspace_queue(self, index: int, queue: Queue) -> None:
        """A kick on a queue that stays in userspace (index >= kernel_queues)."""

    def activate(
        self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Sequence[Queue],
        queue_evts: Sequence[EventFd],
    ) -> None:
        with self._lock:
            if self._worker is not None:
                raise RuntimeError(f"{self.debug_label()} is already active")
            n = self.kernel_queues
            if len(queues) < n or len(queue_evts) < n:
                raise InvalidQueue(f"{self.debug_label()} needs {n} queues, got {len(queues)}")
            for i in range(n):
                if not queues[i].ready:
                    raise InvalidQueue(f"queue {i}: not enabled by the driver")
            # Every address is checked before the kernel sees any of them.
            rings = [ring_host_addresses(mem, i, queues[i]) for i in range(n)]
            calls = [EventFd(nonblocking=True) for _ in range(n)]
            errs = [EventFd(nonblocking=True) for _ in range(n)]
            self._calls, self._errs = calls, errs
            self.mem, self.interrupt, self.queues = mem, interrupt, list(queues)
            try:
                self._hand_over(mem, queues, queue_evts, rings)
            except BaseException as err:
                self._teardown_kernel(read_bases=False)
                self._release()
                if isinstance(err, OSError):
                    raise VhostDeviceError(self.debug_label(), f"activation failed: {err}") from err
                raise
            kill = EventFd()
            self._kill = kill
            userspace = [(i, queue_evts[i]) for i in range(n, min(len(queues), len(queue_evts)))]
            self._worker = threading.Thread(
                target=self._run, args=(kill, userspace), name=self.debug_label(), daemon=True
            )
            self._worker.start()

    def _hand_over(
        self,
        mem: GuestMemory,
        queues: Sequence[Queue],
        queue_evts: Sequence[EventFd],
        rings: list[tuple[int, int, int]],
    ) -> None:
        vhost = self.vhost
        if not self._owned:
            vhost.set_owner()
            self._owned = True
        vhost.set_features(self.acked_features & self.kernel_features & self.kernel_feature_mask)
        vhost.set_mem_table(mem.host_regions())
        for i, (desc, used, avail) in enumerate(rings):
            q = queues[i]
            vhost.set_vring_num(i, q.size)
            vhost.set_vring_base(i, q.next_avail)
            vhost.set_vring_addr(i, desc, used, avail)
            vhost.set_vring_kick(i, queue_evts[i])
            vhost.set_vring_call(i, self._calls[i])
            vhost.set_vring_err(i, self._errs[i])
        # Marked first: if starting fails half-way (ring 0 attached, ring 1 refused), the
        # teardown still detaches whatever did start.
        self._started = True
        self.start_backend()

    # -- the worker: kernel "call"s -> guest interrupts -------------------------------------------

    def _run(self, kill: EventFd, userspace: list[tuple[int, EventFd]]) -> None:
        try:
            self._serve(kill, userspace)
        except Exception:  # an fd closed underneath us: log it, never kill the VMM
            logger.exception("%s: worker thread stopped", self.debug_label())

    def _serve(self, kill: EventFd, userspace: list[tuple[int, EventFd]]) -> None:
        interrupt = self.interrupt
        assert interrupt is not None
        handlers: dict[int, Callable[[], None]] = {}
        with PollContext[int]() as poll:
            poll.add(kill, _KILL)
            for i, evt in enumerate(self._calls):
                poll.add(evt, i)
                handlers[i] = self._call_handler(i, evt, interrupt)
            for i, evt in enumerate(self._errs):
                poll.add(evt, _ERR_BASE + i)
                handlers[_ERR_BASE + i] = self._err_handler(i, evt)
            for i, evt in userspace:
                poll.add(evt, _USER_BASE + i)
                handlers[_USER_BASE + i] = self._user_handler(i, evt)
            resample = interrupt.resample_event
            if resample is not None:
                poll.add(resample, _RESAMPLE)
                handlers[_RESAMPLE] = interrupt.resample
            while True:
                for token, _ in poll.wait():
                    if token == _KILL:
                        return
                    handler = handlers.get(token)
                    if handler is not None:
                        try:
                            handler()
                        except Exception as err:
                            self.log.warn("worker error: %r", err)

    def _call_handler(self, i: int, evt: EventFd, interrupt: Interrupt) -> Callable[[], None]:
        queue = self.queues[i]

        def on_call() -> None:
            try:
                evt.read()
            except BlockingIOError:
                return
            self.interrupts += 1
            interrupt.signal_used_queue(queue.vector)

        return on_call

    def _err_handler(self, i: int, evt: EventFd) -> Callable[[], None]:
        def on_err() -> None:
            try:
                count = evt.read()
            except BlockingIOError:
                return
            self.ring_errors += count
            self.log.warn("kernel reported %d error(s) on queue %d (bad ring from guest)", count, i)

        return on_err

    def _user_handler(self, i: int, evt: EventFd) -> Callable[[], None]:
        queue = self.queues[i]

        def on_kick() -> None:
            try:
                evt.read()
            except BlockingIOError:
                return
            self.userspace_queue(i, queue)

        return on_kick

    # -- reset and close ------------------------------------------------------------------------

    def _teardown_kernel(self, *, read_bases: bool) -> None:
        """Stop the backend, read the ring bases, unbind every eventfd; log, never raise."""
        vhost = self.vhost
        if self._started:
            self._started = False
            try:
                self.stop_backend()
            except OSError as err:
                self.log.warn("stopping the kernel backend failed: %s", err)
        if not self._owned:
            return
        bases = []
        for i in range(self.kernel_queues):
            if read_bases:
                try:
                    bases.append(vhost.get_vring_base(i))
                except OSError as err:
                    self.log.warn("reading ring %d's base failed: %s", i, err)
            for unbind in (vhost.set_vring_kick, vhost.set_vring_call, vhost.set_vring_err):
                try:
                    unbind(i, None)
                except OSError as err:
                    self.log.warn("unbinding ring %d's eventfd failed: %s", i, err)
        if read_bases:
            self.vring_bases = bases

    def _release(self) -> None:
        for evt in (*self._calls, *self._errs):
            evt.close()
        self._calls, self._errs = [], []
        self.mem, self.interrupt, self.queues = None, None, []

    def reset(self) -> bool:
        with self._lock:
            worker, kill = self._worker, self._kill
            self._worker, self._kill = None, None
            if worker is None:
                return True
            assert kill is not None
            kill.write(1)
            worker.join()
            kill.close()
            self._teardown_kernel(read_bases=True)
            self._release()
        return True

    def close(self) -> None:
        self.reset()
        self.vhost.close()
