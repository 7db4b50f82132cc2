"""System queries and vCPU/VM state round trips through the friendly objects."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys

import pytest

import kvm
import kvm_sys
from kvm.testing import Machine, setup_real_mode

pytestmark = pytest.mark.kvm


def test_system_queries() -> None:
    with kvm.Kvm() as k:
        assert k.api_version() == 12
        assert k.check_extension(kvm.Cap.USER_MEMORY) == 1
        assert k.check_extension(kvm.Cap.IRQFD) == 1
        assert k.check_extension(kvm.Cap.IMMEDIATE_EXIT) == 1
        assert k.check_extension(kvm.Cap.NR_MEMSLOTS) >= 32
        assert k.vcpu_mmap_size >= 4096
        assert 1 <= k.recommended_vcpus() <= k.max_vcpus()
        cpuid = k.get_supported_cpuid()
        leaves = {e.function for e in cpuid}
        assert {0, 1, 0x80000000} <= leaves
        vendor = next(e for e in cpuid if e.function == 0)
        assert vendor.eax >= 1
        msrs = k.get_msr_index_list()
        assert 0x10 in msrs  # IA32_TSC
        assert len(set(msrs)) == len(msrs)
        assert isinstance(k.get_emulated_cpuid(), list)
        assert repr(kvm.Cap.IRQCHIP) == "<Cap.IRQCHIP: 0>"


def test_cap_values_match_kvm_sys() -> None:
    for cap in kvm.Cap:
        assert cap.value == getattr(kvm_sys, f"KVM_CAP_{cap.name}")


def test_regs_sregs_fpu_round_trip(vmm: Machine) -> None:
    with vmm.vm.create_vcpu(0) as vcpu:
        regs = vcpu.get_regs()
        values = {f.name: 0x1000 + i for i, f in enumerate(dataclasses.fields(regs))}
        values["rflags"] = 0x202
        want = kvm.Regs(**values)
        vcpu.set_regs(want)
        assert vcpu.get_regs() == want

        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0x10000, 0x1000
        sregs.gdt = kvm.DTable(0x500, 0x27)
        sregs.idt = kvm.DTable(0x600, 0xFFF)
        sregs.cr2 = 0xDEAD000
        vcpu.set_sregs(sregs)
        got = vcpu.get_sregs()
        assert got.cs.base == 0x10000 and got.cs.selector == 0x1000
        assert (got.gdt.base, got.gdt.limit) == (0x500, 0x27)
        assert (got.idt.base, got.idt.limit) == (0x600, 0xFFF)
        assert got.cr2 == 0xDEAD000

        fpu = vcpu.get_fpu()
        fpu.xmm[3] = bytes(range(16))
        fpu.fpr[1] = bytes(range(16, 32))
        fpu.mxcsr = 0x1F80
        vcpu.set_fpu(fpu)
        back = vcpu.get_fpu()
        assert back.xmm[3] == bytes(range(16))
        assert back.fpr[1][:10] == bytes(range(16, 26))  # 80-bit registers
        with pytest.raises(ValueError):
            vcpu.set_fpu(kvm.Fpu(xmm=[b"short"] * 16))


def test_msrs_cpuid_lapic_mp_state(vmm_irqchip: Machine) -> None:
    with vmm_irqchip.vm.create_vcpu(0) as vcpu:
        vcpu.set_msrs({0x174: 0x10, 0x175: 0x8000})  # SYSENTER_CS / ESP
        assert vcpu.get_msrs([0x174, 0x175]) == {0x174: 0x10, 0x175: 0x8000}

        supported = vmm_irqchip.kvm.get_supported_cpuid()
        vcpu.set_cpuid2(supported)
        got = vcpu.get_cpuid2()
        assert {(e.function, e.index) for e in got} == {(e.function, e.index) for e in supported}

        lapic = vcpu.get_lapic()
        assert lapic.get_reg(kvm.Lapic.ID) >> 24 == 0
        lapic.set_reg(kvm.Lapic.SVR, 0x1FF)
        lapic.set_reg(kvm.Lapic.TPR, 0x20)
        vcpu.set_lapic(lapic)
        back = vcpu.get_lapic()
        assert back.get_reg(kvm.Lapic.SVR) == 0x1FF
        assert back.get_reg(kvm.Lapic.TPR) == 0x20
        with pytest.raises(ValueError):
            lapic.get_reg(0x21)
        with pytest.raises(ValueError):
            lapic.set_reg(0x400, 0)

        assert vcpu.get_mp_state() == kvm.MpState.RUNNABLE
        vcpu.set_mp_state(kvm.MpState.HALTED)
        assert vcpu.get_mp_state() == kvm.MpState.HALTED


def test_xsave_xcrs_events_debugregs(vmm: Machine) -> None:
    with vmm.vm.create_vcpu(0) as vcpu:
        xsave = vcpu.get_xsave()
        assert len(xsave) == 4096
        vcpu.set_xsave(xsave)
        with pytest.raises(ValueError):
            vcpu.set_xsave(b"\0" * 10)

        xcrs = vcpu.get_xcrs()
        assert xcrs.values.get(0, 0) & 1  # x87 state is always enabled in XCR0
        vcpu.set_xcrs(xcrs)

        events = vcpu.get_vcpu_events()
        events.nmi_masked = 1
        events.flags = 0
        vcpu.set_vcpu_events(events)
        assert vcpu.get_vcpu_events().nmi_masked == 1

        dr = vcpu.get_debugregs()
        dr.db = (0x1000, 0x2000, 0x3000, 0x4000)
        vcpu.set_debugregs(dr)
        assert vcpu.get_debugregs().db == (0x1000, 0x2000, 0x3000, 0x4000)

        vcpu.set_guest_debug(kvm_sys.KVM_GUESTDBG_ENABLE | kvm_sys.KVM_GUESTDBG_SINGLESTEP)
        vcpu.set_guest_debug(0)
        assert vcpu.get_tsc_khz() > 0


def test_vm_state_and_setup_calls(vmm_irqchip: Machine) -> None:
    vm = vmm_irqchip.vm
    vm.set_tss_address(0xFFFBD000)  # >= 2**31: needs the unsigned long C wrapper
    vm.create_pit2()
    pit = vm.get_pit2()
    assert len(pit) == 112
    vm.set_pit2(pit)
    for chip in (
        kvm_sys.KVM_IRQCHIP_PIC_MASTER,
        kvm_sys.KVM_IRQCHIP_PIC_SLAVE,
        kvm_sys.KVM_IRQCHIP_IOAPIC,
    ):
        state = vm.get_irqchip(chip)
        assert len(state) == 512
        vm.set_irqchip(chip, state)
    with pytest.raises(ValueError):
        vm.set_irqchip(kvm_sys.KVM_IRQCHIP_IOAPIC, b"short")
    clock = vm.get_clock()
    vm.set_clock(kvm.ClockData(clock.clock + 10**9))
    assert vm.get_clock().clock >= clock.clock + 10**9
    assert vm.check_extension(kvm.Cap.IRQ_ROUTING) >= 24  # the GSI table size


def test_identity_map_address_before_vcpus() -> None:
    with kvm.Kvm() as k, k.create_vm() as vm:
        vm.set_identity_map_address(0xFEFFC000)
        vm.set_tss_address(0xFFFBD000)


def test_split_irqchip_enable_cap() -> None:
    with kvm.Kvm() as k, k.create_vm() as vm:
        if not vm.check_extension(kvm.Cap.SPLIT_IRQCHIP):
            pytest.skip("no split irqchip")
        vm.enable_cap(kvm.Cap.SPLIT_IRQCHIP, (24,))
        with pytest.raises(ValueError):
            vm.enable_cap(kvm.Cap.SPLIT_IRQCHIP, (1, 2, 3, 4, 5))


def test_rss_of_import_and_one_vcpu_vm() -> None:
    """Non-timing: importing kvm and making a 1-vCPU VM adds well under 15 MiB RSS."""
    probe = (
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'): return int(line.split()[1]) * 1024\n"
        "before = rss()\n"
        "import kvm\n"
        "k = kvm.Kvm(); vm = k.create_vm(); vm.create_irqchip(); v = vm.create_vcpu(0)\n"
        "print(rss() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
    assert int(out.stdout) < 15 << 20


def test_single_step_gives_debug_exits(vmm: Machine) -> None:
    vmm.ram.write(0x1000, bytes.fromhex("9090e610f4"))  # nop; nop; out %al,$0x10; hlt
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        vcpu.set_guest_debug(kvm_sys.KVM_GUESTDBG_ENABLE | kvm_sys.KVM_GUESTDBG_SINGLESTEP)
        exits = [vcpu.run() for _ in range(3)]
        assert [type(e) for e in exits] == [kvm.Debug, kvm.Debug, kvm.IoOut], exits
        first, second = exits[0], exits[1]
        assert isinstance(first, kvm.Debug) and isinstance(second, kvm.Debug)
        assert (first.exception, first.pc, second.pc) == (1, 0x1001, 0x1002)  # #DB after each
        vcpu.set_guest_debug(0)
        assert vcpu.run() == kvm.Hlt()


def test_signal_mask(vmm: Machine) -> None:
    with vmm.vm.create_vcpu(0) as vcpu:
        vcpu.set_signal_mask([signal.SIGUSR1, signal.SIGUSR2])
        vcpu.set_signal_mask([])
        vcpu.set_signal_mask(None)
        with pytest.raises(ValueError):
            vcpu.set_signal_mask([0])
        assert kvm.kick_signal() == signal.SIGRTMIN
