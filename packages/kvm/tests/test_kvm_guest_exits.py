"""Real guests: port I/O, MMIO and hlt exits with their data round trips; long mode at CPL0/3."""

from __future__ import annotations

import pytest

import kvm
import kvm_sys
from kvm.testing import Machine, setup_long_mode, setup_real_mode

pytestmark = pytest.mark.kvm

# Real mode at 0:0x1000.
#   mov $0x3f8,%dx; mov $0x41,%al; out %al,%dx      -> IoOut(0x3f8, b"A")
#   in %dx,%al                                       -> IoIn(0x3f8, 1); we answer 0x5a
#   mov %al,%bl; add $1,%al; out %al,%dx             -> IoOut(0x3f8, b"\x5b")  (the round trip)
#   mov $0x1234,%ax; out %ax,$0x80                   -> IoOut(0x80, 2 bytes)
#   mov $0x2000,%ax; mov %ax,%ds; mov %bl,(0x10)     -> MmioWrite(0x20010, b"\x5a")
#   mov (0x20),%ax                                   -> MmioRead(0x20020, 2); we answer 0xabcd
#   out %ax,%dx                                      -> IoOut(0x3f8, b"\xcd\xab")
#   hlt                                              -> Hlt
PIO_MMIO = bytes.fromhex("baf803b041eeec88c30401eeb83412e780b800208ed8881e1000a12000eff4")

# Real mode: mov $0x100,%si; mov $3,%cx; mov $0x3f8,%dx; rep outsb;
#            mov $0x200,%di; mov $2,%cx; rep insb; hlt
STRING_IO = bytes.fromhex("be0001b90300baf803f36ebf0002b90200f36cf4")

# 64-bit: movabs $0x1122334455667788,%rax; mov %rax,0x3000; shr $32,%rax;
#         mov $0x3f8,%dx; out %eax,%dx; jmp .
LONG_MODE = bytes.fromhex("48b88877665544332211488904250030000048c1e82066baf803efebfe")

# 64-bit CPL0: mov $0x3f8,%dx; mov $0x5a,%al; out %al,%dx; hlt
LONG_MODE_HLT = bytes.fromhex("66baf803b05aeef4")


def test_real_mode_pio_mmio_hlt(vmm: Machine) -> None:
    vmm.ram.write(0x1000, PIO_MMIO)
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        assert vcpu.run() == kvm.IoOut(0x3F8, 1, 1, b"A")
        assert vcpu.run() == kvm.IoIn(0x3F8, 1, 1)
        vcpu.set_io_in_data(b"\x5a")
        assert vcpu.run() == kvm.IoOut(0x3F8, 1, 1, b"\x5b")
        assert vcpu.run() == kvm.IoOut(0x80, 2, 1, b"\x34\x12")
        assert vcpu.run() == kvm.MmioWrite(0x20010, b"\x5a")
        assert vcpu.run() == kvm.MmioRead(0x20020, 2)
        vcpu.set_mmio_read_data(b"\xcd\xab")
        assert vcpu.run() == kvm.IoOut(0x3F8, 2, 1, b"\xcd\xab")
        exit_ = vcpu.run()
        match exit_:
            case kvm.Hlt():
                pass
            case _:
                pytest.fail(f"expected Hlt, got {exit_}")
        assert vcpu.get_regs().rbx & 0xFF == 0x5A


def test_exits_are_interned_and_immutable(vmm: Machine) -> None:
    vmm.ram.write(0x1000, bytes.fromhex("e610ebfc"))  # out %al,$0x10; jmp .-2
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        first = vcpu.run()
        assert isinstance(first, kvm.IoOut)
        assert first.port == 0x10
        assert vcpu.run() is first
        with pytest.raises(AttributeError):
            first.port = 1  # type: ignore[misc]


def test_string_io_long_form(vmm: Machine) -> None:
    vmm.ram.write(0x1000, STRING_IO)
    vmm.ram.write(0x100, b"abc")
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        out = b""
        exit_ = vcpu.run()
        while isinstance(exit_, kvm.IoOut):
            assert exit_.port == 0x3F8
            assert exit_.size == 1
            assert len(exit_.data) == exit_.count
            out += exit_.data
            exit_ = vcpu.run()
        assert out == b"abc"
        got = b""
        while isinstance(exit_, kvm.IoIn):
            assert exit_.port == 0x3F8
            reply = b"xy"[len(got) : len(got) + exit_.count]
            vcpu.set_io_in_data(reply)
            got += reply
            exit_ = vcpu.run()
        assert got == b"xy"
        assert exit_ == kvm.Hlt()
        assert vmm.ram.read(0x200, 2) == b"xy"


@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_long_mode_with_paging(vmm_2m: Machine, user: bool) -> None:
    vmm_2m.ram.write(0x10000, LONG_MODE)
    with vmm_2m.vm.create_vcpu(0) as vcpu:
        setup_long_mode(vcpu, vmm_2m.ram, 0x10000, user=user)
        assert vcpu.run() == kvm.IoOut(0x3F8, 4, 1, (0x11223344).to_bytes(4, "little"))
        assert vmm_2m.ram.read_u64(0x3000) == 0x1122334455667788
        sregs = vcpu.get_sregs()
        assert sregs.cs.l == 1
        assert sregs.cs.dpl == (3 if user else 0)
        assert sregs.efer & 0x400  # LMA


def test_long_mode_cpl0_hlt(vmm_2m: Machine) -> None:
    vmm_2m.ram.write(0x10000, LONG_MODE_HLT)
    with vmm_2m.vm.create_vcpu(0) as vcpu:
        setup_long_mode(vcpu, vmm_2m.ram, 0x10000)
        assert vcpu.run() == kvm.IoOut(0x3F8, 1, 1, b"\x5a")
        assert vcpu.run() == kvm.Hlt()
        assert vcpu.get_regs().rip == 0x10000 + len(LONG_MODE_HLT)


def test_reply_errors(vmm: Machine) -> None:
    vmm.ram.write(0x1000, PIO_MMIO)
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        assert isinstance(vcpu.run(), kvm.IoOut)
        with pytest.raises(kvm.ReplyError):
            vcpu.set_io_in_data(b"\x00")  # the pending exit is an OUT
        with pytest.raises(kvm.ReplyError):
            vcpu.set_mmio_read_data(b"\x00")
        assert vcpu.run() == kvm.IoIn(0x3F8, 1, 1)
        with pytest.raises(kvm.ReplyError):
            vcpu.set_io_in_data(b"\x00\x00")  # 2 bytes for a 1-byte IN
        with pytest.raises(kvm.ReplyError):
            vcpu.set_io_in_data(b"")
        with pytest.raises(kvm.ReplyError):  # far larger than the kvm_run mapping
            vcpu.set_io_in_data(bytes(1 << 20))
        vcpu.set_io_in_data(bytearray(b"\x5a"))
        assert vcpu.run() == kvm.IoOut(0x3F8, 1, 1, b"\x5b")


def test_immediate_exit(vmm: Machine) -> None:
    vmm.ram.write(0x1000, bytes.fromhex("e610ebfc"))
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)

        def flag() -> bool:
            return vcpu.immediate_exit

        assert flag() is False
        vcpu.immediate_exit = True
        assert flag() is True
        assert vcpu.run() == kvm.Intr()
        assert flag() is False  # consumed by the Intr
        assert vcpu.run() == kvm.IoOut(0x10, 1, 1, b"\x00")


def test_shutdown_on_triple_fault(vmm_2m: Machine) -> None:
    # At CPL3, hlt raises #GP; with no IDT that escalates to a triple fault.
    vmm_2m.ram.write(0x10000, b"\xf4")
    with vmm_2m.vm.create_vcpu(0) as vcpu:
        setup_long_mode(vcpu, vmm_2m.ram, 0x10000, user=True)
        assert vcpu.run() == kvm.Shutdown()


def test_exit_cache_stays_bounded_for_ever_new_values(vmm: Machine) -> None:
    from kvm._vcpu import _CACHE_LIMIT, _EXIT_CACHE

    vmm.ram.write(0x1000, bytes.fromhex("40e710ebfb"))  # 1: inc %ax; out %ax,$0x10; jmp 1b
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        for i in range(1, _CACHE_LIMIT + 600):
            assert vcpu.run() == kvm.IoOut(0x10, 2, 1, (i & 0xFFFF).to_bytes(2, "little"))
            assert len(_EXIT_CACHE) <= _CACHE_LIMIT
        assert _EXIT_CACHE[kvm_sys.KVM_EXIT_HLT] == kvm.Hlt()  # pinned entries survive
