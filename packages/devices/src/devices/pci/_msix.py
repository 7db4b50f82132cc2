"""MSI-X: the vector table and pending-bit array a driver programs through a BAR.

Each vector owns an :class:`~sys_util.EventFd` registered (by the :class:`~devices.irq.IrqRouter`)
as an irqfd on its own GSI, so raising a vector is one eventfd write from the device's worker
thread and never involves a vCPU thread. Masking is honoured here: a vector raised while masked
(per-entry mask bit or the function mask) only sets its PBA bit, and is delivered when unmasked.
"""

from __future__ import annotations

import logging
import struct
import threading

from devices.irq import IrqRouter
from sys_util import EventFd

__all__ = ["MSIX_CAP_ID", "MSIX_ENTRY_SIZE", "MsixConfig"]

logger = logging.getLogger(__name__)

MSIX_CAP_ID = 0x11
MSIX_ENTRY_SIZE = 16
MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
VECTOR_MASKED = 0x1
_ENTRY = struct.Struct("<IIII")  # addr lo, addr hi, data, vector control


class MsixConfig:
    """State of one function's MSI-X table, PBA and message control."""

    def __init__(self, num_vectors: int, router: IrqRouter, label: str = "msix") -> None:
        if not 1 <= num_vectors <= 2048:
            raise ValueError(f"MSI-X supports 1..2048 vectors, not {num_vectors}")
        self._n = num_vectors
        self._router = router
        self._label = label
        self._lock = threading.Lock()
        # Reset state (PCI spec): every entry masked, address/data 0.
        self._table = bytearray(num_vectors * MSIX_ENTRY_SIZE)
        for v in range(num_vectors):
            _ENTRY.pack_into(self._table, v * MSIX_ENTRY_SIZE, 0, 0, 0, VECTOR_MASKED)
        self._pending = [False] * num_vectors
        self._enabled = False
        self._function_masked = False
        self._evts: list[EventFd] = []
        self._gsis: list[int] = []
        self._closed = False

    # -- geometry --------------------------------------------------------------------------

    @property
    def num_vectors(self) -> int:
        return self._n

    @property
    def table_size(self) -> int:
        return self._n * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self._n + 63) // 64) * 8

    def capability_body(
        self, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
    ) -> bytes:
        """The 10 bytes after the cap id/next: message control, table and PBA locations."""
        return struct.pack(
            "<HII",
            (self._n - 1) & 0x7FF,
            (table_offset & ~7) | (table_bar & 7),
            (pba_offset & ~7) | (pba_bar & 7),
        )

    # -- message control -------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    @property
    def message_control(self) -> int:
        value = (self._n - 1) & 0x7FF
        if self._enabled:
            value |= MSIX_ENABLE
        if self._function_masked:
            value |= MSIX_FUNCTION_MASK
        return value

    def write_message_control(self, value: int) -> None:
        """Apply a guest write of the message control word (enable and function-mask bits)."""
        with self._lock:
            if self._closed:
                return
            was_enabled = self._enabled
            self._enabled = bool(value & MSIX_ENABLE)
            self._function_masked = bool(value & MSIX_FUNCTION_MASK)
            if self._enabled and not was_enabled:
                self._setup_routes()
            self._deliver_unmasked_pending()

    # -- table and PBA (BAR accesses; offsets relative to the table/PBA start) ---------------

    def read_table(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset < 0 or offset + size > len(self._table) or offset % size:
            return b"\x00" * max(size, 0)
        with self._lock:
            return bytes(self._table[offset : offset + size])

    def write_table(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or offset < 0 or offset + size > len(self._table) or offset % size:
            return
        with self._lock:
            if self._closed:
                return
            first = offset // MSIX_ENTRY_SIZE
            last = (offset + size - 1) // MSIX_ENTRY_SIZE
            old = [self._entry(v) for v in range(first, last + 1)]
            self._table[offset : offset + size] = data
            for v, (o_lo, o_hi, o_data, _o_ctrl) in zip(range(first, last + 1), old, strict=True):
                lo, hi, msg, _ctrl = self._entry(v)
                if self._enabled and (lo, hi, msg) != (o_lo, o_hi, o_data):
                    self._route(v)
            self._deliver_unmasked_pending()

    def read_pba(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset < 0 or offset + size > self.pba_size or offset % size:
            return b"\x00" * max(size, 0)
        with self._lock:
            bits = 0
            for v, p in enumerate(self._pending):
                if p:
                    bits |= 1 << v
        raw = bits.to_bytes(self.pba_size, "little")
        return raw[offset : offset + size]

    def is_pending(self, vector: int) -> bool:
        return 0 <= vector < self._n and self._pending[vector]

    def is_masked(self, vector: int) -> bool:
        return self._function_masked or bool(self._entry(vector)[3] & VECTOR_MASKED)

    # -- delivery --------------------------------------------------------------------------

    def trigger(self, vector: int) -> bool:
        """Raise ``vector``: deliver it, or mark it pending if masked. False if not deliverable."""
        if not 0 <= vector < self._n:
            return False
        with self._lock:
            if not self._enabled or self._closed:
                return False
            if self._function_masked or self._entry(vector)[3] & VECTOR_MASKED:
                self._pending[vector] = True
                return True
            evt = self._evts[vector]
        evt.write(1)
        return True

    def close(self) -> None:
        """Unregister the irqfds, release the GSIs and close the eventfds (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            evts, gsis = self._evts, self._gsis
            self._evts, self._gsis = [], []
        for evt, gsi in zip(evts, gsis, strict=True):
            try:
                self._router.unregister_irqfd(evt, gsi)
                self._router.release_gsi(gsi)
            except Exception:  # the VM may already be gone at teardown
                logger.debug("%s: releasing GSI %d failed", self._label, gsi, exc_info=True)
            evt.close()

    # -- internals (lock held) -------------------------------------------------------------

    def _entry(self, vector: int) -> tuple[int, int, int, int]:
        lo, hi, data, ctrl = _ENTRY.unpack_from(self._table, vector * MSIX_ENTRY_SIZE)
        return lo, hi, data, ctrl

    def _setup_routes(self) -> None:
        if not self._evts:
            for _ in range(self._n):
                evt = EventFd()
                gsi = self._router.allocate_gsi()
                self._router.register_irqfd(evt, gsi)
                self._evts.append(evt)
                self._gsis.append(gsi)
        for v in range(self._n):
            self._route(v)

    def _route(self, vector: int) -> None:
        lo, hi, data, _ctrl = self._entry(vector)
        self._router.set_msi_route(self._gsis[vector], hi << 32 | lo, data)

    def _deliver_unmasked_pending(self) -> None:
        if not self._enabled or self._function_masked:
            return
        for v in range(self._n):
            if self._pending[v] and not self._entry(v)[3] & VECTOR_MASKED:
                self._pending[v] = False
                self._evts[v].write(1)
