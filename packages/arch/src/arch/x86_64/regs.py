"""Boot-time vCPU state: registers, segments and control registers, FPU, MSRs, LAPIC LINTs.

Every vCPU starts directly in 64-bit long mode at the kernel's 64-bit entry, as Linux's 64-bit
boot protocol prescribes: paging on with the identity map at CR3 = 0x9000, CS = __BOOT_CS (0x10),
DS/ES/SS = __BOOT_DS (0x18), interrupts off, RSI = the zero page. The builders are pure
functions over ``kvm`` state objects (testable without ``/dev/kvm``); :func:`configure_vcpu`
applies them to a vCPU.

Application processors get the same state; Linux parks them until the BSP sends INIT/SIPI,
which resets them to real mode anyway.
"""

from __future__ import annotations

import dataclasses
import struct

from arch.x86_64.gdt import BOOT_GDT_BYTES, SegmentDescriptor, gdt_segments
from arch.x86_64.layout import (
    BOOT_GDT_ADDR,
    BOOT_IDT_ADDR,
    BOOT_STACK_POINTER,
    PML4_ADDR,
    ZERO_PAGE_ADDR,
)
from kvm import DTable, Fpu, Lapic, Regs, Segment, Sregs, Vcpu

__all__ = [
    "BOOT_MSRS",
    "CR0_ET",
    "CR0_NE",
    "CR0_PE",
    "CR0_PG",
    "CR4_PAE",
    "EFER_LMA",
    "EFER_LME",
    "boot_fpu",
    "boot_regs",
    "boot_sregs",
    "configure_vcpu",
    "patch_xsave_fpu",
    "set_lint",
]

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102
MISC_ENABLE_FAST_STRING = 1 << 0

#: MSR values every vCPU starts with (the syscall MSRs cleared, TSC = 0, fast strings on).
BOOT_MSRS: dict[int, int] = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
}

FPU_FCW = 0x37F
FPU_MXCSR = 0x1F80
_FXSAVE_FCW = 0
_FXSAVE_MXCSR = 24
_XSAVE_HEADER = 512
_XFEATURE_FP_SSE = 0x3

#: LAPIC LVT delivery modes (bits 8-10).
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def boot_regs(entry: int, zero_page: int = ZERO_PAGE_ADDR) -> Regs:
    """RIP = entry, RSI = zero page, RSP = RBP = 0x8000, RFLAGS = 2 (reserved bit only)."""
    return Regs(
        rip=entry,
        rsi=zero_page,
        rsp=BOOT_STACK_POINTER,
        rbp=BOOT_STACK_POINTER,
        rflags=0x2,
    )


def _segment(desc: SegmentDescriptor) -> Segment:
    return Segment(
        base=desc.base,
        limit=desc.limit,
        selector=desc.selector,
        type=desc.type,
        present=desc.present,
        dpl=desc.dpl,
        db=desc.db,
        s=desc.s,
        l=desc.l,
        g=desc.g,
        avl=desc.avl,
        unusable=0,
    )


def boot_sregs(current: Sregs) -> Sregs:
    """Long-mode segment and control state, on top of the vCPU's ``current`` sregs.

    ``current`` supplies what we do not decide (``apic_base``, LDT, CR8...). CR0 is set to
    PE | ET | NE | PG outright, clearing the reset value's CD/NW (caches disabled).
    """
    segs = gdt_segments()
    code, data, tss = _segment(segs["code"]), _segment(segs["data"]), _segment(segs["tss"])
    return dataclasses.replace(
        current,
        cs=code,
        ds=data,
        es=dataclasses.replace(data),
        fs=dataclasses.replace(data),
        gs=dataclasses.replace(data),
        ss=dataclasses.replace(data),
        tr=tss,
        gdt=DTable(base=BOOT_GDT_ADDR, limit=BOOT_GDT_BYTES - 1),
        idt=DTable(base=BOOT_IDT_ADDR, limit=7),
        cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3=PML4_ADDR,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )


def boot_fpu() -> Fpu:
    """FCW 0x37F (x87 reset value), MXCSR 0x1F80 (all SSE exceptions masked)."""
    return Fpu(fcw=FPU_FCW, mxcsr=FPU_MXCSR)


def patch_xsave_fpu(xsave: bytes) -> bytes:
    """``xsave`` (KVM_GET_XSAVE layout) with FCW 0x37F and MXCSR 0x1F80 in its legacy area.

    Why not only KVM_SET_FPU: Linux's KVM_SET_FPU ignores ``mxcsr`` (it copies every other
    field), so the MXCSR has to go in through KVM_SET_XSAVE. The x87 and SSE bits of the header's
    XSTATE_BV are set so the values are loaded rather than the init state.
    """
    if len(xsave) < _XSAVE_HEADER + 8:
        raise ValueError(f"xsave area of {len(xsave)} bytes is too short")
    area = bytearray(xsave)
    struct.pack_into("<H", area, _FXSAVE_FCW, FPU_FCW)
    struct.pack_into("<I", area, _FXSAVE_MXCSR, FPU_MXCSR)
    xstate_bv = struct.unpack_from("<Q", area, _XSAVE_HEADER)[0]
    struct.pack_into("<Q", area, _XSAVE_HEADER, xstate_bv | _XFEATURE_FP_SSE)
    return bytes(area)


def set_lint(lapic: Lapic) -> Lapic:
    """LINT0 = ExtINT (the PIC, virtual-wire mode), LINT1 = NMI; other LVT bits kept."""
    for reg, mode in ((Lapic.LVT_LINT0, APIC_MODE_EXTINT), (Lapic.LVT_LINT1, APIC_MODE_NMI)):
        value = lapic.get_reg(reg)
        lapic.set_reg(reg, (value & ~0x700) | (mode << 8))
    return lapic


def configure_vcpu(vcpu: Vcpu, entry: int, zero_page: int = ZERO_PAGE_ADDR) -> None:
    """Apply the boot state to ``vcpu`` (CPUID must already be set: it decides valid MSRs)."""
    vcpu.set_msrs(BOOT_MSRS)
    vcpu.set_sregs(boot_sregs(vcpu.get_sregs()))
    vcpu.set_regs(boot_regs(entry, zero_page))
    vcpu.set_fpu(boot_fpu())
    vcpu.set_xsave(patch_xsave_fpu(vcpu.get_xsave()))
    vcpu.set_lapic(set_lint(vcpu.get_lapic()))
