import struct

import pytest

from arch.x86_64.gdt import BOOT_CS, BOOT_DS, BOOT_TSS
from arch.x86_64.regs import BOOT_MSRS, boot_fpu, boot_regs, boot_sregs, patch_xsave_fpu, set_lint
from kvm import Lapic, Sregs


def test_regs() -> None:
    r = boot_regs(0x100_0000)
    assert (r.rip, r.rsi, r.rsp, r.rbp, r.rflags) == (0x100_0000, 0x7000, 0x8000, 0x8000, 2)


def test_sregs_long_mode() -> None:
    base = Sregs(cr0=0x6000_0010, apic_base=0xFEE0_0900)
    s = boot_sregs(base)
    assert s.cr0 == 0x8000_0031  # PE | ET | NE | PG, CD/NW cleared
    assert (s.cr3, s.cr4, s.efer) == (0x9000, 0x20, 0x500)
    assert s.apic_base == 0xFEE0_0900
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type, s.cs.present) == (BOOT_CS, 1, 0, 11, 1)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        assert (seg.selector, seg.type, seg.db, seg.limit) == (BOOT_DS, 3, 1, 0xFFFF_FFFF)
    assert (s.tr.selector, s.tr.type, s.tr.s) == (BOOT_TSS, 11, 0)
    assert (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit) == (0x500, 47, 0x530, 7)
    assert base.cr0 == 0x6000_0010  # input untouched


def test_fpu_msrs_lapic() -> None:
    f = boot_fpu()
    assert (f.fcw, f.mxcsr) == (0x37F, 0x1F80)
    assert BOOT_MSRS[0x1A0] == 1 and BOOT_MSRS[0x10] == 0 and BOOT_MSRS[0xC000_0082] == 0
    lapic = Lapic()
    lapic.set_reg(Lapic.LVT_LINT0, 0x1_0000)
    lapic.set_reg(Lapic.LVT_LINT1, 0x1_0000)
    set_lint(lapic)
    assert lapic.get_reg(Lapic.LVT_LINT0) == 0x1_0700
    assert lapic.get_reg(Lapic.LVT_LINT1) == 0x1_0400


def test_patch_xsave_sets_fcw_mxcsr_and_header_bits() -> None:
    area = bytearray(4096)
    area[100] = 0xAB  # other state preserved
    struct.pack_into("<Q", area, 512, 0x4)  # AVX bit already present
    out = patch_xsave_fpu(bytes(area))
    assert struct.unpack_from("<H", out, 0)[0] == 0x37F
    assert struct.unpack_from("<I", out, 24)[0] == 0x1F80
    assert struct.unpack_from("<Q", out, 512)[0] == 0x7
    assert out[100] == 0xAB and len(out) == 4096
    with pytest.raises(ValueError):
        patch_xsave_fpu(bytes(100))
