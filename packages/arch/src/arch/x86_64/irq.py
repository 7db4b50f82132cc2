"""GSI routing over the in-kernel irqchip: the ``devices.irq.IrqRouter`` implementation.

``KVM_SET_GSI_ROUTING`` replaces the whole routing table, so adding one MSI route must resend
every route -- including the irqchip routes KVM installed by default when the irqchip was
created (GSI 0-15 to the PIC and IOAPIC pins 0-15, GSI 16-23 to IOAPIC pins 16-23). Forgetting
them silently disconnects the timer, the serial ports and every INTx line. :class:`KvmIrqRouter`
keeps that table in full: the legacy routes are fixed, MSI routes are added and removed per GSI.

GSIs for MSI vectors are allocated above the IOAPIC's 24 pins.
"""

from __future__ import annotations

import threading

from devices.irq import FileDescriptorLike
from kvm import IrqRoute, IrqRouteIrqchip, IrqRouteMsi, Vm

__all__ = [
    "IOAPIC_NUM_PINS",
    "IRQCHIP_IOAPIC",
    "IRQCHIP_PIC_MASTER",
    "IRQCHIP_PIC_SLAVE",
    "KvmIrqRouter",
    "default_irqchip_routes",
]

IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2
IOAPIC_NUM_PINS = 24
#: KVM's default routing table size limit is KVM_MAX_IRQ_ROUTES (4096).
DEFAULT_MAX_GSI = 4096


def default_irqchip_routes() -> list[IrqRouteIrqchip]:
    """The routes KVM installs with KVM_CREATE_IRQCHIP (arch/x86/kvm/irq_comm.c)."""
    routes: list[IrqRouteIrqchip] = []
    for gsi in range(IOAPIC_NUM_PINS):
        if gsi < 16:
            chip = IRQCHIP_PIC_MASTER if gsi < 8 else IRQCHIP_PIC_SLAVE
            routes.append(IrqRouteIrqchip(gsi, chip, gsi % 8))
        routes.append(IrqRouteIrqchip(gsi, IRQCHIP_IOAPIC, gsi))
    return routes


class KvmIrqRouter:
    """Routes GSIs on ``vm`` (which must have an in-kernel irqchip). Thread-safe.

    Implements ``devices.irq.IrqRouter``; also used by ``arch`` itself for the legacy irqfds.
    """

    def __init__(self, vm: Vm, *, max_gsi: int = DEFAULT_MAX_GSI, commit: bool = True) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self._legacy: list[IrqRoute] = list(default_irqchip_routes())
        self._msi: dict[int, IrqRouteMsi | None] = {}  # allocated GSI -> route (None: unset)
        self._next = IOAPIC_NUM_PINS
        self._free: list[int] = []
        self._max_gsi = max_gsi
        if commit:
            self._commit()

    def routes(self) -> list[IrqRoute]:
        """The full table as last sent to KVM."""
        with self._lock:
            return self._table()

    def _table(self) -> list[IrqRoute]:
        table = list(self._legacy)
        table.extend(route for route in self._msi.values() if route is not None)
        return table

    def _commit(self) -> None:
        self._vm.set_gsi_routing(self._table())

    def allocate_gsi(self) -> int:
        """A free GSI above the IOAPIC pins."""
        with self._lock:
            if self._free:
                gsi = min(self._free)
                self._free.remove(gsi)
            elif self._next < self._max_gsi:
                gsi = self._next
                self._next += 1
            else:
                raise OSError(28, f"no free GSI (all {self._max_gsi} in use)")  # ENOSPC
            self._msi[gsi] = None
            return gsi

    def _check(self, gsi: int) -> None:
        if gsi not in self._msi:
            raise ValueError(f"GSI {gsi} was not allocated by this router")

    def release_gsi(self, gsi: int) -> None:
        """Free ``gsi`` and drop its route."""
        with self._lock:
            self._check(gsi)
            route = self._msi.pop(gsi)
            self._free.append(gsi)
            if route is not None:
                self._commit()

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI ``(address, data)``; a no-op when unchanged."""
        route = IrqRouteMsi(gsi, address & 0xFFFF_FFFF_FFFF_FFFF, data & 0xFFFF_FFFF)
        with self._lock:
            self._check(gsi)
            if self._msi[gsi] == route:
                return
            old = self._msi[gsi]
            self._msi[gsi] = route
            try:
                self._commit()
            except BaseException:
                self._msi[gsi] = old
                raise

    def register_irqfd(
        self, evt: FileDescriptorLike, gsi: int, resample_evt: FileDescriptorLike | None = None
    ) -> None:
        """Writing ``evt`` injects ``gsi`` (level-triggered with ``resample_evt``)."""
        self._vm.register_irqfd(evt, gsi, resample_evt)

    def unregister_irqfd(self, evt: FileDescriptorLike, gsi: int) -> None:
        self._vm.unregister_irqfd(evt, gsi)
