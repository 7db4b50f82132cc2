"""In-kernel interrupt plumbing and notifications: irqfd, MSI, ioeventfd, dirty logging."""

from __future__ import annotations

import errno
import os
import select
import threading

import pytest

import kvm
import kvm_sys
from kvm.testing import Machine, run_in_thread, setup_real_mode

pytestmark = pytest.mark.kvm

# Real mode at 0x1000: sti; 1: hlt; jmp 1b        (waits for an interrupt, in the kernel)
# Handler at 0x1100:   mov $0x30,%al; out %al,$0x10; hlt
WAIT_FOR_IRQ = bytes.fromhex("fbf4ebfd")
HANDLER = bytes.fromhex("b030e610f4")
VECTOR = 0x30
MSI_ADDRESS = 0xFEE00000  # fixed delivery to APIC ID 0

# Real mode: mov $0x41,%al; out %al,$0x90 (exits: no datamatch) ; mov $0x42,%al;
# out %al,$0x90 (ioeventfd); mov $0x2000,%bx; mov %bx,%ds; mov %al,(0x40) (MMIO ioeventfd);
# mov $0x43,%al; out %al,$0x10; hlt
IOEVENTS = bytes.fromhex("b041e690b042e690bb00208edba24000b043e610f4")

# Real mode: mov $1,%al; mov %al,(0x3000); mov %al,(0x5000); out %al,$0x10; hlt
DIRTY = bytes.fromhex("b001a20030a20050e610f4")


class _Fileno:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def _irq_guest(m: Machine) -> kvm.Vcpu:
    m.ram.write(0x1000, WAIT_FOR_IRQ)
    m.ram.write(0x1100, HANDLER)
    m.ram.write(VECTOR * 4, (0x1100).to_bytes(2, "little") + b"\0\0")  # IVT: 0000:1100
    vcpu = m.vm.create_vcpu(0)
    lapic = vcpu.get_lapic()
    lapic.set_reg(kvm.Lapic.SVR, 0x1FF)  # software-enable the LAPIC
    vcpu.set_lapic(lapic)
    assert vcpu.get_lapic().get_reg(kvm.Lapic.SVR) & 0x100
    setup_real_mode(vcpu, 0x1000)
    return vcpu


def _run_with_watchdog(vcpu: kvm.Vcpu, trigger: threading.Event | None = None) -> kvm.VcpuExit:
    """Run in a thread; a kick after 10 s turns a lost interrupt into a failing Intr."""
    watchdog = threading.Timer(10.0, vcpu.kick)
    watchdog.start()
    try:

        def go() -> kvm.VcpuExit:
            vcpu.setup_kick()
            if trigger is not None:
                trigger.set()
            return vcpu.run()

        return run_in_thread(go, timeout=30)
    finally:
        watchdog.cancel()


def test_irqfd_delivers_msi_to_a_halted_guest(vmm_irqchip: Machine) -> None:
    evt = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with _irq_guest(vmm_irqchip) as vcpu:
            vmm_irqchip.vm.set_gsi_routing([kvm.IrqRouteMsi(5, MSI_ADDRESS, VECTOR)])
            vmm_irqchip.vm.register_irqfd(_Fileno(evt), 5)
            started = threading.Event()

            def fire() -> None:
                started.wait()
                os.eventfd_write(evt, 1)

            timer = threading.Timer(0.2, fire)
            timer.start()
            try:
                exit_ = _run_with_watchdog(vcpu, started)
            finally:
                timer.cancel()
            assert exit_ == kvm.IoOut(0x10, 1, 1, bytes([VECTOR])), exit_
            vmm_irqchip.vm.unregister_irqfd(evt, 5)
    finally:
        os.close(evt)


def test_signal_msi(vmm_irqchip: Machine) -> None:
    with _irq_guest(vmm_irqchip) as vcpu:
        assert vmm_irqchip.vm.signal_msi(MSI_ADDRESS, VECTOR) > 0
        assert _run_with_watchdog(vcpu) == kvm.IoOut(0x10, 1, 1, bytes([VECTOR]))


def test_irqfd_resample_and_irq_line(vmm_irqchip: Machine) -> None:
    vm = vmm_irqchip.vm
    evt, resample = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.set_gsi_routing(
            [
                kvm.IrqRouteIrqchip(4, kvm_sys.KVM_IRQCHIP_IOAPIC, 4),
                kvm.IrqRouteMsi(24, MSI_ADDRESS, VECTOR),
            ]
        )
        vm.register_irqfd(evt, 4, resample_evt=resample)
        os.eventfd_write(evt, 1)  # level-triggered through the IOAPIC pin
        vm.unregister_irqfd(evt, 4)
        vm.set_irq_line(4, True)
        vm.set_irq_line(4, False)
        vm.register_irqfd(evt, 4)
        with pytest.raises(OSError) as err:  # the same eventfd twice: EBUSY
            vm.register_irqfd(evt, 4)
        assert err.value.errno == errno.EBUSY
        vm.unregister_irqfd(evt, 4)
    finally:
        os.close(evt)
        os.close(resample)


def test_ioeventfd_fires_without_exit(vmm: Machine) -> None:
    vmm.ram.write(0x1000, IOEVENTS)
    pio, mmio = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vmm.vm.register_ioevent(pio, kvm.IoEventAddress.Pio(0x90), datamatch=0x42, length=1)
        vmm.vm.register_ioevent(_Fileno(mmio), kvm.IoEventAddress.Mmio(0x20040))
        with vmm.vm.create_vcpu(0) as vcpu:
            setup_real_mode(vcpu, 0x1000)
            assert vcpu.run() == kvm.IoOut(0x90, 1, 1, b"\x41")  # no datamatch: exits
            assert vcpu.run() == kvm.IoOut(0x10, 1, 1, b"\x43")  # 0x42 and MMIO: no exits
            assert vcpu.run() == kvm.Hlt()
        assert os.eventfd_read(pio) == 1
        assert os.eventfd_read(mmio) == 1
        vmm.vm.unregister_ioevent(pio, kvm.IoEventAddress.Pio(0x90), datamatch=0x42, length=1)
        vmm.vm.unregister_ioevent(mmio, kvm.IoEventAddress.Mmio(0x20040))
        with pytest.raises(OSError):  # already gone
            vmm.vm.unregister_ioevent(mmio, kvm.IoEventAddress.Mmio(0x20040))
        assert select.select([pio, mmio], [], [], 0)[0] == []
    finally:
        os.close(pio)
        os.close(mmio)


def test_ioevent_argument_checks(vmm: Machine) -> None:
    with pytest.raises(ValueError):
        vmm.vm.register_ioevent(0, kvm.IoEventAddress.Pio(0x90), datamatch=1)  # no length
    with pytest.raises(ValueError):
        vmm.vm.register_ioevent(0, kvm.IoEventAddress.Pio(0x90), datamatch=0x100, length=1)
    with pytest.raises(ValueError):
        vmm.vm.register_ioevent(0, kvm.IoEventAddress.Pio(0x90), length=3)
    with pytest.raises(TypeError):
        vmm.vm.register_ioevent(0, 0x90, length=1)  # type: ignore[arg-type]


def test_dirty_log_reports_written_pages(vmm_dirty: Machine) -> None:
    vm = vmm_dirty.vm
    vmm_dirty.ram.write(0x1000, DIRTY)
    assert vm.dirty_pages(vmm_dirty.slot) == []
    with vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        assert vcpu.run() == kvm.IoOut(0x10, 1, 1, b"\x01")
        dirty = vm.dirty_pages(vmm_dirty.slot)
        assert {3, 5} <= set(dirty)
        assert not {2, 4, 6} & set(dirty)
        assert len(vm.get_dirty_log(vmm_dirty.slot)) == 8  # 16 pages -> one u64
        assert vm.dirty_pages(vmm_dirty.slot) == []  # reading clears it
        assert vmm_dirty.ram.read(0x3000, 1) == b"\x01"
