"""Sandboxed PCI devices: each one forked into its own jailed process, reached over a socket.

crosvm's multiprocess model (``devices/src/proxy.rs``). A :class:`Sandbox` wraps PCI device
factories; every wrapped device is built in the main process as usual (so ``arch`` places its
BARs, registers its ioeventfds and INTx irqfd on the real object) and is then, by
:meth:`Sandbox.start`, forked into a process that jails itself (user, PID, mount, net and IPC
namespaces, an empty root, no capabilities, the device's seccomp policy) and serves the bus
calls. The main process keeps only a :class:`ProxyDevice`.

What crosses which socket, split by privilege:

* the *bus socket* (main -> device): crosvm's ``Command`` (``Read``, ``Write``, ``ReadConfig``,
  ``WriteConfig``, ``Shutdown``), one synchronous request per BAR/config access, with timeouts;
* the *IRQ socket* (device -> main): :class:`~devices.irq.IrqRouter` requests
  (``allocate_gsi``, ``set_msi_route``, ``register_irqfd`` with the eventfd as SCM_RIGHTS, ...),
  served by an :class:`IrqRouterServer` in the main loop. A device may only touch the GSIs it
  was given: it can route its own MSI-X vectors, never map memory or touch another device;
* the *control socket* (main -> device, only for devices that take VMM control requests: the
  balloon): :class:`DeviceRequest` (``AdjustBalloon``, ``GetBalloonStats``), served by a thread
  of the device process, so a request that waits on the guest (statistics, up to seconds) never
  holds the bus socket a vCPU needs.

The data path never crosses a socket: virtqueues live in the shared memfd guest memory,
notifications arrive on ioeventfds and interrupts leave by irqfds, all inherited by the fork.

**Fork only while single-threaded.** ``os.fork`` copies only the calling thread; a lock held by
another thread (a vCPU, a device worker, the logging module) would stay locked forever in the
child. :meth:`Sandbox.start` therefore refuses to run once other threads exist: call it after
``build_vm`` and before starting vCPU threads. Device worker threads start later, inside the
device process, when the guest activates the device.

A device process that dies is reported by :class:`ChildMonitor` (polled by the main loop) as
``device <label> (pid N) died: killed by SIGSYS (seccomp refused syscall socket)``; proxy calls
to a dead device return all-ones and are logged once, so a vCPU never hangs on it.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import select
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar, runtime_checkable

from devices.irq import FileDescriptorLike, IoEvent, IrqRouter
from devices.pci import BarAllocator, PciBar
from io_jail import JailExit, Minijail, SeccompReport, decode_wait_status
from msg_socket import (
    Array,
    Disconnected,
    EncodeError,
    FixedBytes,
    MsgError,
    MsgSocket,
    TaggedUnion,
    u16,
    u32,
    u64,
)
from sys_util import EventFd, GuestMemory, logging_fds

__all__ = [
    "DEFAULT_TIMEOUT",
    "BalloonControl",
    "BalloonState",
    "ChildMonitor",
    "Command",
    "CommandResult",
    "DeviceDeath",
    "DeviceRequest",
    "DeviceResponse",
    "IrqRequest",
    "IrqResponse",
    "IrqRouterClient",
    "IrqRouterServer",
    "ProxiedDevice",
    "ProxyDevice",
    "Sandbox",
    "balloon_adjust",
    "balloon_state",
    "policy_dir",
]

logger = logging.getLogger(__name__)

#: Seconds a bus call may take before the device is declared dead (crosvm: 2000 ms).
DEFAULT_TIMEOUT = 2.0
#: Most GSIs one device may hold (2048 MSI-X vectors + config).
MAX_GSIS_PER_DEVICE = 2049


def policy_dir(arch: str = "x86_64") -> Path:
    """The directory of the seccomp policies shipped with this package."""
    return Path(str(resources.files("devices") / "seccomp" / arch))


_shipped_policies = policy_dir  # Sandbox's parameter of the same name shadows the function

#: ``(host path, path inside the jail, writable)``.
BindMount = tuple[str | os.PathLike[str], str | os.PathLike[str], bool]


# -- wire format ---------------------------------------------------------------------------------


class Command(TaggedUnion):
    """Main process -> device process (crosvm's ``Command``)."""


class Read(Command):
    len: u32
    offset: u64


class Write(Command):
    len: u32
    offset: u64
    data: Annotated[bytes, FixedBytes(8)]


class ReadConfig(Command):
    reg_idx: u32


class WriteConfig(Command):
    reg_idx: u32
    offset: u32
    len: u32
    data: Annotated[bytes, FixedBytes(4)]


class Shutdown(Command):
    pass


class ResizeDisk(Command):
    """Not in crosvm's ``Command`` (it has a separate disk control socket): tag 5, after the
    crosvm-compatible variants, so ``crosvm disk resize`` reaches a sandboxed block device."""

    new_size: u64


class CommandResult(TaggedUnion):
    """Device process -> main process."""


class Ok(CommandResult):
    pass


class ReadResult(CommandResult):
    data: Annotated[bytes, FixedBytes(8)]


class ReadConfigResult(CommandResult):
    value: u32


class Failed(CommandResult):
    errno: u32


class DeviceRequest(TaggedUnion):
    """Main process -> device process, on the control socket (VMM control requests)."""


class AdjustBalloon(DeviceRequest):
    num_bytes: u64


class GetBalloonStats(DeviceRequest):
    timeout_ms: u32


#: Stats tags a :class:`BalloonReport` carries (virtio defines 0..9; others are dropped).
BALLOON_STAT_SLOTS = 16


class DeviceResponse(TaggedUnion):
    """Device process -> main process, on the control socket."""


class DeviceOk(DeviceResponse):
    pass


class DeviceFailed(DeviceResponse):
    errno: u32


class BalloonReport(DeviceResponse):
    """``actual_pages`` from the driver; ``values[t]`` is stats tag ``t`` when bit ``t`` of
    ``present`` is set; ``stats_enabled`` False: the driver has no stats queue."""

    actual_pages: u32
    stats_enabled: bool
    present: u16
    values: Annotated[tuple[u64, ...], Array(BALLOON_STAT_SLOTS)]


class IrqRequest(TaggedUnion):
    """Device process -> main process: the :class:`~devices.irq.IrqRouter` calls."""


class AllocateGsi(IrqRequest):
    pass


class ReleaseGsi(IrqRequest):
    gsi: u32


class SetMsiRoute(IrqRequest):
    gsi: u32
    address: u64
    data: u32


class RegisterIrqfd(IrqRequest):
    evt: EventFd
    gsi: u32
    resample: EventFd | None


class UnregisterIrqfd(IrqRequest):
    evt: EventFd
    gsi: u32


class IrqResponse(TaggedUnion):
    """Main process -> device process."""


class IrqOk(IrqResponse):
    pass


class IrqGsi(IrqResponse):
    gsi: u32


class IrqErr(IrqResponse):
    errno: u32


def _seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    # Plain sockets (not sys_util.UnixSeqpacket), so a MsgSocket owns exactly one fd: the one a
    # jail must keep.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


# -- the device side of the IRQ socket -------------------------------------------------------------


class IrqRouterClient:
    """An :class:`~devices.irq.IrqRouter` for a device that will live in a jailed process.

    Until the fork it calls the real router directly (nothing is sandboxed yet); in the device
    process it sends each call to the main process's :class:`IrqRouterServer` and waits for
    the answer.
    """

    def __init__(self, direct: IrqRouter, sock: socket.socket, timeout: float = 5.0) -> None:
        self._direct: IrqRouter | None = direct
        self._sock: MsgSocket[IrqRequest, IrqResponse] = MsgSocket(
            sock, IrqRequest, IrqResponse, send_timeout=timeout, recv_timeout=timeout
        )
        self._lock = threading.Lock()
        self._detached = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def go_remote(self) -> None:
        """From now on, ask the main process (called in the device process after the fork)."""
        self._direct = None

    def detach(self) -> None:
        """Stop asking (device shutdown): releases become no-ops, as the main process's
        :class:`IrqRouterServer` releases everything the device held when it closes."""
        self._detached = True

    def _call(self, request: IrqRequest) -> IrqResponse:
        if self._detached:
            if isinstance(request, AllocateGsi | SetMsiRoute | RegisterIrqfd):
                raise OSError(errno.ESHUTDOWN, "the device is shutting down")
            return IrqOk()
        with self._lock:
            self._sock.send(request)
            reply = self._sock.recv()
        if isinstance(reply, IrqErr):
            raise OSError(reply.errno, f"{os.strerror(reply.errno)} (from IRQ router: {request})")
        return reply

    def allocate_gsi(self) -> int:
        if self._direct is not None:
            return self._direct.allocate_gsi()
        reply = self._call(AllocateGsi())
        if not isinstance(reply, IrqGsi):
            raise OSError(errno.EPROTO, f"unexpected IRQ router reply {reply!r}")
        return reply.gsi

    def release_gsi(self, gsi: int) -> None:
        if self._direct is not None:
            self._direct.release_gsi(gsi)
        else:
            self._call(ReleaseGsi(gsi))

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        if self._direct is not None:
            self._direct.set_msi_route(gsi, address, data)
        else:
            self._call(SetMsiRoute(gsi, address, data))

    def register_irqfd(
        self, evt: FileDescriptorLike, gsi: int, resample_evt: FileDescriptorLike | None = None
    ) -> None:
        if self._direct is not None:
            self._direct.register_irqfd(evt, gsi, resample_evt)
            return
        sent, resample = _as_eventfd(evt), _as_eventfd(resample_evt)
        assert sent is not None
        try:
            self._call(RegisterIrqfd(sent, gsi, resample))
        finally:
            for mine, given in ((sent, evt), (resample, resample_evt)):
                if mine is not None and mine is not given:
                    mine.close()

    def unregister_irqfd(self, evt: FileDescriptorLike, gsi: int) -> None:
        if self._direct is not None:
            self._direct.unregister_irqfd(evt, gsi)
        else:
            sent = _as_eventfd(evt)
            assert sent is not None
            try:
                self._call(UnregisterIrqfd(sent, gsi))
            finally:
                if sent is not evt:
                    sent.close()

    def close(self) -> None:
        self._sock.close()


def _as_eventfd(evt: FileDescriptorLike | None) -> EventFd | None:
    """The eventfd to send: ``evt`` itself, or an ``EventFd`` around a duplicate of its fd."""
    if evt is None or isinstance(evt, EventFd):
        return evt
    fd = os.dup(evt.fileno())
    try:
        return EventFd.from_fd(fd)
    except BaseException:
        os.close(fd)
        raise


# -- the main-process side of the IRQ socket -------------------------------------------------------


class IrqRouterServer:
    """Serves one device process's :class:`IrqRouterClient` with the real router.

    The main loop polls :meth:`fileno` and calls :meth:`on_readable`. A device process is not
    trusted: it may only release, route and attach irqfds to GSIs it allocated itself, at most
    :data:`MAX_GSIS_PER_DEVICE` of them; anything else is answered with ``EPERM``/``ENOSPC``.
    """

    def __init__(self, router: IrqRouter, sock: socket.socket, label: str) -> None:
        self._router = router
        self._sock: MsgSocket[IrqResponse, IrqRequest] = MsgSocket(
            sock, IrqResponse, IrqRequest, send_timeout=DEFAULT_TIMEOUT, recv_timeout=1.0
        )
        self.label = label
        self._gsis: set[int] = set()
        self._evts: dict[tuple[int, int], EventFd] = {}  # (gsi, fd) -> evt we received
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def gsis(self) -> frozenset[int]:
        return frozenset(self._gsis)

    def fileno(self) -> int:
        return self._sock.fileno()

    def on_readable(self) -> None:
        """Answer one request (a hang-up or a malformed request closes the server)."""
        if self._closed:
            return
        try:
            request = self._sock.recv(timeout=0)
        except Disconnected:
            self.close()
            return
        except MsgError as err:
            logger.error("device %s: bad IRQ router request: %s", self.label, err)
            self.close()
            return
        try:
            reply = self._handle(request)
        except OSError as err:
            reply = IrqErr(err.errno or errno.EINVAL)
        except Exception as err:  # the router refused: tell the device, keep the VMM alive
            logger.warning("device %s: IRQ router refused %s: %s", self.label, request, err)
            reply = IrqErr(errno.EINVAL)
        try:
            self._sock.send(reply)
        except MsgError as err:
            logger.error("device %s: IRQ router reply failed: %s", self.label, err)
            self.close()

    def _own(self, gsi: int) -> None:
        if gsi not in self._gsis:
            raise OSError(errno.EPERM, f"GSI {gsi} does not belong to {self.label}")

    def _handle(self, request: IrqRequest) -> IrqResponse:
        match request:
            case AllocateGsi():
                if len(self._gsis) >= MAX_GSIS_PER_DEVICE:
                    return IrqErr(errno.ENOSPC)
                gsi = self._router.allocate_gsi()
                self._gsis.add(gsi)
                return IrqGsi(gsi)
            case ReleaseGsi(gsi=gsi):
                self._own(gsi)
                self._router.release_gsi(gsi)
                self._gsis.discard(gsi)
                return IrqOk()
            case SetMsiRoute(gsi=gsi, address=address, data=data):
                self._own(gsi)
                self._router.set_msi_route(gsi, address, data)
                return IrqOk()
            case RegisterIrqfd(evt=evt, gsi=gsi, resample=resample):
                try:
                    self._own(gsi)
                    self._router.register_irqfd(evt, gsi, resample)
                except BaseException:
                    evt.close()
                    raise
                finally:
                    if resample is not None:
                        resample.close()
                old = self._evts.pop((gsi, evt.fileno()), None)
                if old is not None:
                    old.close()
                self._evts[(gsi, evt.fileno())] = evt  # the router may keep using it
                return IrqOk()
            case UnregisterIrqfd(evt=evt, gsi=gsi):
                try:
                    self._own(gsi)
                    kept = [e for (g, _), e in self._evts.items() if g == gsi]
                    target = _same_file(evt, kept)
                    self._router.unregister_irqfd(target or evt, gsi)
                    if target is not None:
                        del self._evts[(gsi, target.fileno())]
                        target.close()
                finally:
                    evt.close()
                return IrqOk()
        return IrqErr(errno.EINVAL)

    def close(self) -> None:
        """Release every irqfd and GSI the device still holds, and the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        for (gsi, _), evt in self._evts.items():
            try:
                self._router.unregister_irqfd(evt, gsi)
            except Exception:  # the VM may already be gone at teardown
                logger.debug("%s: unregistering GSI %d failed", self.label, gsi, exc_info=True)
            evt.close()
        self._evts.clear()
        for gsi in sorted(self._gsis):
            try:
                self._router.release_gsi(gsi)
            except Exception:
                logger.debug("%s: releasing GSI %d failed", self.label, gsi, exc_info=True)
        self._gsis.clear()


def _same_file(evt: EventFd, candidates: list[EventFd]) -> EventFd | None:
    st = os.fstat(evt.fileno())
    for c in candidates:
        other = os.fstat(c.fileno())
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return c
    return None


# -- device deaths ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceDeath:
    label: str
    pid: int
    exit: JailExit

    @property
    def message(self) -> str:
        return f"device {self.label} (pid {self.pid}) died: {self.exit}"


class ChildMonitor:
    """Watches the device processes (one pidfd each, behind one pollable epoll fd).

    The main loop polls :meth:`fileno` and calls :meth:`on_readable`, which reaps every dead
    child, logs ``device <label> (pid N) died: ...`` and calls ``on_death`` (the VMM should
    stop). Children stopped on purpose (:meth:`expect_exit`) are reaped quietly.
    """

    def __init__(self, on_death: Callable[[DeviceDeath], None] | None = None) -> None:
        self.on_death = on_death
        self._epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self._children: dict[int, tuple[int, str, SeccompReport | None]] = {}  # pidfd -> ...
        self._expected: set[int] = set()
        self.deaths: list[DeviceDeath] = []

    def fileno(self) -> int:
        if self._epoll.closed:
            raise OSError(errno.EBADF, "ChildMonitor is closed")
        return self._epoll.fileno()

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def add(self, pid: int, label: str, report: SeccompReport | None = None) -> None:
        pidfd = os.pidfd_open(pid)
        self._children[pidfd] = (pid, label, report)
        self._epoll.register(pidfd, select.EPOLLIN)

    def expect_exit(self, pid: int) -> None:
        self._expected.add(pid)

    def pids(self) -> list[int]:
        return [pid for pid, _, _ in self._children.values()]

    def on_readable(self) -> list[DeviceDeath]:
        deaths = []
        for pidfd, _ in self._epoll.poll(0):
            pid, label, report = self._children[pidfd]
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped, status = pid, 0
            if reaped == 0:
                continue
            self._forget(pidfd)
            exit_ = decode_wait_status(pid, status, report)
            if report is not None:
                report.close()
            if pid in self._expected:
                self._expected.discard(pid)
                continue
            death = DeviceDeath(label, pid, exit_)
            logger.error("%s", death.message)
            self.deaths.append(death)
            deaths.append(death)
            if self.on_death is not None:
                self.on_death(death)
        return deaths

    def _forget(self, pidfd: int) -> None:
        self._epoll.unregister(pidfd)
        os.close(pidfd)
        del self._children[pidfd]

    def wait(self, pid: int, timeout: float) -> JailExit | None:
        """Reap ``pid`` (expected to exit) within ``timeout`` s; ``None`` if it did not."""
        for pidfd, (p, _, report) in list(self._children.items()):
            if p != pid:
                continue
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if not ready:
                return None
            _, status = os.waitpid(pid, 0)
            self._forget(pidfd)
            self._expected.discard(pid)
            exit_ = decode_wait_status(pid, status, report)
            if report is not None:
                report.close()
            return exit_
        return None

    def close(self) -> None:
        for pidfd, (_, _, report) in list(self._children.items()):
            if report is not None:
                report.close()
            self._forget(pidfd)
        self._epoll.close()

    def __enter__(self) -> ChildMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the proxy -------------------------------------------------------------------------------------


class ProxiedDevice(Protocol):
    """What a device needs to be sandboxed (``devices.virtio.VirtioPciDevice`` is one)."""

    def debug_label(self) -> str: ...

    def read_config_register(self, reg_idx: int) -> int: ...

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None: ...

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def allocate_bars(self, allocator: BarAllocator) -> list[PciBar]: ...

    def ioevents(self) -> list[IoEvent]: ...

    def assign_irq(
        self, irq_evt: EventFd, resample_evt: EventFd | None, line: int, pin: int
    ) -> None: ...

    def keep_fds(self) -> list[int]: ...

    def close(self) -> None: ...


class ProxyDevice:
    """The main process's stand-in for a PCI device that runs in a jailed process.

    Implements arch's ``PlaceablePciDevice``. Before :meth:`start` every call goes to the real
    device (placement: BARs, ioevents, INTx); after it, bus and config accesses travel over the
    bus socket, while BAR placement is frozen.
    """

    def __init__(
        self,
        device: ProxiedDevice,
        jail: Minijail,
        *,
        memory: GuestMemory | None = None,
        irq_client: IrqRouterClient | None = None,
        keep_fds: list[int] | tuple[int, ...] = (),
        timeout: float = DEFAULT_TIMEOUT,
        monitor: ChildMonitor | None = None,
    ) -> None:
        self._device = device
        self._jail = jail
        self._memory = memory
        self._irq_client = irq_client
        self._extra_keep = list(keep_fds)
        self._timeout = timeout
        self._monitor = monitor
        self._label = device.debug_label()
        self._intx_fds: list[int] = []
        self._lock = threading.Lock()
        self._sock: MsgSocket[Command, CommandResult] | None = None
        # The control socket exists only for devices that take VMM control requests.
        self._has_control = isinstance(getattr(device, "device", device), BalloonControl)
        self._ctl_lock = threading.Lock()
        self._ctl: MsgSocket[DeviceRequest, DeviceResponse] | None = None
        self._pid: int | None = None
        self._dead = False
        self._closed = False

    # -- identity / placement (before start: the real device) ---------------------------------

    def debug_label(self) -> str:
        return self._label

    @property
    def pid(self) -> int | None:
        """The pid of the device process (``None`` before :meth:`start`)."""
        return self._pid

    @property
    def started(self) -> bool:
        return self._pid is not None

    @property
    def alive(self) -> bool:
        return self._pid is not None and not self._dead and not self._closed

    @property
    def device(self) -> ProxiedDevice:
        """The in-process device object (only meaningful before :meth:`start`)."""
        return self._device

    def allocate_bars(self, allocator: BarAllocator) -> list[PciBar]:
        if self.started:
            raise RuntimeError(f"{self._label}: BARs are placed before the device is forked")
        return self._device.allocate_bars(allocator)

    def ioevents(self) -> list[IoEvent]:
        return self._device.ioevents()

    def assign_irq(
        self, irq_evt: EventFd, resample_evt: EventFd | None, line: int, pin: int
    ) -> None:
        if self.started:
            raise RuntimeError(f"{self._label}: INTx is assigned before the device is forked")
        self._device.assign_irq(irq_evt, resample_evt, line, pin)
        self._intx_fds = [irq_evt.fileno()] + ([resample_evt.fileno()] if resample_evt else [])

    def keep_fds(self) -> list[int]:
        """Every fd the device process keeps (the jail closes the rest)."""
        fds = list(self._device.keep_fds()) + self._intx_fds + self._extra_keep
        if self._memory is not None:
            fds += self._memory.keep_fds()
        if self._irq_client is not None:
            fds.append(self._irq_client.fileno())
        fds += logging_fds()
        fds.append(2)
        return sorted(set(fds))

    # -- process ---------------------------------------------------------------------------

    def start(self) -> int:
        """Fork the device into its jail; return the pid. Single-threaded callers only."""
        if self.started:
            raise RuntimeError(f"{self._label}: already started")
        if self._closed:
            raise OSError(errno.EBADF, "ProxyDevice is closed")
        parent_end, child_end = _seqpacket_pair()
        ctl_parent, ctl_child = _seqpacket_pair() if self._has_control else (None, None)
        ends = [e for e in (parent_end, child_end, ctl_parent, ctl_child) if e is not None]
        gc.collect()  # nothing unreachable may be finalised (closing fds) inside the child
        try:
            kept = [*self.keep_fds(), child_end.fileno()]
            if ctl_child is not None:
                kept.append(ctl_child.fileno())
            pid = self._jail.fork(keep_fds=kept)
        except BaseException:
            for end in ends:
                end.close()
            raise
        if pid == 0:  # pragma: no cover - the device process; exercised by the proxy tests
            self._child_main(child_end, ctl_child)
        child_end.close()
        if ctl_child is not None and ctl_parent is not None:
            ctl_child.close()
            self._ctl = MsgSocket(ctl_parent, DeviceRequest, DeviceResponse)
        self._pid = pid
        self._sock = MsgSocket(
            parent_end,
            Command,
            CommandResult,
            send_timeout=self._timeout,
            recv_timeout=self._timeout,
        )
        if self._irq_client is not None:
            self._irq_client.close()  # the main process serves the other end
        if self._monitor is not None:
            self._monitor.add(pid, self._label, self._jail.take_report(pid))
        return pid

    def _child_main(
        self, child_end: socket.socket, ctl_end: socket.socket | None
    ) -> None:  # pragma: no cover - in the child
        code = 1
        try:
            gc.freeze()  # objects inherited from the parent are never finalised here
            if self._irq_client is not None:
                self._irq_client.go_remote()
            sock: MsgSocket[CommandResult, Command] = MsgSocket(child_end, CommandResult, Command)
            if ctl_end is not None:
                ctl: MsgSocket[DeviceResponse, DeviceRequest] = MsgSocket(
                    ctl_end, DeviceResponse, DeviceRequest
                )
                threading.Thread(
                    target=_serve_control,
                    args=(self._device, ctl, self._label),
                    name=f"{self._label}-control",
                    daemon=True,
                ).start()
            code = _serve(self._device, sock, self._label, self._irq_client)
        except BaseException:
            logger.exception("device %s: device process failed", self._label)
        finally:
            os._exit(code)

    # -- bus calls (vCPU threads) ------------------------------------------------------------

    def _call(self, command: Command) -> CommandResult | None:
        if self._dead or self._closed or self._sock is None:
            return None
        with self._lock:
            try:
                self._sock.send(command)
                return self._sock.recv()
            except EncodeError as err:  # our own bad argument: nothing was sent
                logger.warning("device %s: cannot send %r: %s", self._label, command, err)
                return None
            except (MsgError, OSError) as err:
                if not self._dead:
                    self._dead = True
                    logger.error(
                        "device %s (pid %s): proxy call failed (%s); "
                        "its registers now read as all ones",
                        self._label,
                        self._pid,
                        err,
                    )
                return None

    def read(self, offset: int, size: int) -> bytes:
        if not self.started:
            return self._device.read(offset, size)
        out = bytearray()
        while len(out) < size:
            n = min(8, size - len(out))
            reply = self._call(Read(n, offset + len(out)))
            if isinstance(reply, ReadResult):
                out += reply.data[:n]
            else:
                out += b"\xff" * n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if not self.started:
            self._device.write(offset, data)
            return
        for i in range(0, len(data), 8):
            chunk = bytes(data[i : i + 8])
            self._call(Write(len(chunk), offset + i, chunk.ljust(8, b"\0")))

    def read_config_register(self, reg_idx: int) -> int:
        if not self.started:
            return self._device.read_config_register(reg_idx)
        reply = self._call(ReadConfig(reg_idx))
        return reply.value if isinstance(reply, ReadConfigResult) else 0xFFFF_FFFF

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        if not self.started:
            self._device.write_config_register(reg_idx, offset, data)
            return
        if not (0 <= offset < 4 and 0 < len(data) <= 4 - offset):
            return
        self._call(WriteConfig(reg_idx, offset, len(data), bytes(data).ljust(4, b"\0")))

    def resize_disk(self, new_size: int) -> None:
        """Resize the disk of a block device (``crosvm disk resize``), wherever it runs.

        Raises ``OSError`` with the device's errno, ``ENOTTY`` if the device has no disk, or
        ``EIO`` if the device process is gone.
        """
        if not 0 <= new_size < 1 << 64:
            raise OSError(errno.EINVAL, f"invalid disk size {new_size}")
        if not self.started:
            _resize_in_process(self._device, new_size)
            return
        reply = self._call(ResizeDisk(new_size))
        if isinstance(reply, Failed):
            raise OSError(reply.errno, f"{os.strerror(reply.errno)} (resizing {self._label})")
        if not isinstance(reply, Ok):
            raise OSError(errno.EIO, f"device {self._label} did not answer the resize")

    # -- VMM control requests (the control socket) -----------------------------------------------

    def _control(self, request: DeviceRequest, wait: float) -> DeviceResponse:
        """Send one control request and wait ``wait`` s (plus a margin) for the answer.

        A device that does not answer in time loses its control socket (a late answer would
        be taken for the next request's); its bus keeps working.
        """
        with self._ctl_lock:
            ctl = self._ctl
            if ctl is None or self._dead or self._closed:
                raise OSError(errno.EIO, f"device {self._label} takes no control requests now")
            try:
                ctl.send(request, timeout=self._timeout)
                reply = ctl.recv(timeout=wait + min(self._timeout, 1.0))
            except (MsgError, OSError) as err:
                self._ctl = None
                ctl.close()
                logger.error("device %s: control request failed (%s)", self._label, err)
                raise OSError(errno.EIO, f"device {self._label} did not answer") from None
        if isinstance(reply, DeviceFailed):
            raise OSError(reply.errno, f"{os.strerror(reply.errno)} (from {self._label})")
        return reply

    def balloon_adjust(self, num_bytes: int) -> None:
        """Set the balloon target (``crosvm balloon SIZE``), wherever the device runs.

        Raises ``OSError``: ``ENOTTY`` if the device is not a balloon, ``EIO`` if its process
        does not answer.
        """
        if not 0 <= num_bytes < 1 << 64:
            raise OSError(errno.EINVAL, f"invalid balloon size {num_bytes}")
        if not self.started:
            balloon_adjust(self._device, num_bytes)
            return
        if not self._has_control:
            raise OSError(errno.ENOTTY, f"{self._label} is not a balloon")
        reply = self._control(AdjustBalloon(num_bytes), 0.0)
        if not isinstance(reply, DeviceOk):
            raise OSError(errno.EPROTO, f"unexpected reply {reply!r} from {self._label}")

    def balloon_stats(self, timeout: float) -> BalloonState:
        """The balloon's size and fresh guest statistics (``crosvm balloon_stats``).

        Waits at most ``timeout`` s for the guest (plus at most a second for the device
        process); ``OSError(ETIMEDOUT)`` if the driver did not answer.
        """
        if not self.started:
            return balloon_state(self._device, timeout)
        if not self._has_control:
            raise OSError(errno.ENOTTY, f"{self._label} is not a balloon")
        ms = max(0, min(int(timeout * 1000), 0xFFFF_FFFF))
        reply = self._control(GetBalloonStats(ms), timeout)
        if not isinstance(reply, BalloonReport):
            raise OSError(errno.EPROTO, f"unexpected reply {reply!r} from {self._label}")
        return _decode_balloon(reply)

    # -- teardown ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Ask the device process to stop (``Shutdown``), reap it (SIGKILL after the timeout),
        then release this process's copies of the device's fds. Idempotent."""
        if self._closed:
            return
        pid = self._pid
        if pid is not None and self._sock is not None:
            if self._monitor is not None:
                self._monitor.expect_exit(pid)
            self._call(Shutdown())
            self._closed = True
            self._sock.close()
            with self._ctl_lock:
                if self._ctl is not None:
                    self._ctl.close()
                    self._ctl = None
            self._reap(pid)
        self._closed = True
        if self._irq_client is not None:
            self._irq_client.close()
        try:
            self._device.close()
        except Exception:  # the parent's copy only holds fds; never fail a teardown
            logger.debug("%s: closing the in-process copy failed", self._label, exc_info=True)

    def _reap(self, pid: int) -> None:
        exit_: JailExit | None = None
        if self._monitor is not None and pid in self._monitor.pids():
            exit_ = self._monitor.wait(pid, self._timeout)
            if exit_ is None:
                _kill(pid)
                exit_ = self._monitor.wait(pid, self._timeout)
        else:
            try:
                exit_ = _wait(pid, self._timeout)
            except (ChildProcessError, ProcessLookupError):
                return  # already reaped by the monitor
        if exit_ is not None and not exit_.success:
            logger.info("device %s (pid %d) ended: %s", self._label, pid, exit_)

    def __enter__(self) -> ProxyDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(pid: int, timeout: float) -> JailExit:
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            _kill(pid)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return decode_wait_status(pid, status)


def _resize_in_process(device: object, new_size: int) -> None:
    inner = getattr(device, "device", device)
    resize = getattr(inner, "resize", None)
    if not callable(resize):
        raise OSError(errno.ENOTTY, f"{getattr(device, 'debug_label', lambda: '?')()} has no disk")
    resize(new_size)


@runtime_checkable
class BalloonControl(Protocol):
    """What the VMM's balloon commands need of a device (``devices.virtio.balloon.Balloon``)."""

    @property
    def actual(self) -> int: ...

    @property
    def stats_enabled(self) -> bool: ...

    def set_target_bytes(self, num_bytes: int) -> None: ...

    def request_stats(self, timeout: float) -> dict[int, int] | None: ...


@dataclass(frozen=True)
class BalloonState:
    """A balloon's answer to ``balloon_stats``: the pages the driver holds, and the guest's
    statistics ``{tag: value}`` (``None``: its driver does not use the stats queue)."""

    actual_pages: int
    stats: dict[int, int] | None


def _balloon_of(device: object) -> BalloonControl:
    inner = getattr(device, "device", device)
    if not isinstance(inner, BalloonControl):
        raise OSError(errno.ENOTTY, "the device is not a balloon")
    return inner


def balloon_adjust(device: object, num_bytes: int) -> None:
    """Set the balloon target of ``device`` (a balloon or its PCI transport), in this process."""
    if not 0 <= num_bytes < 1 << 64:
        raise OSError(errno.EINVAL, f"invalid balloon size {num_bytes}")
    _balloon_of(device).set_target_bytes(num_bytes)


def balloon_state(device: object, timeout: float) -> BalloonState:
    """Ask the guest for fresh statistics (when its driver uses the stats queue), in this
    process. ``OSError(ETIMEDOUT)`` if the driver did not answer within ``timeout`` s."""
    balloon = _balloon_of(device)
    stats: dict[int, int] | None = None
    if balloon.stats_enabled:
        stats = balloon.request_stats(timeout)
        if stats is None:
            raise OSError(errno.ETIMEDOUT, "the guest did not answer the statistics request")
    return BalloonState(balloon.actual, stats)


def _encode_balloon(state: BalloonState) -> BalloonReport:
    values = [0] * BALLOON_STAT_SLOTS
    present = 0
    for tag, value in (state.stats or {}).items():
        if 0 <= tag < BALLOON_STAT_SLOTS:  # guest-chosen tags: unknown ones are dropped
            values[tag] = value & 0xFFFF_FFFF_FFFF_FFFF
            present |= 1 << tag
    return BalloonReport(
        state.actual_pages & 0xFFFF_FFFF, state.stats is not None, present, tuple(values)
    )


def _decode_balloon(report: BalloonReport) -> BalloonState:
    stats = None
    if report.stats_enabled:
        stats = {t: report.values[t] for t in range(BALLOON_STAT_SLOTS) if report.present >> t & 1}
    return BalloonState(report.actual_pages, stats)


def _serve_control(
    device: ProxiedDevice, sock: MsgSocket[DeviceResponse, DeviceRequest], label: str
) -> None:  # pragma: no cover - a thread of the device process
    """The device process's control thread: one request in, one response out, until hang-up."""
    while True:
        try:
            request = sock.recv()
        except Disconnected:
            return
        except MsgError as err:
            logger.error("device %s: bad control request: %s", label, err)
            return
        reply: DeviceResponse
        try:
            match request:
                case AdjustBalloon(num_bytes=n):
                    balloon_adjust(device, n)
                    reply = DeviceOk()
                case GetBalloonStats(timeout_ms=ms):
                    reply = _encode_balloon(balloon_state(device, ms / 1000))
                case _:
                    reply = DeviceFailed(errno.EINVAL)
        except OSError as err:
            reply = DeviceFailed(err.errno or errno.EIO)
        except Exception as err:  # a bad value: that request fails, the device lives on
            logger.warning("device %s: control request %r failed: %s", label, request, err)
            reply = DeviceFailed(errno.EINVAL)
        try:
            sock.send(reply)
        except MsgError:
            return


def _serve(
    device: ProxiedDevice,
    sock: MsgSocket[CommandResult, Command],
    label: str,
    irq_client: IrqRouterClient | None,
) -> int:  # pragma: no cover - runs in the device process
    """The device process's loop: one command in, one result out, until Shutdown or hang-up."""
    while True:
        try:
            command = sock.recv()
        except Disconnected:
            return 0  # the VMM is gone
        except MsgError as err:
            logger.error("device %s: bad command: %s", label, err)
            return 1
        reply: CommandResult
        match command:
            case Read(len=n, offset=offset) if 0 < n <= 8:
                reply = ReadResult(device.read(offset, n).ljust(8, b"\xff")[:8])
            case Write(len=n, offset=offset, data=data) if 0 < n <= 8:
                device.write(offset, data[:n])
                reply = Ok()
            case ReadConfig(reg_idx=reg):
                reply = ReadConfigResult(device.read_config_register(reg) & 0xFFFF_FFFF)
            case WriteConfig(reg_idx=reg, offset=off, len=n, data=data) if off + n <= 4:
                device.write_config_register(reg, off, data[:n])
                reply = Ok()
            case ResizeDisk(new_size=new_size):
                try:
                    _resize_in_process(device, new_size)
                    reply = Ok()
                except OSError as err:
                    reply = Failed(err.errno or errno.EIO)
                except Exception as err:  # e.g. ValueError for an impossible size
                    logger.warning("device %s: resize to %d failed: %s", label, new_size, err)
                    reply = Failed(errno.EINVAL)
            case Shutdown():
                if irq_client is not None:
                    irq_client.detach()  # the main loop may no longer serve requests
                try:
                    device.close()
                finally:
                    sock.send(Ok())
                return 0
            case _:
                reply = Ok() if not isinstance(command, Read) else ReadResult(b"\xff" * 8)
        sock.send(reply)


# -- the sandbox -----------------------------------------------------------------------------------

C = TypeVar("C")


class Sandbox:
    """Jails PCI devices for one VM and gives the main loop what it must poll.

    Usage (``crosvm run`` with the sandbox on)::

        sandbox = Sandbox(log_failures=cfg.seccomp_log_failures,
                          on_device_death=lambda d: state.stop(StopReason.X, d.message))
        factories = [sandbox.sandboxed(f, "block_device") for f in factories]
        vm = build_vm(VmConfig(..., pci_devices=factories))
        sandbox.start()                       # fork + jail every device: before vCPU threads
        sources = sandbox.sources()           # [(fd, on_readable)]: IRQ servers + monitor
        ... MainLoop(..., sources=sources) ...
        vm.close(); sandbox.close()
    """

    def __init__(
        self,
        *,
        policy_dir: str | os.PathLike[str] | None = None,
        log_failures: bool = False,
        pivot_root: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        on_device_death: Callable[[DeviceDeath], None] | None = None,
        seccomp: bool = True,
    ) -> None:
        self.policy_dir = Path(policy_dir) if policy_dir is not None else _shipped_policies()
        self.log_failures = log_failures
        self.timeout = timeout
        self.seccomp = seccomp
        self._own_root: str | None = None
        if pivot_root is None:
            self._own_root = tempfile.mkdtemp(prefix="crosvm-jail-")
            pivot_root = self._own_root
        self.pivot_root = os.fspath(pivot_root)
        self.monitor = ChildMonitor(on_device_death)
        self.proxies: list[ProxyDevice] = []
        self.servers: list[IrqRouterServer] = []
        self._closed = False

    def jail(self, policy: str | None, bind_mounts: Sequence[BindMount] = ()) -> Minijail:
        """crosvm's ``create_base_minijail`` plus the device's policy (``<name>.policy``) and
        its bind mounts ``(host path, path in the jail, writable)``."""
        jail = (
            Minijail()
            .namespace_user()
            .namespace_pids()
            .namespace_vfs()
            .enter_pivot_root(self.pivot_root)
            .namespace_net()
            .namespace_ipc()
            .use_caps(0)
            .no_new_privs()
            .run_as_init()
        )
        for src, dst, writable in bind_mounts:
            jail.bind_mount(src, dst, writable)
        if self.seccomp and policy is not None:
            jail.parse_seccomp_filters(self.policy_dir / f"{policy}.policy")
            if self.log_failures:
                jail.log_seccomp_failures()
        return jail

    def sandboxed(
        self,
        factory: Callable[[C], Any],
        policy: str | None,
        *,
        bind_mounts: Sequence[BindMount] = (),
    ) -> Callable[[C], ProxyDevice]:
        """Wrap a PCI device factory (``ctx -> device``): the device it builds will run in a
        jail with ``policy`` (e.g. ``"block_device"``; ``None``: no seccomp filter), seeing
        only the host paths of ``bind_mounts`` (``(src, dst, writable)``, e.g. the directory of
        virtio-vsock's Unix sockets).

        ``ctx`` must have ``memory`` and ``irq_router`` attributes (arch's ``VmContext``); the
        factory sees a copy whose ``irq_router`` forwards to the main process after the fork.
        """
        jail = self.jail(policy, bind_mounts)  # a bad policy fails now, before the VM

        def build(ctx: C) -> ProxyDevice:
            router: IrqRouter = ctx.irq_router  # type: ignore[attr-defined]
            memory: GuestMemory | None = getattr(ctx, "memory", None)
            dev_end, main_end = _seqpacket_pair()
            client = IrqRouterClient(router, dev_end, self.timeout * 2)
            try:
                inner_ctx = _with_router(ctx, client)
                device = factory(inner_ctx)
            except BaseException:
                client.close()
                main_end.close()
                raise
            proxy = ProxyDevice(
                device,
                jail,
                memory=memory,
                irq_client=client,
                timeout=self.timeout,
                monitor=self.monitor,
            )
            self.servers.append(IrqRouterServer(router, main_end, proxy.debug_label()))
            self.proxies.append(proxy)
            return proxy

        return build

    def start(self) -> None:
        """Fork every device built so far into its jail.

        Call it from the main thread (the device processes get SIGKILL when the thread that
        forked them exits: ``PR_SET_PDEATHSIG``), after ``build_vm`` and before any other thread
        starts (vCPUs, serial input threads): :class:`~io_jail.NotSingleThreaded` otherwise.
        """
        for proxy in self.proxies:
            if not proxy.started:
                proxy.start()

    def sources(self) -> list[tuple[int, Callable[[], None]]]:
        """``(fd, on_readable)`` pairs for the main loop: each IRQ server and the monitor."""
        out: list[tuple[int, Callable[[], None]]] = [
            (s.fileno(), s.on_readable) for s in self.servers if not s.closed
        ]
        out.append((self.monitor.fileno(), self._on_monitor))
        return out

    def _on_monitor(self) -> None:
        self.monitor.on_readable()

    def close(self) -> None:
        """Stop every device process, then the servers and the monitor (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for proxy in self.proxies:
            proxy.close()
        for server in self.servers:
            server.close()
        self.monitor.close()
        if self._own_root is not None:
            try:
                os.rmdir(self._own_root)
            except OSError:
                logger.debug("could not remove %s", self._own_root, exc_info=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_router(ctx: C, router: IrqRouter) -> C:
    if dataclasses.is_dataclass(ctx) and not isinstance(ctx, type):
        return dataclasses.replace(ctx, irq_router=router)
    clone = type("SandboxedContext", (), {})()
    clone.__dict__.update(vars(ctx))
    clone.irq_router = router
    return clone  # type: ignore[no-any-return]
