"""virtio-balloon in a jailed device process: the VMM's balloon commands travel over the
proxy's control socket, inflated pages leave the shared guest memfd, and a dead balloon is
reported by name."""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devices.irq import IrqRouter
from devices.proxy import BalloonState, DeviceDeath, ProxyDevice, Sandbox
from devices.testing import FakeIrqRouter, VirtQueueDriver, make_guest_memory
from devices.virtio import DeviceStatus, VirtioPciDevice
from devices.virtio.balloon import Balloon, BalloonStat
from sys_util import EventFd, GuestMemory

S = DeviceStatus
BAR = 0xE000_0000
DEVICE_CFG = 0x2000
NOTIFY = 0x3000
MIB = 1 << 20
STAT = struct.Struct("<HQ")


@dataclass(frozen=True)
class Ctx:
    memory: GuestMemory
    irq_router: IrqRouter


class Driver:
    """The common-configuration steps of a virtio-pci driver, through the proxy."""

    def __init__(self, dev: ProxyDevice) -> None:
        self.dev = dev

    def common(self, off: int, size: int) -> int:
        return int.from_bytes(self.dev.read(off, size), "little")

    def set_common(self, off: int, size: int, value: int) -> None:
        self.dev.write(off, value.to_bytes(size, "little"))

    def negotiate(self) -> bool:
        self.set_common(20, 1, S.ACKNOWLEDGE | S.DRIVER)
        for sel in (0, 1):
            self.set_common(0, 4, sel)
            feats = self.common(4, 4)
            self.set_common(8, 4, sel)
            self.set_common(12, 4, feats)
        self.set_common(20, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        return bool(self.common(20, 1) & S.FEATURES_OK)

    def setup_queue(self, index: int, vq: VirtQueueDriver) -> None:
        self.set_common(22, 2, index)
        self.set_common(24, 2, vq.size)
        for off, addr in ((32, vq.desc_table), (40, vq.avail_ring), (48, vq.used_ring)):
            self.set_common(off, 4, addr & 0xFFFF_FFFF)
            self.set_common(off + 4, 4, addr >> 32)
        self.set_common(28, 2, 1)

    def driver_ok(self) -> None:
        self.set_common(20, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)


class MainLoop:
    """The VMM main loop's part: serve the sandbox's sources (IRQ router, monitor)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            handlers = dict(self.sandbox.sources())
            ready, _, _ = select.select(list(handlers), [], [], 0.02)
            for fd in ready:
                handlers[fd]()

    def __enter__(self) -> MainLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def _place(proxy: ProxyDevice) -> tuple[EventFd, EventFd]:
    assert proxy.allocate_bars(lambda size, align: BAR)[0].address == BAR
    irq, resample = EventFd(), EventFd()
    proxy.assign_irq(irq, resample, 16, 1)
    return irq, resample


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(32 << 20) as m:
        yield m


def _balloon_factory(ctx: Ctx) -> VirtioPciDevice:
    return VirtioPciDevice(Balloon(), ctx.memory, msix_router=ctx.irq_router)


def _stats_buffer(values: dict[int, int]) -> bytes:
    return b"".join(STAT.pack(tag, value) for tag, value in values.items())


class BalloonDriver:
    """A Linux-like balloon driver: three queues, a stats buffer posted at start-up."""

    def __init__(self, proxy: ProxyDevice, mem: GuestMemory) -> None:
        self.proxy = proxy
        self.drv = Driver(proxy)
        assert self.drv.negotiate()
        self.vqs = [
            VirtQueueDriver(mem, 0x10000 * (i + 1), 16, data_base=0x100000 * (i + 1),
                            data_size=0x40000)
            for i in range(3)
        ]  # fmt: skip
        for i, vq in enumerate(self.vqs):
            self.drv.setup_queue(i, vq)
        self.drv.driver_ok()

    def kick(self, queue: int) -> None:
        self.proxy.write(NOTIFY + 4 * queue, queue.to_bytes(2, "little"))

    def post_stats(self, values: dict[int, int]) -> None:
        self.vqs[2].add_request([_stats_buffer(values)])
        self.kick(2)

    def config(self) -> tuple[int, int]:
        num_pages, actual = struct.unpack("<II", self.proxy.read(DEVICE_CFG, 8))
        return num_pages, actual

    def set_actual(self, pages: int) -> None:
        self.proxy.write(DEVICE_CFG + 4, struct.pack("<I", pages))


def _sandboxed_balloon(sandbox: Sandbox, mem: GuestMemory) -> tuple[ProxyDevice, FakeIrqRouter]:
    router = FakeIrqRouter()
    proxy = sandbox.sandboxed(_balloon_factory, "balloon_device")(Ctx(mem, router))
    return proxy, router


def test_before_start_the_commands_reach_the_device_directly(mem: GuestMemory) -> None:
    with Sandbox() as sandbox:
        proxy, _ = _sandboxed_balloon(sandbox, mem)
        proxy.balloon_adjust(3 * MIB)
        inner = proxy.device
        assert isinstance(inner, VirtioPciDevice) and isinstance(inner.device, Balloon)
        assert inner.device.num_pages == 768
        # No driver yet: no stats queue, the size alone.
        assert proxy.balloon_stats(0.1) == BalloonState(0, None)
        with pytest.raises(OSError) as info:
            proxy.balloon_adjust(-1)
        assert info.value.errno == errno.EINVAL


@pytest.mark.root
def test_jailed_balloon_adjust_stats_and_inflate(mem: GuestMemory) -> None:
    deaths: list[DeviceDeath] = []
    with Sandbox(log_failures=True, on_device_death=deaths.append) as sandbox:
        proxy, _ = _sandboxed_balloon(sandbox, mem)
        irq, resample = _place(proxy)
        sandbox.start()
        with MainLoop(sandbox), irq, resample:
            guest = BalloonDriver(proxy, mem)
            guest.post_stats({BalloonStat.MEMFREE: 1})

            # crosvm balloon 8M: the target reaches the jailed device, which tells the guest.
            proxy.balloon_adjust(8 * MIB)
            assert guest.config() == (2048, 0)
            assert irq.read() >= 1  # the configuration-change interrupt (INTx)

            # The guest inflates 2 MiB of pages it had filled: the jailed process discards
            # them with MADV_REMOVE on the shared memfd, so this process reads zeros and the
            # memfd's allocated blocks fall.
            first_pfn, count = (16 * MIB) >> 12, 512
            mem.write(first_pfn << 12, b"\xa5" * (count << 12))
            blocks_before = os.fstat(mem.memfd.fileno()).st_blocks
            pfns = struct.pack(f"<{count}I", *range(first_pfn, first_pfn + count))
            chain = guest.vqs[0].add_request([pfns])
            guest.kick(0)
            assert guest.vqs[0].wait_used(1, timeout=10) == [(chain.head, 0)]
            freed = (blocks_before - os.fstat(mem.memfd.fileno()).st_blocks) * 512
            assert freed >= (count - 16) << 12, freed  # (the rings may fault a page in)
            # (Read after measuring: a read fault of a shmem hole allocates a zeroed page.)
            assert mem.read(first_pfn << 12, count << 12) == bytes(count << 12)
            guest.set_actual(count)

            # crosvm balloon_stats: the device gives the held buffer back, the guest refills
            # it, the answer travels back over the control socket.
            fresh = {BalloonStat.MEMFREE: 100 * MIB, BalloonStat.MEMTOT: 256 * MIB,
                     BalloonStat.MAJFLT: 7, 42: 5}  # fmt: skip

            def answer() -> None:
                guest.vqs[2].wait_used(1, timeout=10)
                guest.post_stats(fresh)

            t = threading.Thread(target=answer, daemon=True)
            t.start()
            state = proxy.balloon_stats(5.0)
            t.join(10)
            del fresh[42]  # a tag outside the report's slots is dropped, not an error
            assert state == BalloonState(count, {int(k): v for k, v in fresh.items()})

            # A guest that never answers: ETIMEDOUT, and the device still serves the next one.
            with pytest.raises(OSError) as info:
                proxy.balloon_stats(0.3)
            assert info.value.errno == errno.ETIMEDOUT
            proxy.balloon_adjust(0)
            assert guest.config() == (0, count)
        assert deaths == [], [d.message for d in deaths]


@pytest.mark.root
def test_a_dead_balloon_is_named_and_its_commands_fail(mem: GuestMemory) -> None:
    deaths: list[DeviceDeath] = []
    with Sandbox(on_device_death=deaths.append) as sandbox:
        proxy, _ = _sandboxed_balloon(sandbox, mem)
        irq, resample = _place(proxy)
        sandbox.start()
        with irq, resample:
            assert proxy.pid is not None
            os.kill(proxy.pid, signal.SIGKILL)
            ready, _, _ = select.select([sandbox.monitor], [], [], 10)
            assert ready
            sandbox.monitor.on_readable()
            assert [d.message for d in deaths] == [
                f"device pci-virtio-balloon (pid {proxy.pid}) died: killed by SIGKILL"
            ]
            for call in (lambda: proxy.balloon_adjust(MIB), lambda: proxy.balloon_stats(0.1)):
                with pytest.raises(OSError) as info:
                    call()
                assert info.value.errno == errno.EIO


@pytest.mark.root
def test_only_a_balloon_gets_a_control_socket(mem: GuestMemory) -> None:
    from devices.virtio import Rng

    with Sandbox() as sandbox:
        proxy = sandbox.sandboxed(lambda ctx: VirtioPciDevice(Rng(), ctx.memory), "rng_device")(
            Ctx(mem, FakeIrqRouter())
        )
        sandbox.start()
        with pytest.raises(OSError) as info:
            proxy.balloon_adjust(MIB)
        assert info.value.errno == errno.ENOTTY
