"""Interrupt plumbing shared by devices and their owner (``arch``), without importing KVM.

Devices never call KVM (ARCHITECTURE.md): they are handed :class:`~sys_util.EventFd` objects and
describe what must be wired up. Two directions exist:

* guest -> device notifications: a device lists :class:`IoEvent` records; the owner registers each
  one as a KVM ioeventfd so a guest write to that address only signals the eventfd (no vCPU exit
  reaches Python);
* device -> guest interrupts: MSI-X vectors are routed through an :class:`IrqRouter`, which ``arch``
  implements with KVM GSI routing and irqfds; INTx uses one irqfd on the legacy line with a
  resample eventfd (level-triggered semantics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["FileDescriptorLike", "IoEvent", "IrqRouter"]


@runtime_checkable
class FileDescriptorLike(Protocol):
    """Anything with a ``fileno()``: an ``EventFd``, a socket, a file."""

    def fileno(self) -> int: ...


@dataclass(frozen=True, slots=True)
class IoEvent:
    """One ioeventfd the owner must register with KVM.

    ``address`` is an absolute guest-physical MMIO address (or a port when ``pio`` is true).
    ``datamatch`` is ``None`` when any written value must signal the event. ``length`` is the
    access width the guest uses (0 means any width, KVM's "fast MMIO" mode, valid only without
    a datamatch).
    """

    event: FileDescriptorLike
    address: int
    datamatch: int | None = None
    length: int = 0
    pio: bool = False


@runtime_checkable
class IrqRouter(Protocol):
    """How a device asks its owner to route message-signalled interrupts.

    ``arch`` implements this over ``kvm.Vm`` (``KVM_SET_GSI_ROUTING`` + ``KVM_IRQFD``); tests use
    :class:`devices.testing.FakeIrqRouter`. A device calls :meth:`allocate_gsi` once per MSI-X
    vector, :meth:`register_irqfd` with the vector's eventfd, and :meth:`set_msi_route` whenever the
    guest reprograms the vector's address/data. Methods may be called from any thread.
    """

    def allocate_gsi(self) -> int:
        """Reserve a free GSI (above the legacy IRQ lines) and return it."""
        ...

    def release_gsi(self, gsi: int) -> None:
        """Return a GSI obtained from :meth:`allocate_gsi`; its route is removed."""
        ...

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI message (64-bit ``address``, 32-bit ``data``)."""
        ...

    def register_irqfd(
        self, evt: FileDescriptorLike, gsi: int, resample_evt: FileDescriptorLike | None = None
    ) -> None:
        """Make a write to ``evt`` inject ``gsi`` (level-triggered with ``resample_evt``)."""
        ...

    def unregister_irqfd(self, evt: FileDescriptorLike, gsi: int) -> None:
        """Undo :meth:`register_irqfd`."""
        ...
