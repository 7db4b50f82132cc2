"""Device -> driver interrupts for a virtio-pci function, without a vCPU thread.

With MSI-X enabled, a queue's vector is raised by writing that vector's irqfd eventfd (masked
vectors become pending bits in the PBA). Without MSI-X, the ISR status bits are set and the INTx
irqfd is written; KVM holds the level until the guest EOIs, then signals the resample eventfd,
and :meth:`Interrupt.resample` re-asserts the line if the ISR is still non-zero (the driver
clears it by reading the ISR register).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from devices.virtio._constants import VIRTIO_MSI_NO_VECTOR, IsrBits

if TYPE_CHECKING:
    from devices.pci import MsixConfig
    from sys_util import EventFd

__all__ = ["Interrupt"]


class Interrupt:
    """Shared by a transport and its device's worker thread (all methods are thread-safe)."""

    def __init__(
        self,
        *,
        msix: MsixConfig | None = None,
        intx_evt: EventFd | None = None,
        resample_evt: EventFd | None = None,
    ) -> None:
        self._msix = msix
        self._intx_evt = intx_evt
        self._resample_evt = resample_evt
        self._lock = threading.Lock()
        self._isr = 0
        #: The PCI command register's Interrupt Disable bit: the function must not assert INTx
        #: while it is set (PCI 3.0, 6.2.2). A polling driver sets it; each INTx irqfd write
        #: would otherwise cost a system call and a kernel worker wake-up per completion.
        self._intx_disabled = False
        #: msix_config of the common configuration (the transport keeps it current).
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        #: Bumped on every device configuration change (read by the transport).
        self.config_generation = 0

    def set_intx(self, intx_evt: EventFd | None, resample_evt: EventFd | None) -> None:
        self._intx_evt = intx_evt
        self._resample_evt = resample_evt

    @property
    def resample_event(self) -> EventFd | None:
        """The eventfd a worker should poll and answer with :meth:`resample`."""
        return self._resample_evt

    def _msix_active(self) -> bool:
        return self._msix is not None and self._msix.enabled

    def _signal(self, vector: int, isr_bit: int) -> None:
        msix = self._msix
        if msix is not None and msix.enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                msix.trigger(vector)
            return
        with self._lock:
            self._isr |= isr_bit
            if self._intx_disabled:
                return  # the ISR keeps the bit; set_intx_disabled(False) asserts the line
        if self._intx_evt is not None:
            self._intx_evt.write(1)

    def set_intx_disabled(self, disabled: bool) -> None:
        """The driver wrote the command register's Interrupt Disable bit. Clearing it while an
        interrupt is pending (ISR non-zero) asserts INTx now."""
        with self._lock:
            was, self._intx_disabled = self._intx_disabled, disabled
            pending = self._isr != 0
        if (
            was
            and not disabled
            and pending
            and self._intx_evt is not None
            and not self._msix_active()
        ):
            self._intx_evt.write(1)

    def signal_used_queue(self, vector: int) -> None:
        """The device put buffers in a used ring whose queue has MSI-X ``vector``."""
        self._signal(vector, IsrBits.QUEUE)

    def signal_config_changed(self) -> None:
        """The device configuration changed (e.g. disk resized): bump generation, notify."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self._signal(self.config_vector, IsrBits.CONFIG)

    def read_and_clear_isr(self) -> int:
        """The ISR register read: returns the bits and clears them (deasserting INTx)."""
        with self._lock:
            value, self._isr = self._isr, 0
        return value

    @property
    def isr(self) -> int:
        return self._isr

    def resample(self) -> None:
        """The guest EOI'd INTx: re-assert if an interrupt is still unacknowledged."""
        if self._resample_evt is not None:
            try:
                self._resample_evt.read()
            except BlockingIOError:
                pass
        with self._lock:
            pending = self._isr != 0 and not self._intx_disabled
        if pending and self._intx_evt is not None and not self._msix_active():
            self._intx_evt.write(1)

    def reset(self) -> None:
        with self._lock:
            self._isr = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
