"""The device sandbox: what jailing a virtio-block device costs.

Peer: the same device in-process, in the same run. Printed:

* ``4K reads/s, irqfd`` - random 4 KiB reads through the virtqueue (mock driver, ioeventfd
  kick, irqfd completion: what MSI-X gives a guest). The data path never crosses the proxy
  (shared memfd guest memory, eventfds inherited by the fork), so the jailed device should be
  about as fast;
* ``4K reads/s, +ISR rd`` - the same plus one ISR register read per completion batch, what an
  INTx guest does: that read does cross the proxy;
* ``BAR read`` / ``config read`` - latency of one register access (a vCPU's MMIO exit or a
  config cycle): direct call vs a round trip over the proxy's socket to the jailed process;
* ``fork + jail`` - time to fork a device into its jail (namespaces, pivot_root, seccomp).

Needs root (user/PID/mount/net namespaces). Run: python benchmarks/sandbox.py [seconds-per-case]
"""

from __future__ import annotations

import os
import random
import select
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from devices.proxy import ProxyDevice, Sandbox
from devices.testing import FakeIrqRouter, VirtQueueDriver, make_guest_memory
from devices.virtio import Block, DeviceStatus, VirtioPciDevice
from sys_util import EventFd, GuestMemory

IMAGE_SIZE = 64 << 20
QSIZE = 256
BATCH = QSIZE // 3
HDR = struct.Struct("<IIQ")
S = DeviceStatus


@dataclass(frozen=True)
class Ctx:
    memory: GuestMemory
    irq_router: FakeIrqRouter


class Bar:
    """BAR0 common-config accesses (what the guest's virtio-pci driver does)."""

    def __init__(self, dev: VirtioPciDevice | ProxyDevice) -> None:
        self.dev = dev

    def get(self, off: int, size: int) -> int:
        return int.from_bytes(self.dev.read(off, size), "little")

    def set(self, off: int, size: int, value: int) -> None:
        self.dev.write(off, value.to_bytes(size, "little"))

    def bring_up(self, vq: VirtQueueDriver) -> None:
        self.set(20, 1, 0)
        self.set(20, 1, S.ACKNOWLEDGE | S.DRIVER)
        self.set(0, 4, 1)
        high = self.get(4, 4)
        self.set(8, 4, 1)
        self.set(12, 4, high)
        self.set(20, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        self.set(22, 2, 0)
        self.set(24, 2, vq.size)
        for off, addr in ((32, vq.desc_table), (40, vq.avail_ring), (48, vq.used_ring)):
            self.set(off, 4, addr & 0xFFFF_FFFF)
            self.set(off + 4, 4, addr >> 32)
        self.set(28, 2, 1)
        self.set(20, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)


def rate(fn: Callable[[], int], seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += fn()
    return done / elapsed


def latency(fn: Callable[[], object], seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return elapsed / n


def block_reads(
    mem: GuestMemory,
    dev: VirtioPciDevice | ProxyDevice,
    drv: VirtQueueDriver,
    irq: EventFd,
    seconds: float,
    isr: bool,
) -> float:
    rnd = random.Random(1)
    sectors = IMAGE_SIZE // 512 - 8
    kick = dev.ioevents()[0].event
    assert isinstance(kick, EventFd)
    chains = [drv.add_request([HDR.pack(0, 0, 0)], [4096, 1], publish=False) for _ in range(BATCH)]

    def batch() -> int:
        for c in chains:
            HDR.pack_into(mem.view(c.readable[0][0], 16), 0, 0, 0, rnd.randrange(sectors) & ~7)
            drv.publish(c.head)
        kick.write(1)  # what KVM's ioeventfd does on the guest's notify write
        done = 0
        while done < BATCH:
            select.select([irq], [], [], 5.0)
            irq.read()
            if isr:
                dev.read(0x1000, 1)  # ISR read-to-clear, as the guest's INTx handler does
            done += len(drv.pop_used())
        return done

    return rate(batch, seconds)


def main() -> int:
    if os.geteuid() != 0:
        print("sandbox: needs root (namespaces); skipped")
        return 0
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    with tempfile.TemporaryDirectory() as tmp, make_guest_memory(32 << 20) as mem:
        path = os.path.join(tmp, "bench.img")
        with open(path, "wb") as f:
            f.write(os.urandom(IMAGE_SIZE))
        ctx = Ctx(mem, FakeIrqRouter())
        irq_a, irq_b, res_a, res_b = EventFd(), EventFd(), EventFd(), EventFd()

        direct = VirtioPciDevice(Block.open(path, read_only=True), mem)
        direct.allocate_bars(lambda size, align: 0xE000_0000)
        direct.assign_irq(irq_a, res_a, 16, 1)

        with Sandbox() as sandbox:

            def make(c: Ctx) -> VirtioPciDevice:
                return VirtioPciDevice(Block.open(path, read_only=True), c.memory)

            factory = sandbox.sandboxed(make, "block_device")
            proxy = factory(ctx)
            proxy.allocate_bars(lambda size, align: 0xE000_8000)
            proxy.assign_irq(irq_b, res_b, 17, 1)
            t0 = time.perf_counter()
            sandbox.start()
            jail_ms = (time.perf_counter() - t0) * 1e3

            rows = []
            drivers = []
            for dev, base in ((direct, 0x100000), (proxy, 0x400000)):
                drv = VirtQueueDriver(mem, base, QSIZE, data_base=base + 0x10000, data_size=2 << 20)
                Bar(dev).bring_up(drv)
                drivers.append(drv)
            for isr, name in ((False, "4K reads/s, irqfd"), (True, "4K reads/s, +ISR rd")):
                d_rate = block_reads(mem, direct, drivers[0], irq_a, seconds, isr)
                p_rate = block_reads(mem, proxy, drivers[1], irq_b, seconds, isr)
                rows.append((name, d_rate, p_rate, p_rate / d_rate, "x"))
            d_bar = latency(lambda: direct.read(20, 1), seconds / 2)
            p_bar = latency(lambda: proxy.read(20, 1), seconds / 2)
            rows.append(("BAR read (us)", d_bar * 1e6, p_bar * 1e6, p_bar / d_bar, "x slower"))
            d_cfg = latency(lambda: direct.read_config_register(0), seconds / 2)
            p_cfg = latency(lambda: proxy.read_config_register(0), seconds / 2)
            rows.append(("config read (us)", d_cfg * 1e6, p_cfg * 1e6, p_cfg / d_cfg, "x slower"))
            deaths = [d.message for d in sandbox.monitor.deaths]
        direct.close()
        for e in (irq_a, irq_b, res_a, res_b):
            e.close()
    print(f"{'':20} {'in-process':>12} {'jailed':>12}  ratio")
    for name, d, p, ratio, unit in rows:
        print(f"{name:20} {d:12.1f} {p:12.1f}  {ratio:.2f}{unit}")
    print(f"fork + jail of one device: {jail_ms:.1f} ms")
    if deaths:
        print("device deaths:", deaths, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
