"""A vhost device activated, interrupted and reset inside a real jail with its seccomp policy.

There is no /dev/vhost-* here, so the backend is ``sys_util``'s real ioctl code pointed at an
*unattached* ``/dev/net/tun`` fd: the tun driver answers every ioctl that reaches it with
``EBADFD``, while one the policy refuses fails with ``ENOTTY`` before it gets there. The probe
records each answer and lets the device carry on, so the whole activation (owner, features,
memory table, rings, eventfds, the worker thread), a kernel "call" turned into an interrupt, and
the reset run under the policy. Any syscall the policy lacks kills the device process.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devices.irq import IoEvent, IrqRouter
from devices.pci import BarAllocator, PciBar
from devices.proxy import Sandbox
from devices.testing import FakeIrqRouter, VirtQueueDriver, make_guest_memory
from devices.virtio import Interrupt
from devices.virtio.net import Tap, TapError
from devices.virtio.vhost import VhostNet, VhostVsock
from sys_util import EventFd, GuestMemory, VhostError
from sys_util import VhostNet as VhostNetFd
from sys_util import VhostVsock as VhostVsockFd

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun"),
]

FEATURES = 1 << 32 | 1 << 29 | 1 << 28 | 1 << 15


@dataclass(frozen=True)
class Ctx:
    memory: GuestMemory
    irq_router: IrqRouter


class Probe:
    """Forwards each vhost call to sys_util's ioctl code on a tun fd and records the errno."""

    def __init__(self, fd: VhostNetFd | VhostVsockFd, log: list[tuple[str, int]]) -> None:
        self.fd = fd
        self.log = log

    def fileno(self) -> int:
        return self.fd.fileno()

    def close(self) -> None:
        self.fd.close()

    def get_features(self) -> int:  # called before the fork
        return FEATURES

    def set_guest_cid(self, cid: int) -> None:  # called before the fork
        pass

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.fd, name)

        def call(*args: Any) -> int:
            try:
                method(*args)
            except VhostError as err:
                self.log.append((err.request, err.errno))
            return 0

        return call


class ProbeTap:
    def __init__(self, tap: Tap, log: list[tuple[str, int]]) -> None:
        self.tap = tap
        self.name = "probe"
        self.log = log

    def fileno(self) -> int:
        return self.tap.fileno()

    def close(self) -> None:
        self.tap.close()

    def set_vnet_hdr_size(self, size: int) -> None:
        try:
            self.tap.set_vnet_hdr_size(size)
        except TapError as err:
            self.log.append((err.what, err.errno))

    def set_offload(self, flags: int) -> None:
        try:
            self.tap.set_offload(flags)
        except TapError as err:
            self.log.append((err.what, err.errno))


def _tun() -> int:
    return os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)


class Harness:
    """A proxied "PCI device" whose config register 0 runs a vhost device's whole life."""

    def __init__(self, device: VhostNet | VhostVsock, mem: GuestMemory, log: list[Any]) -> None:
        self.device = device
        self.mem = mem
        self.log = log

    def debug_label(self) -> str:
        return "vhost-harness"

    def read_config_register(self, reg_idx: int) -> int:
        dev, mem = self.device, self.mem
        self.log.clear()
        n = len(dev.queue_max_sizes)
        drivers = [VirtQueueDriver(mem, 0x10000 + 0x20000 * i, 64) for i in range(n)]
        kicks = [EventFd() for _ in range(n)]
        irq = EventFd(nonblocking=True)
        try:
            dev.ack_features(dev.features())
            queues = [d.make_queue(features=dev.acked_features) for d in drivers]
            dev.activate(mem, Interrupt(intx_evt=irq), queues, kicks)
            # The kernel's "call" on ring 1 must come out as the guest's interrupt.
            os.write(dev._calls[1].fileno(), (1).to_bytes(8, "little"))
            interrupted = bool(select.select([irq], [], [], 10)[0])
            dev.reset()
        finally:
            for evt in (*kicks, irq):
                evt.close()
        refused = sum(1 for _, code in self.log if code == errno.ENOTTY)
        reached = sum(1 for _, code in self.log if code == errno.EBADFD)
        unexpected = len(self.log) - refused - reached
        return refused | reached << 8 | unexpected << 16 | interrupted << 24

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass

    def allocate_bars(self, allocator: BarAllocator) -> list[PciBar]:
        return []

    def ioevents(self) -> list[IoEvent]:
        return []

    def assign_irq(
        self, irq_evt: EventFd, resample_evt: EventFd | None, line: int, pin: int
    ) -> None:
        pass

    def keep_fds(self) -> list[int]:
        return self.device.keep_fds()

    def close(self) -> None:
        self.device.close()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(1 << 20) as m:
        yield m


def _run_in_jail(mem: GuestMemory, build: Any, policy: str) -> tuple[int, int, int, bool]:
    deaths: list[str] = []
    with Sandbox(on_device_death=lambda d: deaths.append(d.message)) as sb:
        proxy = sb.sandboxed(lambda ctx: build(ctx.memory), policy)(Ctx(mem, FakeIrqRouter()))
        sb.start()
        value = proxy.read_config_register(0)
        assert value != 0xFFFF_FFFF, "the device process died (a syscall outside the policy?)"
    assert not deaths, deaths
    return value & 0xFF, value >> 8 & 0xFF, value >> 16 & 0xFF, bool(value >> 24 & 1)


def test_vhost_net_lives_within_its_policy(mem: GuestMemory) -> None:
    def build(memory: GuestMemory) -> Harness:
        log: list[tuple[str, int]] = []
        probe = Probe(VhostNetFd.from_fd(_tun()), log)
        device = VhostNet(probe, ProbeTap(Tap(_tun(), "probe"), log), mac=bytes(6))  # type: ignore[arg-type]
        log.clear()  # the tap offload probe ran here, before the fork
        return Harness(device, memory, log)

    refused, reached, unexpected, interrupted = _run_in_jail(mem, build, "vhost_net_device")
    # set_owner, set_features, set_mem_table; 2 rings x 6; vnet hdr, offload; 2 backends;
    # reset: 2 detaches, 2 x (get base + 3 unbinds).
    assert (refused, unexpected) == (0, 0)
    assert reached == 3 + 12 + 2 + 2 + 2 + 8
    assert interrupted


def test_vhost_vsock_lives_within_its_policy(mem: GuestMemory) -> None:
    def build(memory: GuestMemory) -> Harness:
        log: list[tuple[str, int]] = []
        device = VhostVsock(Probe(VhostVsockFd.from_fd(_tun()), log), 42)  # type: ignore[arg-type]
        return Harness(device, memory, log)

    refused, reached, unexpected, interrupted = _run_in_jail(mem, build, "vhost_vsock_device")
    # set_owner, set_features, set_mem_table; 2 rings x 6; running; reset: stop, 2 x 4.
    assert (refused, unexpected) == (0, 0)
    assert reached == 3 + 12 + 1 + 1 + 8
    assert interrupted


def test_the_probe_tells_refused_from_reached(mem: GuestMemory) -> None:
    """The same run under a policy without the vhost ioctls: every one comes back ENOTTY."""

    def build(memory: GuestMemory) -> Harness:
        log: list[tuple[str, int]] = []
        device = VhostVsock(Probe(VhostVsockFd.from_fd(_tun()), log), 42)  # type: ignore[arg-type]
        return Harness(device, memory, log)

    refused, reached, unexpected, _ = _run_in_jail(mem, build, "rng_device")
    assert (reached, unexpected) == (0, 0)
    assert refused == 3 + 12 + 1 + 1 + 8
