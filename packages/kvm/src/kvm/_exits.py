"""Typed vCPU exits: what ``Vcpu.run()`` returns, made for ``match``.

Every exit is a frozen, slotted dataclass. Because they are immutable, ``Vcpu.run()`` interns
the common ones (``Hlt``, an ``IoIn`` for a given port/size, an ``IoOut`` with given data...):
a hot PIO loop gets the same object back without allocating.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Debug",
    "FailEntry",
    "Hlt",
    "InternalError",
    "Intr",
    "IoIn",
    "IoOut",
    "IrqWindowOpen",
    "MmioRead",
    "MmioWrite",
    "Shutdown",
    "SystemEvent",
    "Unknown",
    "VcpuExit",
]


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest reads ``size`` bytes (``count`` times, for ``rep ins``) from ``port``.

    Answer with ``Vcpu.set_io_in_data(data)`` (``size * count`` bytes) before the next run.
    """

    port: int
    size: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest wrote ``data`` (``size * count`` bytes) to ``port``."""

    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    """The guest reads ``size`` bytes at guest physical ``addr``; reply with
    ``Vcpu.set_mmio_read_data(data)`` before the next run."""

    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    """The guest wrote ``data`` at guest physical ``addr``."""

    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    """The guest executed ``hlt`` (only without an in-kernel LAPIC)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault (or a ``KVM_EXIT_SHUTDOWN`` for another reason): the guest is dead."""


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    """The guest can take an interrupt now (after ``request_interrupt_window``)."""


@dataclass(frozen=True, slots=True)
class Intr:
    """``KVM_RUN`` was interrupted (``kick()``, a signal, or ``immediate_exit``)."""


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """``KVM_EXIT_SYSTEM_EVENT``: ``type`` is ``KVM_SYSTEM_EVENT_*`` (shutdown, reset, crash...)."""

    type: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not handle the exit (e.g. an emulation failure: ``suberror`` 1)."""

    suberror: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class FailEntry:
    """The hardware refused to enter the guest (invalid guest state)."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class Debug:
    """A guest debug event (``KVM_SET_GUEST_DEBUG``): exception vector, RIP, DR6, DR7."""

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """Any other exit reason (``KVM_EXIT_*``), with ``hw.hardware_exit_reason``."""

    reason: int
    hardware_exit_reason: int = 0


VcpuExit = (
    IoIn
    | IoOut
    | MmioRead
    | MmioWrite
    | Hlt
    | Shutdown
    | IrqWindowOpen
    | Intr
    | SystemEvent
    | InternalError
    | FailEntry
    | Debug
    | Unknown
)
