"""Error paths: kernel errors surface as OSError with errno; closed wrappers raise EBADF."""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
from collections.abc import Callable

import pytest

import kvm
import kvm_sys
from kvm.testing import Machine

pytestmark = pytest.mark.kvm


def _errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as err:
        fn()
    assert err.value.errno is not None
    return err.value.errno


def test_open_missing_device() -> None:
    with pytest.raises(FileNotFoundError):
        kvm.Kvm("/nonexistent/kvm")


def test_bad_slot_and_overlap(vmm: Machine) -> None:
    vm, host = vmm.vm, vmm.ram.regions[0].host_address
    assert (
        _errno_of(lambda: vm.set_user_memory_region(0x7FFF, 0x100000, 0x1000, host)) == errno.EINVAL
    )
    # Overlaps slot 0 (guest 0..64 KiB).
    assert _errno_of(lambda: vm.add_memory_region(0x8000, 0x1000, host)) == errno.EEXIST
    # Not page aligned.
    assert _errno_of(lambda: vm.add_memory_region(0x100800, 0x1000, host)) == errno.EINVAL
    assert _errno_of(lambda: vm.remove_memory_region(7)) == errno.ENOENT
    assert _errno_of(lambda: vm.get_dirty_log(7)) == errno.ENOENT
    # Slot 0 exists but was not added with log_dirty.
    assert _errno_of(lambda: vm.get_dirty_log(vmm.slot)) == errno.ENOENT
    assert [r.slot for r in vm.memory_regions] == [vmm.slot]


def test_add_remove_memory_region(vmm: Machine) -> None:
    vm, host = vmm.vm, vmm.ram.regions[0].host_address
    slot = vm.add_memory_region(0x100000, 0x1000, host, read_only=True)
    assert slot != vmm.slot
    info = vm.remove_memory_region(slot)
    assert (info.guest_addr, info.size, info.flags) == (0x100000, 0x1000, kvm_sys.KVM_MEM_READONLY)
    assert vm.add_memory_region(0x100000, 0x1000, host) == slot  # reused


def test_bad_fds(vmm_irqchip: Machine) -> None:
    vm = vmm_irqchip.vm
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # now a closed fd number
    assert _errno_of(lambda: vm.register_irqfd(r, 5)) == errno.EBADF
    assert _errno_of(lambda: vm.register_ioevent(r, kvm.IoEventAddress.Pio(0x90))) == errno.EBADF
    assert _errno_of(lambda: vm.register_irqfd(-1, 5)) == errno.EBADF
    f = os.open("/dev/null", os.O_RDONLY)
    try:  # not an eventfd
        assert _errno_of(lambda: vm.register_irqfd(f, 5)) in (errno.EINVAL, errno.EBADF)
    finally:
        os.close(f)


def test_duplicate_vcpu_and_bad_msr(vmm: Machine) -> None:
    with vmm.vm.create_vcpu(0) as vcpu:
        assert _errno_of(lambda: vmm.vm.create_vcpu(0)) == errno.EEXIST
        with pytest.raises(kvm.MsrError) as err:
            vcpu.get_msrs([0x10, 0xDEAD0000])
        assert (err.value.index, err.value.done) == (0xDEAD0000, 1)
        with pytest.raises(kvm.MsrError):
            vcpu.set_msrs({0xDEAD0000: 1})


def test_fds_are_cloexec(vmm: Machine) -> None:
    with vmm.vm.create_vcpu(0) as vcpu:
        for obj in (vmm.kvm, vmm.vm, vcpu):
            assert fcntl.fcntl(obj.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_errors_pickle() -> None:
    for e in (kvm.ApiVersionError(11), kvm.ReplyError("x"), kvm.MsrError(0x10, 2)):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e)
        assert str(back) == str(e)


def _assert_all_ebadf(calls: dict[str, Callable[[], object]]) -> None:
    bad: dict[str, object] = {}
    for name, call in calls.items():
        try:
            call()
        except OSError as e:
            if e.errno != errno.EBADF:
                bad[name] = e
        else:
            bad[name] = "no error"
    assert not bad, bad


def test_closed_kvm_raises_ebadf() -> None:
    k = kvm.Kvm()
    k.close()
    k.close()  # idempotent
    assert k.closed
    _assert_all_ebadf(
        {
            "fileno": k.fileno,
            "api_version": k.api_version,
            "check_extension": lambda: k.check_extension(kvm.Cap.IRQCHIP),
            "vcpu_mmap_size": lambda: k.vcpu_mmap_size,
            "get_supported_cpuid": k.get_supported_cpuid,
            "get_emulated_cpuid": k.get_emulated_cpuid,
            "get_msr_index_list": k.get_msr_index_list,
            "create_vm": k.create_vm,
        }
    )


def test_closed_vm_raises_ebadf() -> None:
    with kvm.Kvm() as k:
        vm = k.create_vm()
    with vm:
        pass
    vm.close()
    assert vm.closed
    evt = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        _assert_all_ebadf(
            {
                "fileno": vm.fileno,
                "check_extension": lambda: vm.check_extension(kvm.Cap.IRQFD),
                "enable_cap": lambda: vm.enable_cap(kvm.Cap.SPLIT_IRQCHIP, (24,)),
                "create_vcpu": lambda: vm.create_vcpu(0),
                "set_user_memory_region": lambda: vm.set_user_memory_region(0, 0, 0x1000, 0),
                "add_memory_region": lambda: vm.add_memory_region(0, 0x1000, 0),
                "remove_memory_region": lambda: vm.remove_memory_region(0),
                "get_dirty_log": lambda: vm.get_dirty_log(0),
                "dirty_pages": lambda: vm.dirty_pages(0),
                "create_irqchip": vm.create_irqchip,
                "create_pit2": vm.create_pit2,
                "set_tss_address": lambda: vm.set_tss_address(0xFFFBD000),
                "set_identity_map_address": lambda: vm.set_identity_map_address(0xFEFFC000),
                "set_irq_line": lambda: vm.set_irq_line(4, True),
                "signal_msi": lambda: vm.signal_msi(0xFEE00000, 0x30),
                "set_gsi_routing": lambda: vm.set_gsi_routing([]),
                "register_irqfd": lambda: vm.register_irqfd(evt, 4),
                "unregister_irqfd": lambda: vm.unregister_irqfd(evt, 4),
                "register_ioevent": lambda: vm.register_ioevent(evt, kvm.IoEventAddress.Pio(1)),
                "unregister_ioevent": lambda: vm.unregister_ioevent(
                    evt, kvm.IoEventAddress.Mmio(0x1000)
                ),
                "get_clock": vm.get_clock,
                "set_clock": lambda: vm.set_clock(0),
                "get_irqchip": lambda: vm.get_irqchip(0),
                "set_irqchip": lambda: vm.set_irqchip(0, bytes(512)),
                "get_pit2": vm.get_pit2,
                "set_pit2": lambda: vm.set_pit2(bytes(112)),
            }
        )
    finally:
        os.close(evt)


def test_closed_vcpu_raises_ebadf() -> None:
    with kvm.Kvm() as k, k.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
        lapic, events = kvm.Lapic(), vcpu.get_vcpu_events()
        vcpu.close()
        vcpu.close()
        assert vcpu.closed
        _assert_all_ebadf(
            {
                "fileno": vcpu.fileno,
                "run": vcpu.run,
                "run_code": vcpu.run_code,
                "kick": vcpu.kick,
                "immediate_exit": lambda: vcpu.immediate_exit,
                "set_immediate_exit": lambda: setattr(vcpu, "immediate_exit", True),
                "set_io_in_data": lambda: vcpu.set_io_in_data(b"\0"),
                "set_mmio_read_data": lambda: vcpu.set_mmio_read_data(b"\0"),
                "set_signal_mask": lambda: vcpu.set_signal_mask([]),
                "get_regs": vcpu.get_regs,
                "set_regs": lambda: vcpu.set_regs(regs),
                "get_sregs": vcpu.get_sregs,
                "set_sregs": lambda: vcpu.set_sregs(sregs),
                "get_fpu": vcpu.get_fpu,
                "set_fpu": lambda: vcpu.set_fpu(fpu),
                "get_msrs": lambda: vcpu.get_msrs([0x10]),
                "set_msrs": lambda: vcpu.set_msrs({0x10: 0}),
                "set_cpuid2": lambda: vcpu.set_cpuid2([kvm.CpuIdEntry(0)]),
                "get_cpuid2": vcpu.get_cpuid2,
                "get_lapic": vcpu.get_lapic,
                "set_lapic": lambda: vcpu.set_lapic(lapic),
                "get_mp_state": vcpu.get_mp_state,
                "set_mp_state": lambda: vcpu.set_mp_state(kvm.MpState.RUNNABLE),
                "get_xsave": vcpu.get_xsave,
                "set_xsave": lambda: vcpu.set_xsave(bytes(4096)),
                "get_xcrs": vcpu.get_xcrs,
                "set_xcrs": lambda: vcpu.set_xcrs(kvm.Xcrs({0: 1})),
                "get_vcpu_events": vcpu.get_vcpu_events,
                "set_vcpu_events": lambda: vcpu.set_vcpu_events(events),
                "get_debugregs": vcpu.get_debugregs,
                "set_debugregs": lambda: vcpu.set_debugregs(kvm.Debugregs()),
                "set_guest_debug": lambda: vcpu.set_guest_debug(0),
                "kvmclock_ctrl": vcpu.kvmclock_ctrl,
                "interrupt": lambda: vcpu.interrupt(0x30),
                "nmi": vcpu.nmi,
                "enable_cap": lambda: vcpu.enable_cap(kvm.Cap.HYPERV_SYNIC),
                "get_tsc_khz": vcpu.get_tsc_khz,
                "set_tsc_khz": lambda: vcpu.set_tsc_khz(1000000),
            }
        )


def test_from_fd_adopts_and_rejects() -> None:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    with kvm.Kvm.from_fd(fd) as k:
        assert k.fileno() == fd
        assert k.api_version() == 12
    assert _errno_of(lambda: os.fstat(fd)) == errno.EBADF  # closed with the Kvm
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    with pytest.raises(OSError):
        kvm.Kvm.from_fd(null)  # not /dev/kvm: ENOTTY
    assert _errno_of(lambda: os.fstat(null)) == errno.EBADF  # owned, so closed, not leaked
