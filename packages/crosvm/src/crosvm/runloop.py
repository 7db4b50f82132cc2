"""Running a built VM: one thread per vCPU, the main thread waits for the reason to stop.

The vCPU threads only dispatch port and MMIO exits to the buses (virtqueue traffic never comes
here: it arrives by ioeventfd in device workers). Everything that ends or pauses the VM goes
through :class:`RunState`, and every vCPU is kicked (``Vcpu.kick``) so a thread inside
``KVM_RUN`` notices at once.

A guest can wedge itself in ways KVM never reports: ``cli; hlt`` with the in-kernel irqchip
sleeps in the kernel forever. The main loop therefore probes, every few seconds, whether every
vCPU is halted with interrupts disabled (or was never started); seen twice in a row, the run ends
with an error instead of hanging.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import kvm
from kvm import Intr, IoIn, IoOut, MmioRead, MmioWrite, Shutdown, SystemEvent
from sys_util import EventFd, PollContext

log = logging.getLogger("crosvm")

HALT_PROBE_INTERVAL = 2.0  # seconds between probes for a guest halted for good
VCPU_STOP_TIMEOUT = 10.0  # seconds to wait for vCPU threads at exit
_RFLAGS_IF = 1 << 9
_MP_STATE_HALTED = 3  # KVM_MP_STATE_HALTED
_MP_STATE_UNINITIALIZED = 1
_MP_STATE_INIT_RECEIVED = 2
_SYSTEM_EVENT_SHUTDOWN = 1
_SYSTEM_EVENT_RESET = 2
_SYSTEM_EVENT_CRASH = 3


class StopReason(enum.Enum):
    """Why the VM stopped; decides the exit status of ``crosvm run``."""

    RESET = "the guest reset the machine (i8042 or system event)"
    SHUTDOWN = "the guest shut down"
    REQUESTED = "stop was requested"
    SIGNAL = "terminated by a signal"
    TRIPLE_FAULT = "the guest triple-faulted (KVM shutdown exit)"
    HALTED = "every vCPU halted with interrupts disabled: the guest can never resume"
    CRASH = "the guest reported a crash"
    VCPU_ERROR = "a vCPU failed"
    DEVICE_DIED = "a device process died"

    @property
    def ok(self) -> bool:
        return self in (StopReason.RESET, StopReason.SHUTDOWN, StopReason.REQUESTED,
                        StopReason.SIGNAL)  # fmt: skip


@dataclass
class Outcome:
    reason: StopReason
    detail: str = ""


class IoBus(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> object: ...


class RunState:
    """Running / suspended / exiting, shared by the main thread and every vCPU thread."""

    def __init__(self, vcpus: Sequence[kvm.Vcpu]) -> None:
        self._vcpus = vcpus
        self._cond = threading.Condition()
        self.exiting = False
        self.suspended = False
        self.outcome: Outcome | None = None
        self.stopped_evt = EventFd()  # written once, when an outcome is first set
        self.halt_probe = False
        self._halted: dict[int, bool] = {}

    def stop(self, reason: StopReason, detail: str = "") -> None:
        """Record the first reason to stop and make every vCPU leave ``KVM_RUN``."""
        with self._cond:
            if self.outcome is None:
                self.outcome = Outcome(reason, detail)
                self.stopped_evt.write(1)
            self.exiting = True
            self.suspended = False
            self._cond.notify_all()
        self.kick_all()

    def kick_all(self) -> None:
        for vcpu in self._vcpus:
            if not vcpu.closed:
                vcpu.kick()

    def set_suspended(self, suspended: bool) -> None:
        with self._cond:
            if not self.exiting:
                self.suspended = suspended
            self._cond.notify_all()
        if suspended:
            self.kick_all()

    def wait_while_suspended(self, vcpu: kvm.Vcpu) -> None:
        with self._cond:
            if self.suspended and not self.exiting:
                try:  # tell the guest's kvmclock it was paused (no soft-lockup warnings)
                    vcpu.kvmclock_ctrl()
                except OSError:
                    pass
            while self.suspended and not self.exiting:
                self._cond.wait()

    # --- halted-forever probe ----------------------------------------------------------

    def start_halt_probe(self) -> None:
        with self._cond:
            self._halted.clear()
            self.halt_probe = True
        self.kick_all()

    def report_halt_state(self, vcpu_id: int, halted_for_good: bool) -> None:
        with self._cond:
            self._halted[vcpu_id] = halted_for_good

    def halt_probe_result(self) -> bool | None:
        """True: every vCPU answered and is halted for good; None: not every vCPU answered."""
        with self._cond:
            self.halt_probe = False
            if len(self._halted) < len(self._vcpus):
                return None
            return all(self._halted.values())


def _halted_for_good(vcpu: kvm.Vcpu) -> bool:
    state = int(vcpu.get_mp_state())
    if state in (_MP_STATE_UNINITIALIZED, _MP_STATE_INIT_RECEIVED):
        return vcpu.id != 0  # an AP nobody started; the BSP is never in this state
    if state != _MP_STATE_HALTED:
        return False
    return not vcpu.get_regs().rflags & _RFLAGS_IF


def vcpu_loop(vcpu: kvm.Vcpu, io_bus: IoBus, mmio_bus: IoBus, state: RunState) -> None:
    """Run one vCPU until the VM stops. This is the exit-dispatch hot path: keep it lean."""
    vcpu.setup_kick()
    run = vcpu.run
    io_read, io_write = io_bus.read, io_bus.write
    mmio_read, mmio_write = mmio_bus.read, mmio_bus.write
    set_io, set_mmio = vcpu.set_io_in_data, vcpu.set_mmio_read_data
    try:
        while True:
            try:
                exit_ = run()
            except BlockingIOError:  # EAGAIN: an AP left wait-for-SIPI; KVM wants a re-run
                continue
            kind = type(exit_)
            if kind is IoOut:
                assert isinstance(exit_, IoOut)
                if exit_.count == 1:
                    io_write(exit_.port, exit_.data)
                else:
                    size, data = exit_.size, exit_.data
                    for i in range(0, len(data), size):
                        io_write(exit_.port, data[i : i + size])
            elif kind is IoIn:
                assert isinstance(exit_, IoIn)
                if exit_.count == 1:
                    set_io(io_read(exit_.port, exit_.size))
                else:
                    set_io(b"".join(io_read(exit_.port, exit_.size) for _ in range(exit_.count)))
            elif kind is MmioWrite:
                assert isinstance(exit_, MmioWrite)
                mmio_write(exit_.addr, exit_.data)
            elif kind is MmioRead:
                assert isinstance(exit_, MmioRead)
                set_mmio(mmio_read(exit_.addr, exit_.size))
            elif kind is Intr:
                if state.exiting:
                    return
                if state.suspended:
                    state.wait_while_suspended(vcpu)
                if state.halt_probe:
                    state.report_halt_state(vcpu.id, _halted_for_good(vcpu))
            elif kind is Shutdown:
                state.stop(StopReason.TRIPLE_FAULT, f"vCPU {vcpu.id}")
                return
            elif kind is SystemEvent:
                assert isinstance(exit_, SystemEvent)
                reason = {
                    _SYSTEM_EVENT_SHUTDOWN: StopReason.SHUTDOWN,
                    _SYSTEM_EVENT_RESET: StopReason.RESET,
                }.get(exit_.type, StopReason.CRASH)
                state.stop(reason, f"vCPU {vcpu.id}: system event {exit_.type}")
                return
            else:
                state.stop(StopReason.VCPU_ERROR, f"vCPU {vcpu.id}: unexpected exit {exit_!r}")
                return
    except Exception as err:  # a bug or a KVM failure: end the VM with the reason, never hang
        log.exception("vCPU %d failed", vcpu.id)
        state.stop(StopReason.VCPU_ERROR, f"vCPU {vcpu.id}: {type(err).__name__}: {err}")


@dataclass
class MainLoop:
    """The main thread's wait: exit events, signals, extra pollable sources (control socket)."""

    state: RunState
    exit_events: Sequence[EventFd]
    sources: list[tuple[int, Callable[[], None]]] = field(default_factory=list)
    halt_probe_interval: float = HALT_PROBE_INTERVAL

    def run(self) -> Outcome:
        signal_evt = EventFd()
        received: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signum)
            signal_evt.write(1)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        poll: PollContext[int] = PollContext()
        try:
            poll.add(self.state.stopped_evt, -1)
            poll.add(signal_evt, -2)
            for i, evt in enumerate(self.exit_events):
                poll.add(evt, 1000 + i)
            handlers = {}
            for i, (fd, source_handler) in enumerate(self.sources):
                poll.add(fd, i)
                handlers[i] = source_handler
            halted_twice = 0
            while self.state.outcome is None:
                events = poll.wait(self.halt_probe_interval)
                if not events:
                    verdict = self.state.halt_probe_result()
                    halted_twice = halted_twice + 1 if verdict else 0
                    if halted_twice >= 2:
                        self.state.stop(StopReason.HALTED)
                        break
                    self.state.start_halt_probe()
                    continue
                for token, _mask in events:
                    if token >= 1000:
                        self.state.stop(StopReason.RESET)
                    elif token == -2:
                        signal_evt.read()
                        name = signal.Signals(received[-1]).name if received else "?"
                        self.state.stop(StopReason.SIGNAL, name)
                    elif token >= 0:
                        handlers[token]()
        finally:
            for sig, previous_handler in previous.items():
                signal.signal(sig, previous_handler)
            poll.close()
            signal_evt.close()
        assert self.state.outcome is not None
        return self.state.outcome


def start_vcpu_threads(
    vcpus: Sequence[kvm.Vcpu], io_bus: IoBus, mmio_bus: IoBus, state: RunState
) -> list[threading.Thread]:
    threads = []
    for vcpu in vcpus:
        thread = threading.Thread(
            target=vcpu_loop, args=(vcpu, io_bus, mmio_bus, state), name=f"vcpu{vcpu.id}",
            daemon=True,
        )  # fmt: skip
        thread.start()
        threads.append(thread)
    return threads


def join_vcpu_threads(
    threads: Sequence[threading.Thread], state: RunState, timeout: float = VCPU_STOP_TIMEOUT
) -> list[str]:
    """Kick until every vCPU thread has left (a kick can race with entering ``KVM_RUN``).

    A thread stuck in a device call past ``timeout`` is left behind (vCPU threads are daemons)
    so crosvm still exits; the names of such threads are returned for the log.
    """
    deadline = time.monotonic() + timeout
    for thread in threads:
        while thread.is_alive() and time.monotonic() < deadline:
            state.kick_all()
            thread.join(0.05)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    for name in stuck:
        log.error("%s did not stop within %.0f s; exiting without it", name, timeout)
    return stuck


class ServiceThread:
    """Serves ``(fd, on_readable)`` sources on a thread of its own.

    The sandbox's interrupt-routing sockets must be answered even while the main thread is
    blocked in a call to a device process (a control request such as a disk resize): a device
    that is enabling MSI-X in the middle of that call waits for its routes, so serving them from
    the main thread would deadlock the two. A handler that raises is logged; serving goes on.
    """

    def __init__(self, sources: Sequence[tuple[int, Callable[[], None]]], name: str) -> None:
        self._sources = list(sources)
        self._stop = EventFd()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        handlers = dict(enumerate(handler for _, handler in self._sources))
        with PollContext[int]() as poll:
            poll.add(self._stop, -1)
            for token, (fd, _) in enumerate(self._sources):
                poll.add(fd, token)
            while True:
                for token, _mask in poll.wait():
                    if token == -1:
                        return
                    try:
                        handlers[token]()
                    except Exception:
                        log.exception("%s: handler failed", self._thread.name)

    def stop(self) -> None:
        """Stop serving and wait for the thread (idempotent)."""
        if not self._stop.closed:
            if self._thread.is_alive():
                self._stop.write(1)
                self._thread.join(VCPU_STOP_TIMEOUT)
            self._stop.close()
