"""virtio-balloon driven by the mock virtqueue driver: inflate discards host pages, deflate
validates, hostile PFNs are skipped, the stats queue round trip, configuration and reset."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator, Mapping

import pytest

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import DeviceType, Interrupt, IsrBits
from devices.virtio.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    Balloon,
    BalloonStat,
)
from sys_util import EventFd, GuestMemory

MEM_SIZE = 4 << 20
PAGE = 4096
POOL = 0x200000  # the "guest pages" the tests balloon: [2 MiB, 4 MiB)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(MEM_SIZE) as m:
        yield m


def pfn_list(*pfns: int) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def stats_buffer(entries: Mapping[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in entries.items())


class Setup:
    """A balloon activated with inflate, deflate and (if negotiated) stats queues."""

    def __init__(self, mem: GuestMemory, *, stats: bool = True, stats_first: bytes | None = None):
        self.mem = mem
        self.balloon = Balloon()
        features = self.balloon.features()
        if not stats:
            features &= ~(1 << VIRTIO_BALLOON_F_STATS_VQ)
        self.balloon.ack_features(features)
        feat = self.balloon.acked_features
        self.inflate = VirtQueueDriver(mem, 0x10000, 16, data_base=0x100000, data_size=0x40000)
        self.deflate = VirtQueueDriver(mem, 0x20000, 16, data_base=0x140000, data_size=0x40000)
        self.stats = VirtQueueDriver(mem, 0x30000, 16, data_base=0x180000, data_size=0x40000)
        self.evts = [EventFd(), EventFd(), EventFd()]
        self.irq = EventFd(nonblocking=True)
        self.interrupt = Interrupt(intx_evt=self.irq)
        self.first_stats = None
        if stats_first is not None:  # the driver posts its first buffer before DRIVER_OK
            self.first_stats = self.stats.add_request([stats_first])
        queues = [self.inflate.make_queue(features=feat), self.deflate.make_queue(features=feat)]
        if stats:
            queues.append(self.stats.make_queue(features=feat))
        self.balloon.activate(mem, self.interrupt, queues, self.evts)

    def send(self, driver: VirtQueueDriver, evt: EventFd, data: bytes) -> None:
        chain = driver.add_request([data])
        driver.kick(evt)
        assert driver.wait_used(1) == [(chain.head, 0)]

    def close(self) -> None:
        self.balloon.close()
        for e in [*self.evts, self.irq]:
            e.close()


@pytest.fixture
def setup(mem: GuestMemory) -> Iterator[Setup]:
    s = Setup(mem)
    yield s
    s.close()


def test_identity_and_features() -> None:
    with Balloon() as b:
        assert b.device_type == DeviceType.BALLOON
        assert int(DeviceType.BALLOON) == 5
        assert len(b.queue_max_sizes) == 3
        for bit in (VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_STATS_VQ,
                    VIRTIO_BALLOON_F_DEFLATE_ON_OOM):  # fmt: skip
            assert b.features() >> bit & 1
    with Balloon(deflate_on_oom=False) as b:
        assert not b.features() >> VIRTIO_BALLOON_F_DEFLATE_ON_OOM & 1


def test_inflate_discards_pages_on_the_host(
    setup: Setup, mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = GuestMemory.remove_range

    def spy(self: GuestMemory, addr: int, length: int) -> None:
        calls.append((addr, length))
        real(self, addr, length)

    monkeypatch.setattr(GuestMemory, "remove_range", spy)
    mem.write(POOL, b"\xa5" * (32 * PAGE))
    base = POOL // PAGE
    # Two runs of consecutive PFNs (in the driver's order) and one lone page.
    setup.send(setup.inflate, setup.evts[0], pfn_list(*range(base, base + 8), base + 20, base + 9))
    assert calls == [(POOL, 8 * PAGE), (POOL + 20 * PAGE, PAGE), (POOL + 9 * PAGE, PAGE)]
    # The memfd has holes there now: the pages went back to the host. (Checked before reading
    # them: a read fault on shared memory allocates a fresh zero page.)
    fd = mem.memfd.fileno()
    for page, hole in ((0, True), (7, True), (8, False), (9, True), (10, False), (20, True)):
        offset = POOL + page * PAGE
        found = os.lseek(fd, offset, os.SEEK_HOLE if hole else os.SEEK_DATA)
        assert found == offset, (page, hole)
    assert mem.read(POOL, 8 * PAGE) == bytes(8 * PAGE)
    assert mem.read(POOL + 9 * PAGE, PAGE) == bytes(PAGE)
    assert mem.read(POOL + 20 * PAGE, PAGE) == bytes(PAGE)
    # Pages not given to the balloon keep their contents.
    assert mem.read(POOL + 8 * PAGE, PAGE) == b"\xa5" * PAGE
    assert mem.read(POOL + 10 * PAGE, 10 * PAGE) == b"\xa5" * (10 * PAGE)
    assert mem.read(POOL + 21 * PAGE, PAGE) == b"\xa5" * PAGE
    assert setup.balloon.inflated_pages == 10 and setup.balloon.invalid_pfns == 0


def test_hostile_pfns_are_skipped_and_the_device_keeps_serving(
    setup: Setup, mem: GuestMemory
) -> None:
    last = MEM_SIZE // PAGE - 1
    mem.write(last * PAGE, b"\x11" * PAGE)
    mem.write(POOL, b"\x22" * PAGE)
    # Far outside RAM, just past its end, a run that leaves RAM, and the u32 maximum.
    setup.send(setup.inflate, setup.evts[0],
               pfn_list(0xFFFF_FFFF, last + 1, last, last + 1, last + 2, 1 << 20))  # fmt: skip
    assert setup.balloon.invalid_pfns == 5
    assert setup.balloon.inflated_pages == 1
    assert mem.read(last * PAGE, PAGE) == bytes(PAGE)
    # A list whose length is not a multiple of 4: the trailing bytes are ignored.
    setup.send(setup.inflate, setup.evts[0], pfn_list(POOL // PAGE) + b"\x01\x02")
    assert mem.read(POOL, PAGE) == bytes(PAGE)
    assert setup.balloon.inflated_pages == 2
    # A chain with only device-writable buffers carries no PFN at all.
    chain = setup.inflate.add_request([], [64])
    setup.inflate.kick(setup.evts[0])
    assert setup.inflate.wait_used(1) == [(chain.head, 0)]
    # Deflate validates too.
    setup.send(setup.deflate, setup.evts[1], pfn_list(POOL // PAGE, 0xDEAD_BEEF))
    assert setup.balloon.deflated_pages == 1 and setup.balloon.invalid_pfns == 6


def test_deflated_pages_are_usable_again(setup: Setup, mem: GuestMemory) -> None:
    mem.write(POOL, b"\x5a" * (4 * PAGE))
    pfns = pfn_list(*range(POOL // PAGE, POOL // PAGE + 4))
    setup.send(setup.inflate, setup.evts[0], pfns)
    setup.send(setup.deflate, setup.evts[1], pfns)
    assert setup.balloon.deflated_pages == 4
    assert mem.read(POOL, 4 * PAGE) == bytes(4 * PAGE)  # faulted back in, zeroed
    mem.write(POOL, b"back")
    assert mem.read(POOL, 4) == b"back"


def test_config_num_pages_and_actual(setup: Setup) -> None:
    b = setup.balloon
    assert b.read_config(0, 8) == bytes(8)
    generation = setup.interrupt.config_generation
    b.set_target_bytes(64 << 20)
    assert b.num_pages == 16384
    assert struct.unpack("<II", b.read_config(0, 8)) == (16384, 0)
    assert setup.interrupt.config_generation == (generation + 1) & 0xFF
    assert setup.irq.read() >= 1 and setup.interrupt.isr & IsrBits.CONFIG
    b.set_target_bytes(PAGE + 1)  # rounded down to whole pages
    assert b.num_pages == 1
    with pytest.raises(ValueError):
        b.set_target_bytes(-1)
    b.set_target_bytes(1 << 60)  # num_pages is a u32
    assert b.num_pages == 0xFFFF_FFFF
    # The driver writes actual (whole or in pieces); num_pages is the device's alone.
    b.write_config(4, struct.pack("<I", 300))
    assert b.actual == 300
    b.write_config(6, b"\x01")
    assert b.actual == 300 + (1 << 16)
    b.write_config(0, struct.pack("<I", 7))
    b.write_config(6, b"\x00\x00\x00")  # runs past the end: ignored
    assert struct.unpack("<II", b.read_config(0, 8)) == (0xFFFF_FFFF, 300 + (1 << 16))
    assert b.read_config(4, 2) == struct.pack("<H", 300) and b.read_config(8, 4) == bytes(4)


def _answer_next_request(driver: VirtQueueDriver, evt: EventFd, fresh: bytes) -> threading.Thread:
    """The driver's side of a stats request: when the device returns the buffer, post anew."""

    def run() -> None:
        driver.wait_used(1)
        driver.add_request([fresh])
        driver.kick(evt)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_stats_round_trip(mem: GuestMemory) -> None:
    first = stats_buffer({BalloonStat.MEMFREE: 1, BalloonStat.MEMTOT: 2})
    s = Setup(mem, stats_first=first)
    try:
        assert s.balloon.stats_enabled
        fresh = {BalloonStat.SWAP_IN: 10, BalloonStat.MEMFREE: 100 << 20,
                 BalloonStat.MEMTOT: 256 << 20, BalloonStat.AVAIL: 200 << 20, 99: 5}  # fmt: skip
        t = _answer_next_request(s.stats, s.evts[2], stats_buffer(fresh))
        assert s.balloon.request_stats(10.0) == fresh  # unknown tags are passed through
        t.join()
        # The second request gets the buffer posted in answer to the first one back.
        again: dict[int, int] = {BalloonStat.MEMFREE: 99 << 20}
        t = _answer_next_request(s.stats, s.evts[2], stats_buffer(again))
        assert s.balloon.request_stats(10.0) == again
        t.join()
    finally:
        s.close()


def test_stats_when_the_guest_never_answers(mem: GuestMemory) -> None:
    s = Setup(mem, stats_first=stats_buffer({BalloonStat.MEMFREE: 1}))
    try:
        assert s.balloon.request_stats(0.2) is None
        assert s.stats.wait_used(1)  # the held buffer was given back all the same
    finally:
        s.close()


def test_stats_buffer_of_odd_length_and_oversized(mem: GuestMemory) -> None:
    s = Setup(mem, stats_first=b"")
    try:
        big = stats_buffer({BalloonStat.MINFLT: 3}) * 1000 + b"\x07"  # 10,001 bytes
        t = _answer_next_request(s.stats, s.evts[2], big)
        assert s.balloon.request_stats(10.0) == {BalloonStat.MINFLT: 3}
        t.join()
    finally:
        s.close()


def test_stats_not_negotiated(mem: GuestMemory) -> None:
    s = Setup(mem, stats=False)
    try:
        assert not s.balloon.stats_enabled
        assert s.balloon.request_stats(5.0) is None  # at once: nothing to wait for
        s.send(s.inflate, s.evts[0], pfn_list(POOL // PAGE))
        assert s.balloon.inflated_pages == 1
    finally:
        s.close()


def test_reset_then_activate_again(mem: GuestMemory) -> None:
    s = Setup(mem, stats_first=stats_buffer({BalloonStat.MEMFREE: 1}))
    try:
        b = s.balloon
        b.set_target_bytes(1 << 20)
        b.write_config(4, struct.pack("<I", 256))
        assert b.reset()
        assert not b.active and not b.stats_enabled
        assert b.actual == 0 and b.num_pages == 256  # the host's target survives a reset
        assert b.request_stats(1.0) is None
        b.set_target_bytes(2 << 20)  # not active: no interrupt to raise, no error
        s2 = Setup.__new__(Setup)
        s2.inflate = VirtQueueDriver(mem, 0x10000, 16, data_base=0x100000, data_size=0x40000)
        feat = b.acked_features
        b.activate(mem, s.interrupt, [s2.inflate.make_queue(features=feat)], s.evts[:1])
        s.send(s2.inflate, s.evts[0], pfn_list(POOL // PAGE))
        assert b.inflated_pages == 1 and b.request_stats(1.0) is None
    finally:
        s.close()


def test_an_oversized_pfn_list_is_cut_off() -> None:
    from devices.virtio.balloon import MAX_PFNS_PER_CHAIN

    with make_guest_memory(8 << 20) as mem:
        balloon = Balloon()
        balloon.ack_features(balloon.features())
        driver = VirtQueueDriver(mem, 0x10000, 16, data_base=0x100000, data_size=0x200000)
        evt = EventFd()
        try:
            balloon.activate(mem, Interrupt(), [driver.make_queue()], [evt])
            pool = 0x400000
            mem.write(pool, b"\x33" * (16 * PAGE))
            # MAX_PFNS_PER_CHAIN hostile PFNs, then valid ones past the cut: those are ignored.
            tail = range(pool // PAGE, pool // PAGE + 16)
            data = pfn_list(*([0xFFFF_FFFF] * MAX_PFNS_PER_CHAIN), *tail)
            chain = driver.add_request([data])
            driver.kick(evt)
            assert driver.wait_used(1, timeout=30) == [(chain.head, 0)]
            assert balloon.invalid_pfns == MAX_PFNS_PER_CHAIN and balloon.inflated_pages == 0
            assert mem.read(pool, 16 * PAGE) == b"\x33" * (16 * PAGE)
        finally:
            balloon.close()
            evt.close()
