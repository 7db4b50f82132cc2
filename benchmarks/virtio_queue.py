"""virtqueue + virtio-block request path with the mock driver: requests/s of 4 KiB reads.

No peer: this finds Python overheads. It prints, for the same 4 KiB random reads of a 64 MiB
raw image (page cache warm):

* ``preadv floor``   - os.preadv into a guest-memory view alone (the syscall floor from Python);
* ``pop only``       - Queue.pop (ring read + chain validation) and add_used, no I/O;
* ``device, inline`` - Block.process_queue called directly on batches of chains;
* ``device, thread`` - the real worker thread: kick eventfd, wait for the interrupt eventfd.

Run: python benchmarks/virtio_queue.py [seconds-per-case]
"""

from __future__ import annotations

import os
import random
import struct
import sys
import tempfile
import time
from collections.abc import Callable

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import Block, Interrupt, Queue
from sys_util import EventFd

IMAGE_SIZE = 64 << 20
QSIZE = 256
BATCH = QSIZE // 3  # 3 descriptors per request (header, data, status)
HDR = struct.Struct("<IIQ")


def rate(fn: Callable[[], int], seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += fn()
    return done / elapsed


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    rnd = random.Random(1)
    sectors = IMAGE_SIZE // 512 - 8
    with tempfile.TemporaryDirectory() as tmp, make_guest_memory(32 << 20) as mem:
        path = os.path.join(tmp, "bench.img")
        with open(path, "wb") as f:
            f.write(os.urandom(IMAGE_SIZE))
        block = Block.open(path)
        block.ack_features(block.features())
        drv = VirtQueueDriver(mem, 0x10000, QSIZE, data_size=8 << 20)
        chains = [
            drv.add_request([HDR.pack(0, 0, 0)], [4096, 1], publish=False) for _ in range(BATCH)
        ]
        hdr_addrs = [c.readable[0][0] for c in chains]

        def publish_batch() -> None:
            for c, addr in zip(chains, hdr_addrs, strict=True):
                HDR.pack_into(mem.view(addr, 16), 0, 0, 0, rnd.randrange(sectors) & ~7)
                drv.publish(c.head)

        # preadv floor
        fd = block.disk.fileno()
        view = mem.view(0x400000, 4096)

        def floor() -> int:
            for _ in range(BATCH):
                os.preadv(fd, [view], (rnd.randrange(sectors) & ~7) * 512)
            return BATCH

        # pop only
        q = drv.make_queue(QSIZE, features=block.acked_features)

        def pop_only() -> int:
            publish_batch()
            n = 0
            while (c := q.pop()) is not None:
                q.add_used(c.head, 0)
                n += 1
            drv.last_used = q.next_used
            return n

        # device inline
        irq = EventFd(nonblocking=True)
        interrupt = Interrupt(intx_evt=irq)
        block.interrupt = interrupt
        q2 = drv.make_queue(QSIZE, features=block.acked_features)
        drv.avail_idx = 0
        drv.last_used = 0

        def inline() -> int:
            publish_batch()
            before = q2.next_used
            block.process_queue(0, q2)
            drv.last_used = q2.next_used
            return (q2.next_used - before) & 0xFFFF

        results: dict[str, float] = {}
        results["preadv floor"] = rate(floor, seconds)
        drv.mem.write_u16(drv.avail_ring + 2, 0)
        drv.mem.write_u16(drv.used_ring + 2, 0)
        drv.avail_idx = 0
        results["pop only"] = rate(pop_only, seconds)
        drv.avail_idx = 0
        drv.mem.write_u16(drv.avail_ring + 2, 0)
        drv.mem.write_u16(drv.used_ring + 2, 0)
        q2 = drv.make_queue(QSIZE, features=block.acked_features)
        results["device, inline"] = rate(inline, seconds)
        block.interrupt = None

        # device in its worker thread
        drv.avail_idx = 0
        drv.last_used = 0
        drv.mem.write_u16(drv.avail_ring + 2, 0)
        drv.mem.write_u16(drv.used_ring + 2, 0)
        q3 = Queue(QSIZE)
        drv.configure(q3)
        q3.activate(mem, block.acked_features)
        kick = EventFd()
        wake = EventFd()
        block.activate(mem, Interrupt(intx_evt=wake), [q3], [kick])

        def threaded() -> int:
            publish_batch()
            kick.write(1)
            target = (drv.last_used + BATCH) & 0xFFFF
            while (seen := drv.used_idx()) != target:
                drv.set_used_event(seen)  # as Linux: "interrupt me after what I have seen"
                if drv.used_idx() == seen:
                    wake.read_timeout(1.0)
            drv.last_used = target
            return BATCH

        results["device, thread"] = rate(threaded, seconds)
        block.close()
        for e in (irq, kick, wake):
            e.close()

    floor_rate = results["preadv floor"]
    print(f"4 KiB random reads, batches of {BATCH}, {seconds:.1f} s per case")
    for name, r in results.items():
        print(
            f"  {name:16s} {r:10.0f} req/s  {1e6 / r:7.2f} us/req  ({r / floor_rate:4.2f}x floor)"
        )
    overhead = 1e6 / results["device, inline"] - 1e6 / floor_rate
    print(f"  Python overhead per request over the preadv floor: {overhead:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
