"""The modern (virtio 1.x, non-transitional) virtio-pci transport, laid out as crosvm does.

BAR0 (64-bit, 0x8000 bytes):

=========  ==========================================================
+0x0000    common configuration (``virtio_pci_common_cfg``, 56 bytes)
+0x1000    ISR status (read-to-clear)
+0x2000    device-specific configuration
+0x3000    notifications: queue *n* at +0x3000 + 4*n (multiplier 4)
+0x6000    MSI-X table (when an :class:`~devices.irq.IrqRouter` is given)
+0x7000    MSI-X PBA
=========  ==========================================================

The first 0x4000 bytes are exactly crosvm's 2019 layout; crosvm later appended the MSI-X table
and PBA to the same BAR, which we follow so a device needs a single BAR.

Queue notifications are meant to be ioeventfds (:meth:`VirtioPciDevice.ioevents`); a notify write
that still reaches :meth:`write` (no KVM, tests) is forwarded to the same eventfd.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING

from devices.irq import IoEvent, IrqRouter
from devices.pci import (
    BarAllocationError,
    BarAllocator,
    BarType,
    MsixConfig,
    PciBar,
    PciClass,
    PciConfiguration,
)
from devices.pci._msix import MSIX_CAP_ID
from devices.virtio._constants import (
    VIRTIO_MSI_NO_VECTOR,
    DeviceStatus,
    DeviceType,
    Features,
)
from devices.virtio._errors import InvalidQueue
from devices.virtio._interrupt import Interrupt
from devices.virtio._log import RateLimitedLog
from devices.virtio._queue import Queue
from sys_util import EventFd

if TYPE_CHECKING:
    from devices.virtio._device import VirtioDevice
    from sys_util import GuestMemory

__all__ = [
    "BAR0_SIZE",
    "COMMON_CFG_OFFSET",
    "DEVICE_CFG_OFFSET",
    "ISR_CFG_OFFSET",
    "MSIX_PBA_OFFSET",
    "MSIX_TABLE_OFFSET",
    "NOTIFY_CFG_OFFSET",
    "NOTIFY_OFF_MULTIPLIER",
    "VIRTIO_PCI_CAP_COMMON_CFG",
    "VIRTIO_PCI_CAP_DEVICE_CFG",
    "VIRTIO_PCI_CAP_ISR_CFG",
    "VIRTIO_PCI_CAP_NOTIFY_CFG",
    "VIRTIO_PCI_VENDOR_ID",
    "VirtioPciDevice",
]

logger = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_CAP_ID = 0x09  # vendor-specific capability
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4

COMMON_CFG_OFFSET = 0x0000
COMMON_CFG_SIZE = 56
ISR_CFG_OFFSET = 0x1000
ISR_CFG_SIZE = 1
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_SIZE = 0x1000
NOTIFY_CFG_OFFSET = 0x3000
NOTIFY_CFG_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
#: PCI command register bit 10: the function must not assert INTx while it is set.
COMMAND_INTX_DISABLE = 1 << 10
MSIX_TABLE_OFFSET = 0x6000
MSIX_PBA_OFFSET = 0x7000
BAR0_SIZE = 0x8000

_CLASS_BY_TYPE = {
    DeviceType.NET: (PciClass.NETWORK, 0x00),
    DeviceType.BLOCK: (PciClass.MASS_STORAGE, 0x80),
    DeviceType.CONSOLE: (PciClass.COMMUNICATION, 0x80),
}

# Common configuration fields: offset -> (name, size).
_COMMON_FIELDS: dict[int, tuple[str, int]] = {
    0: ("device_feature_select", 4),
    4: ("device_feature", 4),
    8: ("driver_feature_select", 4),
    12: ("driver_feature", 4),
    16: ("msix_config", 2),
    18: ("num_queues", 2),
    20: ("device_status", 1),
    21: ("config_generation", 1),
    22: ("queue_select", 2),
    24: ("queue_size", 2),
    26: ("queue_msix_vector", 2),
    28: ("queue_enable", 2),
    30: ("queue_notify_off", 2),
    32: ("queue_desc_lo", 4),
    36: ("queue_desc_hi", 4),
    40: ("queue_driver_lo", 4),
    44: ("queue_driver_hi", 4),
    48: ("queue_device_lo", 4),
    52: ("queue_device_hi", 4),
}


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """Body of a ``virtio_pci_cap`` (after cap_vndr/cap_next): cap_len .. length [+ extra]."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBB2xII", cap_len, cfg_type, 0, 0, offset, length) + extra


class VirtioPciDevice:
    """A :class:`~devices.virtio.VirtioDevice` as a PCI function with its BAR0 MMIO handler.

    The owner (``arch``):

    1. ``allocate_bars(allocator)`` - place BAR0; then insert this object on the MMIO bus at
       ``bar_address`` for ``BAR0_SIZE`` bytes (it is a ``BusDevice`` for that range);
    2. ``PciRoot.add_device(self)``;
    3. register every :meth:`ioevents` entry as a KVM ioeventfd;
    4. for INTx: ``assign_irq(evt, resample_evt, line, pin)`` and register an irqfd with resample.
    """

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        *,
        msix_router: IrqRouter | None = None,
    ) -> None:
        self._device = device
        self._mem = mem
        self._lock = threading.RLock()
        dtype = int(device.device_type)
        self._label = f"pci-{device.debug_label()}"
        self.log = RateLimitedLog(logger, self._label)
        cls, subcls = _CLASS_BY_TYPE.get(dtype, (PciClass.OTHER, 0x00))  # type: ignore[call-overload]
        self.config = PciConfiguration(
            vendor_id=VIRTIO_PCI_VENDOR_ID,
            device_id=VIRTIO_PCI_DEVICE_ID_BASE + dtype,
            class_code=cls,
            subclass=subcls,
            revision=1,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=0x40,
        )
        self._queues = [Queue(size) for size in device.queue_max_sizes]
        if len(self._queues) > NOTIFY_CFG_SIZE // NOTIFY_OFF_MULTIPLIER:
            raise ValueError("too many queues for the notification region")
        self._queue_evts = [EventFd() for _ in self._queues]
        self._msix: MsixConfig | None = None
        self._msix_cap_reg = -1
        if msix_router is not None:
            self._msix = MsixConfig(len(self._queues) + 1, msix_router, self._label)
        self.interrupt = Interrupt(msix=self._msix)
        self._bar: PciBar | None = None
        self._intx: tuple[IrqRouter, int, EventFd, EventFd] | None = None
        self._closed = False
        self._reset_state()
        self._add_capabilities()

    # -- identity / ownership --------------------------------------------------------------

    def debug_label(self) -> str:
        return self._label

    @property
    def device(self) -> VirtioDevice:
        return self._device

    @property
    def queues(self) -> list[Queue]:
        return self._queues

    @property
    def queue_evts(self) -> list[EventFd]:
        return self._queue_evts

    @property
    def msix(self) -> MsixConfig | None:
        return self._msix

    @property
    def status(self) -> int:
        return self._status

    def keep_fds(self) -> list[int]:
        fds = [e.fileno() for e in self._queue_evts]
        if self._intx is not None:
            fds.extend((self._intx[2].fileno(), self._intx[3].fileno()))
        fds.extend(self._device.keep_fds())
        return fds

    def _reset_state(self) -> None:
        self._status = 0
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._queue_select = 0
        self._activated = False
        for q in self._queues:
            q.reset()
        self.interrupt.reset()

    def _add_capabilities(self) -> None:
        cfg = self.config
        cfg.add_capability(
            VIRTIO_PCI_CAP_ID,
            _virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_SIZE),
        )
        cfg.add_capability(
            VIRTIO_PCI_CAP_ID, _virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE)
        )
        cfg.add_capability(
            VIRTIO_PCI_CAP_ID,
            _virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE),
        )
        cfg.add_capability(
            VIRTIO_PCI_CAP_ID,
            _virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_CFG_OFFSET,
                NOTIFY_CFG_SIZE,
                struct.pack("<I", NOTIFY_OFF_MULTIPLIER),
            ),
        )
        if self._msix is not None:
            body = self._msix.capability_body(0, MSIX_TABLE_OFFSET, 0, MSIX_PBA_OFFSET)
            off = cfg.add_capability(MSIX_CAP_ID, body)
            reg = off // 4
            # Message control is the upper half of the capability's first dword; only the
            # enable and function-mask bits are writable.
            cfg.set_reg(reg, cfg.read_reg(reg), 0xC000_0000)
            self._msix_cap_reg = reg

    # -- BARs and wiring -------------------------------------------------------------------

    def allocate_bars(self, allocator: BarAllocator) -> list[PciBar]:
        """Place BAR0 through ``allocator(size, alignment)``; return the BARs."""
        if self._bar is not None:
            return [self._bar]
        try:
            addr = allocator(BAR0_SIZE, BAR0_SIZE)
        except Exception as err:
            raise BarAllocationError(0, BAR0_SIZE, str(err)) from err
        if addr % BAR0_SIZE:
            raise BarAllocationError(0, BAR0_SIZE, f"address {addr:#x} is not size-aligned")
        bar = PciBar(0, addr, BAR0_SIZE, BarType.MEM64, prefetchable=False)
        self.config.add_bar(bar)
        self._bar = bar
        return [bar]

    @property
    def bar_address(self) -> int:
        if self._bar is None:
            raise RuntimeError("allocate_bars() has not been called")
        return self._bar.address

    def ioevents(self) -> list[IoEvent]:
        """The ioeventfds to register: one per queue at its notify address (no datamatch)."""
        base = self.bar_address + NOTIFY_CFG_OFFSET
        return [
            IoEvent(evt, base + i * NOTIFY_OFF_MULTIPLIER) for i, evt in enumerate(self._queue_evts)
        ]

    def assign_irq(
        self, irq_evt: EventFd, resample_evt: EventFd | None, line: int, pin: int
    ) -> None:
        """Give the function a legacy INTx line (the owner registers the irqfd)."""
        self.config.set_irq(line, pin)
        self.interrupt.set_intx(irq_evt, resample_evt)

    def connect_intx(self, router: IrqRouter, line: int, pin: int) -> None:
        """Create INTx eventfds, register them as a resampling irqfd on ``line``, assign them.

        The eventfds belong to this device (closed by :meth:`close`, after unregistering).
        """
        if self._intx is not None:
            raise RuntimeError("INTx already connected")
        irq_evt, resample_evt = EventFd(), EventFd()
        try:
            router.register_irqfd(irq_evt, line, resample_evt)
        except BaseException:
            irq_evt.close()
            resample_evt.close()
            raise
        self._intx = (router, line, irq_evt, resample_evt)
        self.assign_irq(irq_evt, resample_evt, line, pin)

    # -- configuration space ---------------------------------------------------------------

    def read_config_register(self, reg_idx: int) -> int:
        with self._lock:
            if reg_idx == self._msix_cap_reg and self._msix is not None:
                low = self.config.read_reg(reg_idx) & 0xFFFF
                return low | self._msix.message_control << 16
            return self.config.read_reg(reg_idx)

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        with self._lock:
            self.config.write_reg(reg_idx, offset, data)
            if reg_idx == 1 and offset < 2:  # command register: Interrupt Disable (bit 10)
                self.interrupt.set_intx_disabled(bool(self.config.command & COMMAND_INTX_DISABLE))
            if reg_idx == self._msix_cap_reg and self._msix is not None and offset + len(data) > 2:
                self._msix.write_message_control(self.config.read_reg(reg_idx) >> 16)
            if reg_idx in (1, 4, 5) and self._bar is not None and self.config.memory_enabled:
                # Sizing happens with decode off; with decode on the BAR must be where we put it.
                current = self.config.bar_address(0)
                if current != self._bar.address:
                    self.log.warn("guest moved BAR0 to %#x; relocation is not supported", current)

    # -- BAR0 MMIO (BusDevice) -------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        try:
            data = self._read(offset, size)
        except Exception as err:  # a vCPU thread must never see a device bug as an exception
            self.log.warn("BAR0 read at %#x failed: %r", offset, err)
            data = b""
        if len(data) != size:  # never trust a device config of the wrong length
            data = (data + b"\x00" * size)[:size]
        return data

    def _read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
                return self._read_common(offset - COMMON_CFG_OFFSET, size)
            if ISR_CFG_OFFSET <= offset < ISR_CFG_OFFSET + ISR_CFG_SIZE:
                value = self.interrupt.read_and_clear_isr()
                return value.to_bytes(1, "little")
            if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
                return self._device.read_config(offset - DEVICE_CFG_OFFSET, size)
            msix = self._msix
            if msix is not None:
                if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + msix.table_size:
                    return msix.read_table(offset - MSIX_TABLE_OFFSET, size)
                if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + msix.pba_size:
                    return msix.read_pba(offset - MSIX_PBA_OFFSET, size)
        return b"\x00" * size

    def write(self, offset: int, data: bytes) -> None:
        try:
            self._write(offset, data)
        except Exception as err:  # a vCPU thread must never see a device bug as an exception
            self.log.warn("BAR0 write at %#x failed: %r", offset, err)

    def _write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if COMMON_CFG_OFFSET <= offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
                self._write_common(offset - COMMON_CFG_OFFSET, bytes(data))
            elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
                self._device.write_config(offset - DEVICE_CFG_OFFSET, bytes(data))
            elif NOTIFY_CFG_OFFSET <= offset < NOTIFY_CFG_OFFSET + NOTIFY_CFG_SIZE:
                index = (offset - NOTIFY_CFG_OFFSET) // NOTIFY_OFF_MULTIPLIER
                if index < len(self._queue_evts):
                    self._queue_evts[index].write(1)
            elif self._msix is not None:
                msix = self._msix
                if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + msix.table_size:
                    msix.write_table(offset - MSIX_TABLE_OFFSET, bytes(data))
                # PBA is read-only

    # -- common configuration --------------------------------------------------------------

    def _selected_queue(self) -> Queue | None:
        if self._queue_select < len(self._queues):
            return self._queues[self._queue_select]
        return None

    def _common_value(self, name: str) -> int:
        q = self._selected_queue()
        if name == "device_feature_select":
            return self._device_feature_select
        if name == "device_feature":
            sel = self._device_feature_select
            return (self._offered_features() >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if name == "driver_feature_select":
            return self._driver_feature_select
        if name == "driver_feature":
            sel = self._driver_feature_select
            return (self._driver_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if name == "msix_config":
            return self.interrupt.config_vector
        if name == "num_queues":
            return len(self._queues)
        if name == "device_status":
            return self._status
        if name == "config_generation":
            return self.interrupt.config_generation
        if name == "queue_select":
            return self._queue_select
        if q is None:
            return 0
        if name == "queue_size":
            return q.size
        if name == "queue_msix_vector":
            return q.vector
        if name == "queue_enable":
            return int(q.ready)
        if name == "queue_notify_off":
            return self._queue_select
        field, half = name.rsplit("_", 1)
        addr = {
            "queue_desc": q.desc_table,
            "queue_driver": q.avail_ring,
            "queue_device": q.used_ring,
        }[field]
        return addr & 0xFFFF_FFFF if half == "lo" else addr >> 32

    def _read_common(self, offset: int, size: int) -> bytes:
        # Assemble from whole fields so unaligned or wide reads still see consistent bytes;
        # anything past the 56-byte structure reads as zero.
        raw = b"".join(
            self._common_value(name).to_bytes(fsize, "little")
            for name, fsize in _COMMON_FIELDS.values()
        )
        out = raw[offset : offset + size]
        return out + b"\x00" * (size - len(out))

    def _write_common(self, offset: int, data: bytes) -> None:
        if len(data) == 8 and offset in (32, 40, 48):
            self._write_common(offset, data[:4])
            self._write_common(offset + 4, data[4:])
            return
        field = _COMMON_FIELDS.get(offset)
        if field is None or field[1] != len(data):
            self.log.warn("ignored %d-byte common config write at %#x", len(data), offset)
            return
        name = field[0]
        value = int.from_bytes(data, "little")
        if name == "device_feature_select":
            self._device_feature_select = value
        elif name == "driver_feature_select":
            self._driver_feature_select = value
        elif name == "driver_feature":
            if self._status & DeviceStatus.FEATURES_OK:
                return  # features are frozen after FEATURES_OK
            sel = self._driver_feature_select
            if sel < 2:
                mask = 0xFFFF_FFFF << (32 * sel)
                self._driver_features = (self._driver_features & ~mask) | (value << (32 * sel))
        elif name == "msix_config":
            self.interrupt.config_vector = self._checked_vector(value)
        elif name == "device_status":
            self._write_status(value)
        elif name == "queue_select":
            self._queue_select = value
        else:
            self._write_queue_field(name, value)

    def _checked_vector(self, value: int) -> int:
        if self._msix is None or value >= self._msix.num_vectors:
            return VIRTIO_MSI_NO_VECTOR  # the driver reads back NO_VECTOR: "failed"
        return value

    def _write_queue_field(self, name: str, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            return
        if self._status & DeviceStatus.DRIVER_OK:
            self.log.warn("queue %s written after DRIVER_OK; ignored", name)
            return
        if name == "queue_size":
            q.size = value
        elif name == "queue_msix_vector":
            q.vector = self._checked_vector(value)
        elif name == "queue_enable":
            q.ready = value == 1
        elif name.startswith("queue_") and name[-3:] in ("_lo", "_hi"):
            attr = {
                "queue_desc": "desc_table",
                "queue_driver": "avail_ring",
                "queue_device": "used_ring",
            }[name[:-3]]
            cur: int = getattr(q, attr)
            if name.endswith("_lo"):
                cur = (cur & ~0xFFFF_FFFF) | value
            else:
                cur = (cur & 0xFFFF_FFFF) | value << 32
            setattr(q, attr, cur)
        # device_feature, num_queues, config_generation, queue_notify_off are read-only

    # -- status, negotiation, activation, reset ---------------------------------------------

    def _offered_features(self) -> int:
        return self._device.features() | 1 << Features.VERSION_1

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self._status
        if value & ~old & DeviceStatus.FEATURES_OK:
            offered = self._offered_features()
            drv = self._driver_features
            if drv & ~offered or not drv >> Features.VERSION_1 & 1:
                self.log.warn(
                    "driver features %#x not acceptable (offered %#x); FEATURES_OK refused",
                    drv,
                    offered,
                )
                value &= ~DeviceStatus.FEATURES_OK
            else:
                self._device.ack_features(drv)
        self._status = value | (old & DeviceStatus.DEVICE_NEEDS_RESET)
        if (
            value & DeviceStatus.DRIVER_OK
            and not old & DeviceStatus.DRIVER_OK
            and value & DeviceStatus.FEATURES_OK
            and not self._activated
        ):
            self._activate()

    def _activate(self) -> None:
        try:
            for i, q in enumerate(self._queues):
                q.on_broken = self._queue_broken
                if q.ready:
                    try:
                        q.activate(self._mem, self._driver_features)
                    except InvalidQueue as err:
                        raise InvalidQueue(f"queue {i}: {err.reason}") from err
            self._device.activate(self._mem, self.interrupt, self._queues, self._queue_evts)
        except Exception as err:
            self.log.warn("activation failed: %s; device needs reset", err)
            for q in self._queues:
                q.reset()
            self._status |= DeviceStatus.DEVICE_NEEDS_RESET
            self.interrupt.signal_config_changed()
            return
        self._activated = True

    def _queue_broken(self, reason: str) -> None:
        # From the worker thread, so no self._lock: a device reset holds it while joining us.
        self._status |= DeviceStatus.DEVICE_NEEDS_RESET
        self.interrupt.signal_config_changed()

    def reset(self) -> None:
        """Device reset (status 0): stop the worker, forget queues and features."""
        with self._lock:
            if self._activated:
                self._device.reset()
            self._reset_state()

    @property
    def activated(self) -> bool:
        return self._activated

    def close(self) -> None:
        """Stop the device and release its eventfds and MSI-X routes (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.reset()
            self._device.close()
            if self._msix is not None:
                self._msix.close()
            if self._intx is not None:
                router, line, irq_evt, resample_evt = self._intx
                self._intx = None
                self.interrupt.set_intx(None, None)
                try:
                    router.unregister_irqfd(irq_evt, line)
                except Exception:  # the VM may already be gone at teardown
                    logger.debug("%s: unregistering INTx irqfd failed", self._label, exc_info=True)
                irq_evt.close()
                resample_evt.close()
            for evt in self._queue_evts:
                evt.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VirtioPciDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
