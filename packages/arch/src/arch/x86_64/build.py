"""``build_vm``: a ready-to-run x86_64 VM from a memory size, a kernel and devices.

The order matters and is KVM's, not ours to choose:

1. ``KVM_CREATE_VM``; guest memory (one memfd) registered slot by slot;
2. ``KVM_SET_IDENTITY_MAP_ADDR`` and ``KVM_SET_TSS_ADDR`` (before any vCPU exists);
3. ``KVM_CREATE_IRQCHIP`` and *then* ``KVM_CREATE_PIT2`` (the PIT needs the irqchip; OLD crosvm
   had the order backwards), then the full GSI routing table;
4. kernel, initrd, command line, zero page, GDT/IDT, page tables, MP table into guest memory;
5. legacy devices on the I/O bus (i8042 0x61+4, CMOS 0x70+2, COM ports with irqfds on GSI 4/3),
   PCI config I/O at 0xCF8 and PCI devices with BARs, INTx irqfds and ioeventfds;
6. vCPUs, each with its filtered CPUID and 64-bit boot state.

Anything that fails is reported as one :class:`~arch.errors.Error` line and every fd created so
far is closed. The vCPU run loop is not here (``crosvm.runloop``): :class:`RunnableVm` is what it
runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from arch.allocator import AddressAllocator
from arch.cmdline import Cmdline
from arch.errors import Error, VmSetupError
from arch.loader import ImageInput, InitrdPlacement, LoadedKernel, load_initrd, load_kernel
from arch.x86_64.bootparams import build_zero_page
from arch.x86_64.cpuid import filter_cpuid
from arch.x86_64.gdt import boot_gdt, boot_idt, page_tables
from arch.x86_64.irq import IOAPIC_NUM_PINS, KvmIrqRouter
from arch.x86_64.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX_SIZE,
    FIRST_ADDR_PAST_32BITS,
    HIMEM_START,
    IDENTITY_MAP_ADDR,
    IO_PORT_WINDOW,
    MPTABLE_ADDR,
    PCI_MMIO_WINDOW,
    TSS_ADDR,
    ZERO_PAGE_ADDR,
    E820Entry,
    MemoryLayout,
    e820_map,
    high_mmio_window,
    memory_layout,
)
from arch.x86_64.mptable import MAX_CPUS, PciIrq, build_mptable
from arch.x86_64.regs import configure_vcpu
from devices.bus import Bus
from devices.cmos import Cmos
from devices.errors import Error as DevicesError
from devices.i8042 import I8042, I8042_BASE, I8042_LENGTH
from devices.irq import FileDescriptorLike, IoEvent, IrqRouter
from devices.pci import (
    PCI_CONFIG_IO_BASE,
    PCI_CONFIG_IO_SIZE,
    PciAddress,
    PciBar,
    PciConfigIo,
    PciRoot,
)
from devices.serial import ComPort
from kvm import IoEventAddress, Kvm, Vcpu, Vm
from sys_util import EventFd, GuestMemory

__all__ = [
    "CMOS_BASE",
    "CMOS_LENGTH",
    "PCI_INTX_GSIS",
    "PciDeviceFactory",
    "PlaceablePciDevice",
    "RunnableVm",
    "VmConfig",
    "VmContext",
    "build_vm",
]

CMOS_BASE = 0x70
CMOS_LENGTH = 2
#: IOAPIC pins given to PCI INTx lines (no ISA device uses them).
PCI_INTX_GSIS = tuple(range(16, IOAPIC_NUM_PINS))
_PCI_INTA = 1  # the interrupt-pin register value for INTA#


@runtime_checkable
class PlaceablePciDevice(Protocol):
    """What ``build_vm`` needs from a PCI function (``devices.virtio.VirtioPciDevice`` is one;
    so is a proxy to a device in a jailed process)."""

    def debug_label(self) -> str: ...

    def read_config_register(self, reg_idx: int) -> int: ...

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None: ...

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def allocate_bars(self, allocator: Callable[[int, int], int]) -> list[PciBar]: ...

    def ioevents(self) -> list[IoEvent]: ...

    def assign_irq(
        self, irq_evt: EventFd, resample_evt: EventFd | None, line: int, pin: int
    ) -> None: ...


@dataclass(frozen=True)
class VmContext:
    """What a PCI device factory may use: the guest's memory and the MSI router."""

    memory: GuestMemory
    irq_router: IrqRouter
    vm: Vm


#: Builds a PCI device once the VM's memory and interrupt router exist.
PciDeviceFactory = Callable[[VmContext], PlaceablePciDevice]


@dataclass(frozen=True)
class VmConfig:
    """Everything ``build_vm`` needs.

    Attributes:
        memory_size: guest RAM in bytes (page aligned, >= 2 MiB).
        kernel: ELF64 vmlinux or bzImage (path, open file or bytes).
        vcpu_count: number of vCPUs.
        initrd: optional initial ramdisk.
        cmdline: kernel command line (validated; the kernel's own length limit applies).
        com_ports: COM ports from ``devices.serial.create_com_ports`` (the caller keeps owning
            them: :meth:`RunnableVm.close` does not close them).
        pci_devices: factories of PCI devices (owned by the VM once built).
        pci_bus: whether the guest gets PCI config I/O (0xCF8) with a host bridge at 00:00.0;
            default: only when there are PCI devices. A bus without devices still spares a
            Linux guest its fallback probes for PCI BIOS (seconds when emulated).
        kvm: an open ``Kvm`` to use (the caller keeps owning it); default: open ``/dev/kvm``.
        memory: guest memory built from :func:`memory_layout` (default: created and owned).
        hugepages: when the VM creates its memory, ask for transparent huge pages for it.
    """

    memory_size: int
    kernel: ImageInput
    vcpu_count: int = 1
    initrd: ImageInput | None = None
    cmdline: str | Cmdline = ""
    com_ports: Sequence[ComPort] = ()
    pci_devices: Sequence[PciDeviceFactory] = ()
    pci_bus: bool | None = None
    kvm: Kvm | None = None
    memory: GuestMemory | None = None
    hugepages: bool = False


@dataclass(eq=False)
class RunnableVm:
    """A built VM: run ``vcpus`` (one thread each) dispatching exits to ``io_bus``/``mmio_bus``;
    the i8042 writes ``exit_evt`` on a guest reset. Close it when done (idempotent)."""

    vm: Vm
    vcpu_count: int
    vcpus: list[Vcpu]
    memory: GuestMemory
    io_bus: Bus
    mmio_bus: Bus
    exit_evt: EventFd
    irq_router: KvmIrqRouter
    layout: MemoryLayout
    e820: list[E820Entry]
    kernel: LoadedKernel
    initrd: InitrdPlacement | None
    cmdline: str
    i8042: I8042
    cmos: Cmos
    io_allocator: AddressAllocator
    mmio_allocator: AddressAllocator
    high_mmio_allocator: AddressAllocator
    pci_root: PciRoot | None = None
    pci_devices: list[tuple[PciAddress, PlaceablePciDevice]] = field(default_factory=list)
    pci_irqs: list[PciIrq] = field(default_factory=list)
    _resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)
    _closed: bool = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close vCPUs, PCI devices, the VM, its memory and events (not the COM ports)."""
        if self._closed:
            return
        self._closed = True
        self._resources.close()

    def __enter__(self) -> RunnableVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write_mptable(self) -> None:
        """(Re)write the MP table (after adding PCI devices, before the guest boots)."""
        self.memory.write(MPTABLE_ADDR, build_mptable(self.vcpu_count, self.pci_irqs))

    def enable_pci_bus(self) -> PciRoot:
        """Create the PCI root (host bridge at 00:00.0) behind config I/O 0xCF8, once."""
        if self.pci_root is None:
            self.pci_root = PciRoot()
            self.io_bus.insert(PciConfigIo(self.pci_root), PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_SIZE)
        return self.pci_root

    def add_pci_device(self, device: PlaceablePciDevice) -> PciAddress:
        """Place ``device``: BARs from the MMIO window onto the MMIO bus, config space behind
        0xCF8, INTx irqfd (with resample) on a GSI in 16-23, and its ioeventfds. Call before
        the guest boots (the MP table is rewritten)."""
        self.enable_pci_bus()
        assert self.pci_root is not None
        label = device.debug_label()

        def bar_allocator(size: int, alignment: int) -> int:
            return self.mmio_allocator.allocate(size, alignment, label)

        with contextlib.ExitStack() as undo:
            bars = device.allocate_bars(bar_allocator)
            for bar in bars:
                undo.callback(self.mmio_allocator.release, bar.address)
            # Last step that can fail before KVM state changes; PciRoot has no removal, so a
            # failure below leaves an inert function in config space (its BARs unmapped).
            address = self.pci_root.add_device(device)
            gsi = PCI_INTX_GSIS[(address.device - 1) % len(PCI_INTX_GSIS)]
            irq_evt, resample_evt = EventFd(), EventFd()
            undo.callback(irq_evt.close)
            undo.callback(resample_evt.close)
            for bar in bars:
                self.mmio_bus.insert(device, bar.address, bar.size)
                undo.callback(self.mmio_bus.remove, bar.address)
            self.vm.register_irqfd(irq_evt, gsi, resample_evt)
            undo.callback(self.vm.unregister_irqfd, irq_evt, gsi)
            device.assign_irq(irq_evt, resample_evt, gsi, _PCI_INTA)
            for ioevent in device.ioevents():
                where: IoEventAddress.Pio | IoEventAddress.Mmio = (
                    IoEventAddress.Pio(ioevent.address)
                    if ioevent.pio
                    else IoEventAddress.Mmio(ioevent.address)
                )
                args = (ioevent.event, where, ioevent.datamatch, ioevent.length)
                self.vm.register_ioevent(*args)
                undo.callback(self.vm.unregister_ioevent, *args)
            undo.pop_all()
        self._resources.callback(irq_evt.close)
        self._resources.callback(resample_evt.close)
        close = getattr(device, "close", None)
        if callable(close):
            self._resources.callback(close)
        self.pci_devices.append((address, device))
        self.pci_irqs.append(PciIrq(address.device, 0, gsi))
        self.write_mptable()
        return address


def _cmdline_for(config: VmConfig, kernel: LoadedKernel) -> Cmdline:
    limit = min(kernel.cmdline_limit, CMDLINE_MAX_SIZE - 1)
    if isinstance(config.cmdline, Cmdline):
        return config.cmdline.with_limit(limit)
    cmdline = Cmdline(limit)
    cmdline.insert_str(config.cmdline)
    return cmdline


class _Step:
    """Names the build step so a failing ioctl becomes ``VmSetupError(step, strerror)``."""

    def __init__(self) -> None:
        self.name = "start"

    def __call__(self, name: str) -> _Step:
        self.name = name
        return self


def build_vm(config: VmConfig) -> RunnableVm:
    """Create and set up the VM described by ``config``.

    Raises:
        arch.errors.Error: a bad configuration or kernel (``KernelLoadError``,
            ``MemoryLayoutError``, ``CmdlineError``...), a failed KVM call or a device that
            cannot be placed (``VmSetupError``). Exceptions raised by a PCI device factory
            itself propagate unchanged. Nothing created is left open.
    """
    layout = memory_layout(config.memory_size)
    if not 1 <= config.vcpu_count <= MAX_CPUS:
        raise VmSetupError("vcpu count", f"{config.vcpu_count} is not in 1..{MAX_CPUS}")
    step = _Step()
    with contextlib.ExitStack() as stack:
        try:
            return _build(config, layout, stack, step)
        except Error:
            raise
        except OSError as err:
            raise VmSetupError(step.name, err.strerror or str(err)) from err
        except DevicesError as err:  # e.g. two devices on one port range, PCI slots exhausted
            raise VmSetupError(step.name, str(err)) from err


def _build(
    config: VmConfig, layout: MemoryLayout, stack: contextlib.ExitStack, step: _Step
) -> RunnableVm:
    # Memory first, so it is unmapped last: after the VM that maps it is gone.
    step("create guest memory")
    memory = config.memory
    if memory is None:
        memory = stack.enter_context(GuestMemory(layout.regions, hugepages=config.hugepages))
    elif [(r.guest_base, r.size) for r in memory.regions] != list(layout.regions):
        raise VmSetupError("guest memory", "regions do not match memory_layout(memory_size)")
    step("open /dev/kvm")
    kvm = config.kvm
    if kvm is None:
        kvm = stack.enter_context(Kvm())
    max_vcpus = kvm.max_vcpus()
    if config.vcpu_count > max_vcpus:
        raise VmSetupError("vcpu count", f"{config.vcpu_count} exceeds KVM's maximum {max_vcpus}")
    step("create VM")
    vm = stack.enter_context(kvm.create_vm())

    for region in memory.regions:
        step(f"add memory slot at {int(region.guest_base):#x}")
        vm.add_memory_region(region.guest_base, region.size, region.host_address)

    step("set identity map address")
    vm.set_identity_map_address(IDENTITY_MAP_ADDR)
    step("set TSS address")
    vm.set_tss_address(TSS_ADDR)
    step("create irqchip")
    vm.create_irqchip()
    step("create PIT")  # after the irqchip: the PIT delivers through it
    vm.create_pit2()
    step("set GSI routing")
    irq_router = KvmIrqRouter(vm)

    step("load kernel")
    low_end = min(layout.low_ram_end, FIRST_ADDR_PAST_32BITS)
    kernel = load_kernel(memory, config.kernel, lowest=HIMEM_START, highest=low_end)
    initrd: InitrdPlacement | None = None
    if config.initrd is not None:
        step("load initrd")
        initrd = load_initrd(
            memory,
            config.initrd,
            lowest=kernel.end,
            highest=min(kernel.initrd_addr_max + 1, low_end),
        )
    step("write boot structures")
    cmdline = _cmdline_for(config, kernel)
    cmdline_bytes = cmdline.to_bytes()
    memory.write(CMDLINE_ADDR, cmdline_bytes)
    e820 = e820_map(layout)
    memory.write(
        ZERO_PAGE_ADDR,
        build_zero_page(
            kernel,
            cmdline_addr=CMDLINE_ADDR,
            cmdline_size=len(cmdline_bytes),
            e820=e820,
            initrd=initrd,
        ),
    )
    for addr, data in (boot_gdt(), boot_idt(), *page_tables()):
        memory.write(addr, data)

    step("legacy devices")
    exit_evt = stack.enter_context(EventFd())
    io_bus, mmio_bus = Bus(), Bus()
    i8042 = I8042(exit_evt)
    io_bus.insert(i8042, I8042_BASE, I8042_LENGTH)
    below_4g = layout.low_ram_end
    cmos = Cmos(below_4g, layout.size - below_4g)
    io_bus.insert(cmos, CMOS_BASE, CMOS_LENGTH)
    for port in config.com_ports:
        step(f"serial COM{port.num}")
        io_bus.insert(port.serial, port.base, port.length)
        interrupt = port.interrupt
        if not isinstance(interrupt, FileDescriptorLike):
            raise VmSetupError(f"serial COM{port.num}", "its interrupt event has no fileno()")
        vm.register_irqfd(interrupt, port.gsi)

    high_base, high_size = high_mmio_window(layout)
    rvm = RunnableVm(
        vm=vm,
        vcpu_count=config.vcpu_count,
        vcpus=[],
        memory=memory,
        io_bus=io_bus,
        mmio_bus=mmio_bus,
        exit_evt=exit_evt,
        irq_router=irq_router,
        layout=layout,
        e820=e820,
        kernel=kernel,
        initrd=initrd,
        cmdline=str(cmdline),
        i8042=i8042,
        cmos=cmos,
        io_allocator=AddressAllocator(*IO_PORT_WINDOW),
        mmio_allocator=AddressAllocator(*PCI_MMIO_WINDOW),
        high_mmio_allocator=AddressAllocator(high_base, high_size),
    )
    stack.callback(rvm._resources.close)  # PCI devices added below are closed on failure too
    if config.pci_bus is False and config.pci_devices:
        raise VmSetupError("PCI devices", "pci_bus=False but PCI devices were given")
    if config.pci_bus:
        rvm.enable_pci_bus()
    context = VmContext(memory=memory, irq_router=irq_router, vm=vm)
    for factory in config.pci_devices:
        step("PCI device")
        device = factory(context)
        step(f"PCI device {device.debug_label()}")
        rvm.add_pci_device(device)

    step("MP table")
    rvm.write_mptable()

    step("get supported CPUID")
    supported = kvm.get_supported_cpuid()
    vcpus: list[Vcpu] = []
    for cpu_id in range(config.vcpu_count):
        step(f"create vCPU {cpu_id}")
        vcpu = stack.enter_context(vm.create_vcpu(cpu_id))
        step(f"set CPUID of vCPU {cpu_id}")
        vcpu.set_cpuid2(filter_cpuid(supported, cpu_id=cpu_id, cpu_count=config.vcpu_count))
        step(f"set boot state of vCPU {cpu_id}")
        configure_vcpu(vcpu, kernel.entry)
        vcpus.append(vcpu)
    rvm.vcpus = vcpus
    # Success: hand every resource to the RunnableVm (closed in reverse creation order).
    rvm._resources = stack.pop_all()
    return rvm
