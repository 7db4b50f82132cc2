"""Unit tier (no /dev/kvm): state conversions, exits, argument checks, test helpers."""

from __future__ import annotations

import dataclasses
import errno
import pickle

import pytest

import kvm
from kvm._ioctl import fd_of
from kvm._state import cpuid_from_struct, cpuid_to_struct
from kvm.testing import GuestRam


def test_regs_pack_round_trip() -> None:
    regs = kvm.Regs(**{f.name: i * 0x1111 for i, f in enumerate(dataclasses.fields(kvm.Regs))})
    assert kvm.Regs._unpack(regs._pack()) == regs


def test_sregs_pack_round_trip() -> None:
    sregs = kvm.Sregs()
    sregs.cs = kvm.Segment(base=0x1000, limit=0xFFFFF, selector=8, type=11, l=1, g=1, dpl=3)
    sregs.tr = kvm.Segment(type=11, s=0, unusable=0)
    sregs.gdt = kvm.DTable(0x500, 0x27)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80000033, 0x9000, 0x20, 0x500
    sregs.interrupt_bitmap = (1, 2, 3, 1 << 63)
    assert kvm.Sregs._unpack(sregs._pack()) == sregs


def test_fpu_pack_round_trip_and_checks() -> None:
    fpu = kvm.Fpu()
    fpu.xmm = [bytes([i]) * 16 for i in range(16)]
    fpu.fpr = [bytes([i + 100]) * 16 for i in range(8)]
    fpu.fcw, fpu.mxcsr, fpu.last_ip = 0x27F, 0x1FA0, 0xFFFF0000
    assert kvm.Fpu._unpack(fpu._pack()) == fpu
    with pytest.raises(ValueError):
        kvm.Fpu(xmm=[bytes(16)] * 15)._pack()
    with pytest.raises(ValueError):
        kvm.Fpu(fpr=[bytes(17)] * 8)._pack()


def test_vcpu_events_pack_round_trip() -> None:
    names = [f.name for f in dataclasses.fields(kvm.VcpuEvents)]
    events = kvm.VcpuEvents(**{n: (i % 200) + 1 for i, n in enumerate(names)})
    assert kvm.VcpuEvents._unpack(events._pack()) == events


def test_cpuid_struct_round_trip() -> None:
    entries = [kvm.CpuIdEntry(0, 0, 0, 0xD, 1, 2, 3), kvm.CpuIdEntry(7, 1, 1, 4, 5, 6, 7)]
    assert cpuid_from_struct(cpuid_to_struct(entries)) == entries
    assert cpuid_from_struct(cpuid_to_struct([])) == []


def test_lapic_registers() -> None:
    lapic = kvm.Lapic()
    lapic.set_reg(kvm.Lapic.SVR, 0x1FF)
    lapic.set_reg(kvm.Lapic.LVT_LINT0, 0x1_0000_0700)  # truncated to 32 bits
    assert lapic.get_reg(kvm.Lapic.SVR) == 0x1FF
    assert lapic.get_reg(kvm.Lapic.LVT_LINT0) == 0x700
    assert lapic.regs[kvm.Lapic.SVR : kvm.Lapic.SVR + 4] == b"\xff\x01\0\0"
    for bad in (-16, 0x3F4, 0x400, 0x401, 8):
        with pytest.raises(ValueError):
            lapic.get_reg(bad)


def test_exits_are_frozen_values() -> None:
    a = kvm.IoOut(0x3F8, 1, 1, b"x")
    assert a == kvm.IoOut(0x3F8, 1, 1, b"x")
    assert hash(a) == hash(kvm.IoOut(0x3F8, 1, 1, b"x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(a)) == a
    match kvm.MmioWrite(0xD0000000, b"\1\2"):
        case kvm.MmioWrite(addr=addr, data=data):
            assert (addr, data) == (0xD0000000, b"\1\2")


def test_ioevent_addresses_and_routes() -> None:
    assert kvm.IoEventAddress.Pio(0x60) == kvm.IoEventAddress.Pio(0x60)
    assert kvm.IoEventAddress.Mmio(0x60) != kvm.IoEventAddress.Mmio(0x61)
    assert kvm.IrqRouteMsi(24, 0xFEE00000, 0x41).data == 0x41
    assert kvm.IrqRouteIrqchip(4, 2, 4).pin == 4


def test_fd_of() -> None:
    class F:
        def fileno(self) -> int:
            return 7

    assert fd_of(5) == 5
    assert fd_of(F()) == 7
    with pytest.raises(OSError) as err:
        fd_of(-1)
    assert err.value.errno == errno.EBADF


def test_cap_is_an_int_enum() -> None:
    assert int(kvm.Cap.IRQFD) == kvm.Cap.IRQFD
    assert kvm.Cap["IOEVENTFD"] is kvm.Cap.IOEVENTFD
    assert len(kvm.Cap) > 100


def test_guest_ram_bounds() -> None:
    with GuestRam(0x2000) as ram:
        assert ram.host_address % 4096 == 0
        ram.write(0x1FF8, b"12345678")
        assert ram.read(0x1FF8, 8) == b"12345678"
        ram.write_u64(0, 0x1122334455667788)
        assert ram.read_u64(0) == 0x1122334455667788
        for addr, n in ((0x1FF9, 8), (-1, 1), (0x2000, 1)):
            with pytest.raises(ValueError):
                ram.write(addr, bytes(n))
    with pytest.raises(ValueError):
        ram.read(0, 1)  # closed
