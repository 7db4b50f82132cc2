"""vCPU and VM state as plain Python objects, and their conversion to and from KVM's structs.

The dataclasses are mutable on purpose: the usual pattern is ``regs = vcpu.get_regs();
regs.rip = entry; vcpu.set_regs(regs)``. They hold only Python ints and bytes, so they can be
pickled, compared and sent between processes; the cffi structs never leave this package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any

import kvm_sys
from kvm_sys import ffi

__all__ = [
    "ClockData",
    "CpuIdEntry",
    "DTable",
    "Debugregs",
    "Fpu",
    "Lapic",
    "MpState",
    "Regs",
    "Segment",
    "Sregs",
    "VcpuEvents",
    "Xcrs",
]

_REGS = struct.Struct("<18Q")
_U32 = struct.Struct("<I")


@dataclass(slots=True)
class Regs:
    """General purpose registers (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def _pack(self) -> Any:
        c = ffi.new("struct kvm_regs *")
        _REGS.pack_into(ffi.buffer(c), 0, *(getattr(self, f) for f in _REG_NAMES))
        return c

    @classmethod
    def _unpack(cls, c: Any) -> Regs:
        return cls(*_REGS.unpack(ffi.buffer(c)))


_REG_NAMES = tuple(f.name for f in fields(Regs))


@dataclass(slots=True)
class Segment:
    """A segment register with its hidden descriptor cache (``struct kvm_segment``)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 (the kernel's name)
    g: int = 0
    avl: int = 0
    unusable: int = 0


_SEG_NAMES = tuple(f.name for f in fields(Segment))


@dataclass(slots=True)
class DTable:
    """GDTR / IDTR (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0xFFFF


@dataclass(slots=True)
class Sregs:
    """Segment, control and descriptor-table registers (``struct kvm_sregs``)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    def _pack(self) -> Any:
        c = ffi.new("struct kvm_sregs *")
        for name in _SREG_SEGMENTS:
            seg = getattr(self, name)
            cs = getattr(c, name)
            for f in _SEG_NAMES:
                setattr(cs, f, getattr(seg, f))
        for name in ("gdt", "idt"):
            t = getattr(self, name)
            ct = getattr(c, name)
            ct.base = t.base
            ct.limit = t.limit
        for name in _SREG_INTS:
            setattr(c, name, getattr(self, name))
        for i, word in enumerate(self.interrupt_bitmap):
            c.interrupt_bitmap[i] = word
        return c

    @classmethod
    def _unpack(cls, c: Any) -> Sregs:
        kw: dict[str, Any] = {}
        for name in _SREG_SEGMENTS:
            cs = getattr(c, name)
            kw[name] = Segment(*(getattr(cs, f) for f in _SEG_NAMES))
        for name in ("gdt", "idt"):
            ct = getattr(c, name)
            kw[name] = DTable(ct.base, ct.limit)
        for name in _SREG_INTS:
            kw[name] = getattr(c, name)
        kw["interrupt_bitmap"] = tuple(c.interrupt_bitmap)
        return cls(**kw)


_SREG_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SREG_INTS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass(slots=True)
class Fpu:
    """x87/SSE state in FXSAVE layout (``struct kvm_fpu``): 8 x 16-byte ST/MM, 16 x 16-byte XMM."""

    fpr: list[bytes] = field(default_factory=lambda: [bytes(16)] * 8)
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: list[bytes] = field(default_factory=lambda: [bytes(16)] * 16)
    mxcsr: int = 0x1F80

    def _pack(self) -> Any:
        if len(self.fpr) != 8 or len(self.xmm) != 16:
            raise ValueError("Fpu needs 8 fpr and 16 xmm registers")
        c = ffi.new("struct kvm_fpu *")
        for i, reg in enumerate(self.fpr):
            ffi.memmove(c.fpr[i], _exact(reg, 16, "fpr"), 16)
        for i, reg in enumerate(self.xmm):
            ffi.memmove(c.xmm[i], _exact(reg, 16, "xmm"), 16)
        c.fcw, c.fsw, c.ftwx = self.fcw, self.fsw, self.ftwx
        c.last_opcode, c.last_ip, c.last_dp = self.last_opcode, self.last_ip, self.last_dp
        c.mxcsr = self.mxcsr
        return c

    @classmethod
    def _unpack(cls, c: Any) -> Fpu:
        return cls(
            fpr=[bytes(ffi.buffer(c.fpr[i])) for i in range(8)],
            fcw=c.fcw,
            fsw=c.fsw,
            ftwx=c.ftwx,
            last_opcode=c.last_opcode,
            last_ip=c.last_ip,
            last_dp=c.last_dp,
            xmm=[bytes(ffi.buffer(c.xmm[i])) for i in range(16)],
            mxcsr=c.mxcsr,
        )


def _exact(data: bytes, n: int, what: str) -> bytes:
    if len(data) != n:
        raise ValueError(f"{what} must be {n} bytes, got {len(data)}")
    return bytes(data)


@dataclass(slots=True)
class CpuIdEntry:
    """One CPUID leaf/subleaf (``struct kvm_cpuid_entry2``)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


_CPUID_NAMES = tuple(f.name for f in fields(CpuIdEntry))


def cpuid_to_struct(entries: list[CpuIdEntry]) -> Any:
    c = ffi.new("struct kvm_cpuid2 *", {"entries": len(entries)})
    c.nent = len(entries)
    for i, e in enumerate(entries):
        ce = c.entries[i]
        for name in _CPUID_NAMES:
            setattr(ce, name, getattr(e, name))
    return c


def cpuid_from_struct(c: Any) -> list[CpuIdEntry]:
    return [CpuIdEntry(*(getattr(c.entries[i], n) for n in _CPUID_NAMES)) for i in range(c.nent)]


@dataclass(slots=True)
class Lapic:
    """The local APIC register page (``struct kvm_lapic_state``, 1 KiB).

    Registers are 32 bits at 16-byte aligned offsets; :meth:`get_reg` / :meth:`set_reg` take the
    offset from the APIC base (e.g. ``Lapic.SVR``), as in the SDM's register table.
    """

    regs: bytearray = field(default_factory=lambda: bytearray(kvm_sys.KVM_APIC_REG_SIZE))

    ID = 0x20
    VERSION = 0x30
    TPR = 0x80
    EOI = 0xB0
    LDR = 0xD0
    DFR = 0xE0
    SVR = 0xF0
    ISR = 0x100
    IRR = 0x200
    ICR_LOW = 0x300
    ICR_HIGH = 0x310
    LVT_TIMER = 0x320
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    LVT_ERROR = 0x370

    def _check(self, offset: int) -> None:
        if offset < 0 or offset % 16 or offset + 4 > len(self.regs):
            raise ValueError(f"bad LAPIC register offset {offset:#x}")

    def get_reg(self, offset: int) -> int:
        """The 32-bit register at ``offset``."""
        self._check(offset)
        return int(_U32.unpack_from(self.regs, offset)[0])

    def set_reg(self, offset: int, value: int) -> None:
        """Set the 32-bit register at ``offset``."""
        self._check(offset)
        _U32.pack_into(self.regs, offset, value & 0xFFFFFFFF)


class MpState(IntEnum):
    """A vCPU's multiprocessing state (``KVM_MP_STATE_*``)."""

    RUNNABLE = kvm_sys.KVM_MP_STATE_RUNNABLE
    UNINITIALIZED = kvm_sys.KVM_MP_STATE_UNINITIALIZED
    INIT_RECEIVED = kvm_sys.KVM_MP_STATE_INIT_RECEIVED
    HALTED = kvm_sys.KVM_MP_STATE_HALTED
    SIPI_RECEIVED = kvm_sys.KVM_MP_STATE_SIPI_RECEIVED
    STOPPED = kvm_sys.KVM_MP_STATE_STOPPED
    CHECK_STOP = kvm_sys.KVM_MP_STATE_CHECK_STOP
    OPERATING = kvm_sys.KVM_MP_STATE_OPERATING
    LOAD = kvm_sys.KVM_MP_STATE_LOAD
    AP_RESET_HOLD = kvm_sys.KVM_MP_STATE_AP_RESET_HOLD
    SUSPENDED = kvm_sys.KVM_MP_STATE_SUSPENDED


@dataclass(slots=True)
class VcpuEvents:
    """Pending/injected exceptions, interrupts, NMI and SMI (``struct kvm_vcpu_events``).

    The kernel's nested structs are flattened: ``exception.nr`` is ``exception_nr``.
    """

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_smm_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0

    def _pack(self) -> Any:
        c = ffi.new("struct kvm_vcpu_events *")
        for name, path in _EVENT_PATHS:
            target = c
            for part in path[:-1]:
                target = getattr(target, part)
            setattr(target, path[-1], getattr(self, name))
        return c

    @classmethod
    def _unpack(cls, c: Any) -> VcpuEvents:
        kw = {}
        for name, path in _EVENT_PATHS:
            value = c
            for part in path:
                value = getattr(value, part)
            kw[name] = value
        return cls(**kw)


_EVENT_NESTED = ("exception", "interrupt", "nmi", "smi", "triple_fault")
_EVENT_PATHS = tuple(
    (
        f.name,
        next(
            ((p, f.name[len(p) + 1 :]) for p in _EVENT_NESTED if f.name.startswith(p + "_")),
            (f.name,),
        )
        if f.name not in ("exception_has_payload", "exception_payload")
        else (f.name,),
    )
    for f in fields(VcpuEvents)
)


@dataclass(slots=True)
class Debugregs:
    """DR0-3, DR6, DR7 (``struct kvm_debugregs``)."""

    db: tuple[int, int, int, int] = (0, 0, 0, 0)
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400
    flags: int = 0


@dataclass(slots=True)
class Xcrs:
    """Extended control registers (``struct kvm_xcrs``): ``{xcr index: value}``."""

    values: dict[int, int] = field(default_factory=dict)
    flags: int = 0


@dataclass(slots=True)
class ClockData:
    """The VM's kvmclock (``struct kvm_clock_data``): nanoseconds, plus ``KVM_CLOCK_*`` flags."""

    clock: int
    flags: int = 0
