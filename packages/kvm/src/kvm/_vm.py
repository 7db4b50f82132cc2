"""``Vm``: a KVM virtual machine fd: memory slots, interrupt plumbing, clocks, vCPU creation."""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

import kvm_sys
from kvm._ioctl import Fd, fd_of, get_struct_bytes, ioctl_ptr, ioctl_val, set_struct_bytes
from kvm._state import ClockData
from kvm._vcpu import Vcpu, _enable_cap
from kvm_sys import ffi

_PIT2 = "struct kvm_pit_state2"

__all__ = [
    "IoEventAddress",
    "IrqRoute",
    "IrqRouteIrqchip",
    "IrqRouteMsi",
    "MemoryRegionInfo",
    "Vm",
]

_PAGE = 4096


class IoEventAddress:
    """Where an ioeventfd listens: ``IoEventAddress.Pio(port)`` or ``IoEventAddress.Mmio(addr)``."""

    @dataclass(frozen=True, slots=True)
    class Pio:
        port: int

    @dataclass(frozen=True, slots=True)
    class Mmio:
        addr: int


@dataclass(frozen=True, slots=True)
class IrqRouteMsi:
    """GSI ``gsi`` raises the MSI ``(address, data)`` (``KVM_IRQ_ROUTING_MSI``)."""

    gsi: int
    address: int
    data: int


@dataclass(frozen=True, slots=True)
class IrqRouteIrqchip:
    """GSI ``gsi`` drives ``pin`` of the in-kernel ``irqchip`` (``KVM_IRQCHIP_*``)."""

    gsi: int
    irqchip: int
    pin: int


IrqRoute = IrqRouteMsi | IrqRouteIrqchip


@dataclass(frozen=True, slots=True)
class MemoryRegionInfo:
    """A registered memory slot."""

    slot: int
    guest_addr: int
    size: int
    host_address: int
    flags: int


class Vm:
    """A KVM VM fd. Create with ``Kvm.create_vm()``.

    Guest memory is the caller's: ``add_memory_region`` takes the host address of a mapping
    (e.g. ``sys_util.GuestMemory.regions[i].host_address``) that must stay mapped while the
    slot exists.
    """

    __slots__ = ("__weakref__", "_fd", "_finalizer", "_lock", "_run_size", "_slots")

    def __init__(self, fd: int, run_size: int) -> None:
        """Take ownership of ``fd``; ``run_size`` is ``KVM_GET_VCPU_MMAP_SIZE``."""
        self._fd = fd
        self._run_size = run_size
        self._slots: dict[int, MemoryRegionInfo] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, os.close, fd)

    # --- fd protocol ---------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "vm is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the VM fd (idempotent). The kernel frees the VM when its vCPUs are gone too."""
        self._fd = -1
        self._slots.clear()
        self._finalizer()

    def _check_open(self) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, "vm is closed")

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Vm fd={self._fd}>"

    # --- general -------------------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM (answers can differ from the system fd's)."""
        return ioctl_val(self._fd, kvm_sys.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, args: Iterable[int] = (), flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM (e.g. ``Cap.SPLIT_IRQCHIP`` with ``args=(24,)``)."""
        _enable_cap(self._fd, cap, args, flags)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """``KVM_CREATE_VCPU`` and map its ``kvm_run`` page."""
        fd = ioctl_val(self._fd, kvm_sys.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return Vcpu(fd, vcpu_id, self._run_size)

    # --- memory --------------------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, guest_addr: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        """Raw ``KVM_SET_USER_MEMORY_REGION`` (``size == 0`` deletes the slot)."""
        c = ffi.new("struct kvm_userspace_memory_region *")
        c.slot = slot
        c.flags = flags
        c.guest_phys_addr = guest_addr
        c.memory_size = size
        c.userspace_addr = host_address
        # SAFETY: the kernel only records host_address; the caller keeps that range mapped
        # for as long as the slot exists (documented on add_memory_region).
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_USER_MEMORY_REGION, c, "KVM_SET_USER_MEMORY_REGION")
        if size:
            self._slots[slot] = MemoryRegionInfo(slot, guest_addr, size, host_address, flags)
        else:
            self._slots.pop(slot, None)

    def add_memory_region(
        self,
        guest_addr: int,
        size: int,
        host_address: int,
        *,
        read_only: bool = False,
        log_dirty: bool = False,
    ) -> int:
        """Map ``size`` bytes at ``host_address`` into the guest at ``guest_addr``.

        Returns the slot number (the lowest free one). Overlapping an existing slot fails with
        ``OSError(EEXIST)`` from the kernel.
        """
        flags = (kvm_sys.KVM_MEM_READONLY if read_only else 0) | (
            kvm_sys.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        )
        with self._lock:
            slot = 0
            while slot in self._slots:
                slot += 1
            self.set_user_memory_region(slot, guest_addr, size, host_address, flags)
        return slot

    def remove_memory_region(self, slot: int) -> MemoryRegionInfo:
        """Delete a slot; returns what it was. Unknown slot: ``OSError(ENOENT)``."""
        self._check_open()
        with self._lock:
            info = self._slots.get(slot)
            if info is None:
                raise OSError(errno.ENOENT, f"no memory slot {slot}")
            self.set_user_memory_region(slot, info.guest_addr, 0, info.host_address, info.flags)
        return info

    @property
    def memory_regions(self) -> list[MemoryRegionInfo]:
        return sorted(self._slots.values(), key=lambda r: r.guest_addr)

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: one bit per page of the slot, set if written since last call.

        The slot must have been added with ``log_dirty=True``.
        """
        self._check_open()
        info = self._slots.get(slot)
        if info is None:
            raise OSError(errno.ENOENT, f"no memory slot {slot}")
        pages = (info.size + _PAGE - 1) // _PAGE
        nbytes = ((pages + 63) // 64) * 8
        bitmap = ffi.new("char[]", nbytes)
        c = ffi.new("struct kvm_dirty_log *")
        c.slot = slot
        c.dirty_bitmap = bitmap
        # SAFETY: the kernel writes ALIGN(npages, 64) / 8 bytes: exactly nbytes.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_DIRTY_LOG, c, "KVM_GET_DIRTY_LOG")
        return bytes(ffi.buffer(bitmap))

    def dirty_pages(self, slot: int) -> list[int]:
        """Page indices (relative to the slot) written since the last dirty-log read."""
        bits = int.from_bytes(self.get_dirty_log(slot), "little")
        out = []
        while bits:
            low = bits & -bits
            out.append(low.bit_length() - 1)
            bits ^= low
        return out

    # --- interrupt controllers and timers ------------------------------------------------

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and LAPICs (call before creating vCPUs)."""
        ioctl_val(self._fd, kvm_sys.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = kvm_sys.KVM_PIT_SPEAKER_DUMMY) -> None:
        """In-kernel i8254 PIT (the dummy speaker port 0x61, as crosvm and QEMU use)."""
        c = ffi.new("struct kvm_pit_config *", {"flags": flags})
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_CREATE_PIT2, c, "KVM_CREATE_PIT2")

    def set_tss_address(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: 3 pages of guest address space KVM may use (e.g. 0xfffbd000)."""
        ioctl_val(self._fd, kvm_sys.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_address(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page KVM may use (e.g. 0xfeffc000)."""
        c = ffi.new("uint64_t *", addr)
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_IDENTITY_MAP_ADDR, c, "KVM_SET_IDENTITY_MAP_ADDR")

    def set_irq_line(self, irq: int, active: bool) -> None:
        """``KVM_IRQ_LINE``: drive GSI ``irq`` high or low."""
        c = ffi.new("struct kvm_irq_level *")
        c.irq = irq
        c.level = 1 if active else 0
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_IRQ_LINE, c, "KVM_IRQ_LINE")

    def signal_msi(self, address: int, data: int) -> int:
        """``KVM_SIGNAL_MSI``: > 0 delivered, 0 blocked by the guest."""
        c = ffi.new("struct kvm_msi *")
        c.address_lo = address & 0xFFFFFFFF
        c.address_hi = address >> 32
        c.data = data
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        return ioctl_ptr(self._fd, kvm_sys.KVM_SIGNAL_MSI, c, "KVM_SIGNAL_MSI")

    def set_gsi_routing(self, routes: Sequence[IrqRoute]) -> None:
        """``KVM_SET_GSI_ROUTING``: replaces the whole table (include the irqchip routes you
        still want: the default IOAPIC/PIC routes are dropped)."""
        c = ffi.new("struct kvm_irq_routing *", {"entries": len(routes)})
        c.nr = len(routes)
        for i, route in enumerate(routes):
            e = c.entries[i]
            e.gsi = route.gsi
            if isinstance(route, IrqRouteMsi):
                e.type = kvm_sys.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = route.address & 0xFFFFFFFF
                e.u.msi.address_hi = route.address >> 32
                e.u.msi.data = route.data
            elif isinstance(route, IrqRouteIrqchip):
                e.type = kvm_sys.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = route.irqchip
                e.u.irqchip.pin = route.pin
            else:
                raise TypeError(f"not an IrqRoute: {route!r}")
        # SAFETY: `c` holds nr == len(routes) entries (ffi.new'd to that count).
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_GSI_ROUTING, c, "KVM_SET_GSI_ROUTING")

    def register_irqfd(self, evt: Fd, gsi: int, resample_evt: Fd | None = None) -> None:
        """Writing ``evt`` raises GSI ``gsi`` in the kernel (no VMM exit).

        With ``resample_evt`` the GSI is level-triggered: KVM signals ``resample_evt`` when the
        guest EOIs it, so the device can re-assert if still pending.
        """
        c = ffi.new("struct kvm_irqfd *")
        c.fd = fd_of(evt)
        c.gsi = gsi
        if resample_evt is not None:
            c.flags = kvm_sys.KVM_IRQFD_FLAG_RESAMPLE
            c.resamplefd = fd_of(resample_evt)
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_IRQFD, c, "KVM_IRQFD")

    def unregister_irqfd(self, evt: Fd, gsi: int) -> None:
        c = ffi.new("struct kvm_irqfd *")
        c.fd = fd_of(evt)
        c.gsi = gsi
        c.flags = kvm_sys.KVM_IRQFD_FLAG_DEASSIGN
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_IRQFD, c, "KVM_IRQFD")

    def _ioeventfd(
        self,
        evt: Fd,
        addr: IoEventAddress.Pio | IoEventAddress.Mmio,
        datamatch: int | None,
        length: int,
        flags: int,
    ) -> None:
        c = ffi.new("struct kvm_ioeventfd *")
        if isinstance(addr, IoEventAddress.Pio):
            c.addr = addr.port
            flags |= kvm_sys.KVM_IOEVENTFD_FLAG_PIO
        elif isinstance(addr, IoEventAddress.Mmio):
            c.addr = addr.addr
        else:
            raise TypeError(f"not an IoEventAddress: {addr!r}")
        if datamatch is not None:
            if length not in (1, 2, 4, 8):
                raise ValueError("datamatch needs length 1, 2, 4 or 8")
            if not 0 <= datamatch < 1 << (8 * length):
                raise ValueError(f"datamatch {datamatch:#x} does not fit in {length} bytes")
            c.datamatch = datamatch
            flags |= kvm_sys.KVM_IOEVENTFD_FLAG_DATAMATCH
        elif length not in (0, 1, 2, 4, 8):
            raise ValueError("length must be 0 (any), 1, 2, 4 or 8")
        c.len = length
        c.fd = fd_of(evt)
        c.flags = flags
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_IOEVENTFD, c, "KVM_IOEVENTFD")

    def register_ioevent(
        self,
        evt: Fd,
        addr: IoEventAddress.Pio | IoEventAddress.Mmio,
        datamatch: int | None = None,
        length: int = 0,
    ) -> None:
        """A guest write to ``addr`` signals ``evt`` in the kernel, with no vCPU exit.

        ``length`` 0 matches any access size; ``datamatch`` (needs ``length``) fires only for
        that written value.
        """
        self._ioeventfd(evt, addr, datamatch, length, 0)

    def unregister_ioevent(
        self,
        evt: Fd,
        addr: IoEventAddress.Pio | IoEventAddress.Mmio,
        datamatch: int | None = None,
        length: int = 0,
    ) -> None:
        """Undo :meth:`register_ioevent` (same arguments)."""
        self._ioeventfd(evt, addr, datamatch, length, kvm_sys.KVM_IOEVENTFD_FLAG_DEASSIGN)

    # --- state save/restore --------------------------------------------------------------

    def get_clock(self) -> ClockData:
        c = ffi.new("struct kvm_clock_data *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_CLOCK, c, "KVM_GET_CLOCK")
        return ClockData(int(c.clock), int(c.flags))

    def set_clock(self, clock: ClockData | int) -> None:
        """Set kvmclock (only ``clock`` is used; flags the kernel reports are not inputs)."""
        c = ffi.new("struct kvm_clock_data *")
        c.clock = clock.clock if isinstance(clock, ClockData) else clock
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_CLOCK, c, "KVM_SET_CLOCK")

    def get_irqchip(self, chip_id: int) -> bytes:
        """``KVM_GET_IRQCHIP``: the 512-byte state of ``KVM_IRQCHIP_PIC_MASTER/SLAVE/IOAPIC``.

        Opaque on purpose: it is for snapshot and restore with :meth:`set_irqchip`.
        """
        c = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_IRQCHIP, c, "KVM_GET_IRQCHIP")
        return bytes(ffi.buffer(c.chip.dummy))

    def set_irqchip(self, chip_id: int, state: bytes) -> None:
        c = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        size = ffi.sizeof(c.chip.dummy)
        if len(state) != size:
            raise ValueError(f"irqchip state must be {size} bytes, got {len(state)}")
        ffi.memmove(c.chip.dummy, bytes(state), size)
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_IRQCHIP, c, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        """``KVM_GET_PIT2``: the raw ``struct kvm_pit_state2`` (for :meth:`set_pit2`)."""
        return get_struct_bytes(self._fd, kvm_sys.KVM_GET_PIT2, _PIT2, "KVM_GET_PIT2")

    def set_pit2(self, state: bytes) -> None:
        set_struct_bytes(self._fd, kvm_sys.KVM_SET_PIT2, _PIT2, state, "KVM_SET_PIT2")
