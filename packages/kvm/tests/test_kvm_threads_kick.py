"""vCPU threads: KVM_RUN releases the GIL, and kick() interrupts a running guest."""

from __future__ import annotations

import errno
import threading
import time

import pytest

import kvm
from kvm.testing import Machine, run_in_thread, setup_real_mode

pytestmark = pytest.mark.kvm

SPIN = bytes.fromhex("ebfe")  # jmp .   (never exits on its own)
OUT_LOOP = bytes.fromhex("e610ebfc")  # out %al,$0x10; jmp .-2


def test_kick_before_run_returns_intr_once(vmm: Machine) -> None:
    vmm.ram.write(0x1000, OUT_LOOP)
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        vcpu.kick()
        assert vcpu.run() == kvm.Intr()
        assert vcpu.run() == kvm.IoOut(0x10, 1, 1, b"\0")


def test_kick_interrupts_a_spinning_guest(vmm: Machine) -> None:
    vmm.ram.write(0x1000, SPIN)
    with vmm.vm.create_vcpu(0) as vcpu:
        setup_real_mode(vcpu, 0x1000)
        entered = threading.Event()

        def vcpu_thread() -> list[kvm.VcpuExit]:
            vcpu.setup_kick()
            exits = []
            for _ in range(3):
                entered.set()
                exits.append(vcpu.run())
            return exits

        def kicker() -> None:
            for _ in range(3):
                entered.wait()
                entered.clear()
                time.sleep(0.05)  # let the thread get into KVM_RUN (correct either way)
                vcpu.kick()

        k = threading.Thread(target=kicker, daemon=True)
        k.start()
        exits = run_in_thread(vcpu_thread, timeout=30)
        k.join(5)
        assert exits == [kvm.Intr()] * 3
        assert vcpu.get_regs().rip == 0x1000  # it was spinning on the jmp
        # No kick is left pending: the next run goes back into the guest.
        vmm.ram.write(0x1000, OUT_LOOP)
        assert run_in_thread(vcpu.run) == kvm.IoOut(0x10, 1, 1, b"\0")


def test_two_vcpus_run_concurrently(vmm: Machine) -> None:
    """vCPU 1 spins inside KVM_RUN while vCPU 0 makes exits in another thread: impossible if
    KVM_RUN held the GIL (this thread could not even start the second one)."""
    vmm.ram.write(0x1000, OUT_LOOP)
    vmm.ram.write(0x2000, SPIN)
    with vmm.vm.create_vcpu(0) as worker, vmm.vm.create_vcpu(1) as spinner:
        setup_real_mode(worker, 0x1000)
        setup_real_mode(spinner, 0x2000)
        result: dict[str, kvm.VcpuExit] = {}
        inside = threading.Event()

        def spin() -> None:
            spinner.setup_kick()
            inside.set()
            result["spinner"] = spinner.run()

        t = threading.Thread(target=spin, daemon=True)
        t.start()
        assert inside.wait(10)
        time.sleep(0.05)

        def work() -> int:
            n = 0
            for _ in range(200):
                if worker.run() == kvm.IoOut(0x10, 1, 1, b"\0"):
                    n += 1
            return n

        assert run_in_thread(work, timeout=30) == 200
        assert t.is_alive()  # still in the guest all along
        spinner.kick()
        t.join(10)
        assert not t.is_alive()
        assert result["spinner"] == kvm.Intr()


def test_close_while_running_stops_the_run_then_unmaps(vmm: Machine) -> None:
    vmm.ram.write(0x1000, SPIN)
    vcpu = vmm.vm.create_vcpu(0)
    setup_real_mode(vcpu, 0x1000)
    box: dict[str, object] = {}
    entered = threading.Event()

    def go() -> None:
        vcpu.setup_kick()
        entered.set()
        box["exit"] = vcpu.run()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    assert entered.wait(10)
    time.sleep(0.05)
    vcpu.close()  # from another thread, mid-run: the run returns, then the page goes
    t.join(10)
    assert not t.is_alive()
    assert box["exit"] == kvm.Intr()
    assert vcpu.closed
    with pytest.raises(OSError) as err:
        vcpu.run()
    assert err.value.errno == errno.EBADF
