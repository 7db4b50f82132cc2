"""The modern virtio-pci transport, driven through config cycles and BAR0 like Linux does."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.pci import MSIX_CAP_ID, PciConfigIo, PciRoot
from devices.testing import FakeIrqRouter, VirtQueueDriver, make_guest_memory
from devices.virtio import (
    BAR0_SIZE,
    Block,
    DeviceStatus,
    Features,
    IsrBits,
    RawDisk,
    Rng,
    VirtioPciDevice,
)
from devices.virtio.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from sys_util import EventFd, GuestMemory

BAR_BASE = 0xE000_0000
HDR = struct.Struct("<IIQ")
S = DeviceStatus


class Driver:
    """Enough of Linux's virtio_pci_modern to exercise the transport."""

    def __init__(self, dev: VirtioPciDevice, mem: GuestMemory) -> None:
        self.dev = dev
        self.mem = mem
        self.root = PciRoot()
        self.slot = self.root.add_device(dev).device
        self.io = PciConfigIo(self.root)
        self.caps = self._walk_caps()

    def cfg_read(self, reg: int) -> int:
        self.io.write(0, (0x8000_0000 | self.slot << 11 | reg << 2).to_bytes(4, "little"))
        return int.from_bytes(self.io.read(4, 4), "little")

    def cfg_write(self, reg: int, value: int) -> None:
        self.io.write(0, (0x8000_0000 | self.slot << 11 | reg << 2).to_bytes(4, "little"))
        self.io.write(4, value.to_bytes(4, "little"))

    def _walk_caps(self) -> dict[int, tuple[int, int, int, int]]:
        """cfg_type (or 0x100 + cap id for non-virtio caps) -> (cfg offset, bar, offset, length)."""
        raw = b"".join(self.cfg_read(r).to_bytes(4, "little") for r in range(64))
        caps: dict[int, tuple[int, int, int, int]] = {}
        ptr = raw[0x34]
        while ptr:
            cap_id = raw[ptr]
            if cap_id == 0x09:
                _len, cfg_type, bar = raw[ptr + 2], raw[ptr + 3], raw[ptr + 4]
                off, length = struct.unpack_from("<II", raw, ptr + 8)
                caps[cfg_type] = (ptr, bar, off, length)
            else:
                caps[0x100 + cap_id] = (ptr, 0, 0, 0)
            ptr = raw[ptr + 1]
        return caps

    def cfg_bytes(self, offset: int, length: int) -> bytes:
        raw = b"".join(self.cfg_read(r).to_bytes(4, "little") for r in range(64))
        return raw[offset : offset + length]

    # BAR0 accessors (the MMIO bus would call these with BAR-relative offsets)
    def common(self, field_off: int, size: int) -> int:
        return int.from_bytes(self.dev.read(self.caps[1][2] + field_off, size), "little")

    def set_common(self, field_off: int, size: int, value: int) -> None:
        self.dev.write(self.caps[1][2] + field_off, value.to_bytes(size, "little"))

    def status(self) -> int:
        return self.common(20, 1)

    def set_status(self, value: int) -> None:
        self.set_common(20, 1, value)

    def device_features(self) -> int:
        self.set_common(0, 4, 0)
        lo = self.common(4, 4)
        self.set_common(0, 4, 1)
        return self.common(4, 4) << 32 | lo

    def negotiate(self, features: int) -> bool:
        self.set_status(0)
        self.set_status(S.ACKNOWLEDGE)
        self.set_status(S.ACKNOWLEDGE | S.DRIVER)
        for sel in (0, 1):
            self.set_common(8, 4, sel)
            self.set_common(12, 4, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        return bool(self.status() & S.FEATURES_OK)

    def setup_queue(self, index: int, vq: VirtQueueDriver, vector: int = 0xFFFF) -> None:
        self.set_common(22, 2, index)
        assert self.common(24, 2) >= vq.size
        self.set_common(24, 2, vq.size)
        self.set_common(26, 2, vector)
        self.dev.write(
            self.caps[1][2] + 32, vq.desc_table.to_bytes(8, "little")
        )  # one 64-bit write
        for off, addr in ((40, vq.avail_ring), (48, vq.used_ring)):  # two 32-bit halves
            self.set_common(off, 4, addr & 0xFFFF_FFFF)
            self.set_common(off + 4, 4, addr >> 32)
        self.set_common(28, 2, 1)

    def notify(self, index: int) -> None:
        notify_off = self.caps[2][2]
        self.set_common(22, 2, index)
        qoff = self.common(30, 2)
        mult = struct.unpack("<I", self.cfg_bytes(self.caps[2][0] + 16, 4))[0]
        self.dev.write(notify_off + qoff * mult, index.to_bytes(2, "little"))

    def msix_entry(self, vector: int, address: int, data: int, masked: bool = False) -> None:
        base = 0x6000 + 16 * vector
        self.dev.write(base, struct.pack("<II", address & 0xFFFF_FFFF, address >> 32))
        self.dev.write(base + 8, struct.pack("<I", data))
        self.dev.write(base + 12, struct.pack("<I", int(masked)))

    def enable_msix(self) -> None:
        off = self.caps[0x100 + MSIX_CAP_ID][0]
        reg = off // 4
        self.cfg_write(reg, self.cfg_read(reg) | 0x8000 << 16)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(8 << 20) as m:
        yield m


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "d.img"
    p.write_bytes(os.urandom(64 * 1024))
    return p


def make_transport(
    mem: GuestMemory, image: Path, router: FakeIrqRouter | None = None
) -> VirtioPciDevice:
    dev = VirtioPciDevice(Block.open(image), mem, msix_router=router)
    dev.allocate_bars(lambda size, align: BAR_BASE)
    return dev


def test_identity_bars_and_capabilities(mem: GuestMemory, image: Path) -> None:
    with make_transport(mem, image, FakeIrqRouter()) as dev:
        drv = Driver(dev, mem)
        assert drv.cfg_read(0) == 0x1042_1AF4
        assert drv.cfg_read(2) & 0xFF == 1  # revision 1: modern
        assert drv.cfg_read(11) >> 16 >= 0x40
        assert set(drv.caps) == {1, 2, 3, 4, 0x100 + MSIX_CAP_ID}
        assert drv.caps[1][1:] == (0, 0x0000, 56)
        assert drv.caps[3][1:3] == (0, 0x1000)
        assert drv.caps[4][1:3] == (0, 0x2000)
        assert drv.caps[2][1:3] == (0, 0x3000)
        assert struct.unpack("<I", drv.cfg_bytes(drv.caps[2][0] + 16, 4))[0] == 4
        # MSI-X: 2 vectors (1 queue + config), table at BAR0+0x6000, PBA at +0x7000.
        msix_off = drv.caps[0x100 + MSIX_CAP_ID][0]
        ctrl, table, pba = struct.unpack("<HII", drv.cfg_bytes(msix_off + 2, 10))
        assert (ctrl & 0x7FF) + 1 == 2 and table == 0x6000 and pba == 0x7000
        # BAR0 sizing through config cycles.
        drv.cfg_write(4, 0xFFFF_FFFF)
        drv.cfg_write(5, 0xFFFF_FFFF)
        size = (~((drv.cfg_read(5) << 32 | drv.cfg_read(4)) & ~0xF) + 1) & (2**64 - 1)
        assert size == BAR0_SIZE
        drv.cfg_write(4, BAR_BASE)
        drv.cfg_write(5, 0)
        assert dev.config.bar_address(0) == BAR_BASE
        events = dev.ioevents()
        assert [e.address for e in events] == [BAR_BASE + 0x3000]
        assert events[0].event is dev.queue_evts[0]


def test_feature_negotiation(mem: GuestMemory, image: Path) -> None:
    with make_transport(mem, image) as dev:
        drv = Driver(dev, mem)
        offered = drv.device_features()
        assert offered >> Features.VERSION_1 & 1
        assert offered >> Features.RING_EVENT_IDX & 1 and offered >> Features.RING_INDIRECT_DESC & 1
        assert not drv.negotiate(offered & ~(1 << Features.VERSION_1))  # legacy driver refused
        assert not drv.negotiate(offered | 1 << 40)  # a feature we never offered
        assert drv.negotiate(1 << Features.VERSION_1 | 1 << Features.RING_EVENT_IDX)
        assert dev.device.acked_features == 1 << Features.VERSION_1 | 1 << Features.RING_EVENT_IDX
        # Features are frozen after FEATURES_OK.
        drv.set_common(8, 4, 0)
        drv.set_common(12, 4, 0)
        assert dev.device.acked_features >> Features.RING_EVENT_IDX & 1


def test_msix_request_end_to_end(mem: GuestMemory, image: Path) -> None:
    router = FakeIrqRouter()
    with make_transport(mem, image, router) as dev:
        drv = Driver(dev, mem)
        drv.enable_msix()
        drv.msix_entry(0, 0xFEE0_0000, 0x30)
        drv.msix_entry(1, 0xFEE0_0000, 0x31)
        assert set(router.routes.values()) == {(0xFEE0_0000, 0x30), (0xFEE0_0000, 0x31)}
        assert drv.negotiate(drv.device_features())
        drv.set_common(16, 2, 1)  # config vector 1
        assert drv.common(16, 2) == 1
        vq = VirtQueueDriver(mem, 0x10000, 128)
        drv.setup_queue(0, vq, vector=0)
        assert drv.common(26, 2) == 0
        drv.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        assert dev.activated
        chain = vq.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 1)], [512, 1])
        drv.notify(0)
        assert vq.wait_used(1) == [(chain.head, 513)]
        data = vq.read_writable(chain)
        assert data[-1] == VIRTIO_BLK_S_OK and data[:512] == image.read_bytes()[512:1024]
        vector0_evt = router.irqfds[min(router.irqfds)]
        assert isinstance(vector0_evt, EventFd)
        assert vector0_evt.read_timeout(5.0) == 1
        assert dev.interrupt.isr == 0  # MSI-X in use: no ISR / INTx


def _read_one_block(drv: Driver, mem: GuestMemory) -> None:
    """Bring the device up (every feature) and complete one 512-byte read on queue 0."""
    assert drv.negotiate(drv.device_features())
    vq = VirtQueueDriver(mem, 0x10000, 16)
    drv.setup_queue(0, vq)
    drv.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    vq.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
    drv.notify(0)
    vq.wait_used(1)


def test_intx_isr_and_resample(mem: GuestMemory, image: Path) -> None:
    with make_transport(mem, image) as dev:
        irq, resample = EventFd(), EventFd()
        dev.assign_irq(irq, resample, line=5, pin=1)
        drv = Driver(dev, mem)
        assert drv.cfg_read(15) & 0xFFFF == 0x0105
        assert 0x100 + MSIX_CAP_ID not in drv.caps  # no router: INTx only
        _read_one_block(drv, mem)
        assert irq.read_timeout(5.0) == 1
        # The guest EOIs without reading the ISR: KVM signals resample, we re-assert.
        resample.write(1)
        assert irq.read_timeout(5.0) == 1
        isr = int.from_bytes(dev.read(0x1000, 1), "little")
        assert isr == IsrBits.QUEUE
        assert dev.read(0x1000, 1) == b"\x00"  # read-to-clear
        resample.write(1)
        assert irq.read_timeout(0.2) is None  # nothing pending any more
        irq.close()
        resample.close()


def test_intx_disable_bit_holds_the_line_until_cleared(mem: GuestMemory, image: Path) -> None:
    """PCI command bit 10 (Interrupt Disable): a completion sets the ISR but asserts nothing
    (a polling driver sets the bit; every INTx irqfd write would otherwise cost a system call
    and a kernel worker per request); clearing the bit asserts the pending interrupt."""
    with make_transport(mem, image) as dev:
        irq, resample = EventFd(), EventFd()
        dev.assign_irq(irq, resample, line=5, pin=1)
        drv = Driver(dev, mem)
        command = drv.cfg_read(1) & 0xFFFF
        drv.cfg_write(1, command | 1 << 10)
        _read_one_block(drv, mem)
        assert dev.interrupt.isr == IsrBits.QUEUE  # pending, but the line stays quiet
        assert irq.read_timeout(0.2) is None
        resample.write(1)  # an EOI for something else: still no re-assertion
        assert irq.read_timeout(0.2) is None
        drv.cfg_write(1, command & ~(1 << 10))
        assert irq.read_timeout(5.0) == 1  # enabled with the ISR set: asserted now
        assert dev.read(0x1000, 1)[0] == IsrBits.QUEUE
        irq.close()
        resample.close()


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("virtio-")]


def test_reset_stops_worker_and_allows_reactivation(mem: GuestMemory, image: Path) -> None:
    baseline = len(_worker_threads())
    with make_transport(mem, image) as dev:
        drv = Driver(dev, mem)
        for _ in range(3):
            assert drv.negotiate(drv.device_features())
            vq = VirtQueueDriver(mem, 0x10000, 16)
            drv.setup_queue(0, vq)
            drv.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
            assert len(_worker_threads()) == baseline + 1
            vq.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
            drv.notify(0)
            assert len(vq.wait_used(1)) == 1
            drv.set_status(0)
            assert len(_worker_threads()) == baseline
            assert drv.status() == 0 and not dev.activated
            drv.set_common(22, 2, 0)
            assert drv.common(28, 2) == 0  # queue disabled by reset
    assert len(_worker_threads()) == baseline


def test_rings_outside_ram_need_reset(mem: GuestMemory, image: Path) -> None:
    with make_transport(mem, image) as dev:
        irq = EventFd()
        dev.assign_irq(irq, None, 5, 1)
        drv = Driver(dev, mem)
        assert drv.negotiate(drv.device_features())
        vq = VirtQueueDriver(mem, 0x10000, 16)
        drv.setup_queue(0, vq)
        drv.set_common(48, 4, 0xFFFF_F000)  # used ring far outside the 8 MiB of RAM
        drv.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        assert not dev.activated and not _worker_threads()
        assert drv.status() & S.DEVICE_NEEDS_RESET
        assert irq.read_timeout(1.0) == 1  # config-change interrupt
        assert dev.read(0x1000, 1)[0] & IsrBits.CONFIG
        # The driver resets and sets things up properly: the device works.
        assert drv.negotiate(drv.device_features())
        assert not drv.status() & S.DEVICE_NEEDS_RESET
        drv.setup_queue(0, vq)
        drv.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        assert dev.activated
        vq.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        drv.notify(0)
        assert len(vq.wait_used(1)) == 1
        irq.close()


def test_queue_config_frozen_after_driver_ok(mem: GuestMemory, image: Path) -> None:
    with make_transport(mem, image) as dev:
        drv = Driver(dev, mem)
        assert drv.negotiate(drv.device_features())
        vq = VirtQueueDriver(mem, 0x10000, 16)
        drv.setup_queue(0, vq)
        drv.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        drv.set_common(32, 4, 0x7000_0000)
        assert dev.queues[0].desc_table == vq.desc_table
        drv.set_common(22, 2, 9)  # nonexistent queue reads as zeros
        assert drv.common(24, 2) == 0
        assert drv.common(18, 2) == 1
        dev.write(0x55, b"\x01\x02\x03")  # odd access: ignored
        assert dev.read(0x5000, 4) == b"\x00" * 4


def test_rng_through_transport(mem: GuestMemory) -> None:
    with VirtioPciDevice(Rng(), mem) as dev:
        dev.allocate_bars(lambda size, align: BAR_BASE)
        drv = Driver(dev, mem)
        assert drv.cfg_read(0) == 0x1044_1AF4
        assert drv.negotiate(drv.device_features())
        vq = VirtQueueDriver(mem, 0x10000, 16)
        drv.setup_queue(0, vq)
        drv.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        chains = [vq.add_request([], [64], indirect=bool(i % 2)) for i in range(4)]
        drv.notify(0)
        used = vq.wait_used(4)
        assert sorted(used) == sorted((c.head, 64) for c in chains)
        outs = {vq.read_writable(c) for c in chains}
        assert len(outs) == 4 and bytes(64) not in outs


def test_wired_through_buses(mem: GuestMemory, image: Path) -> None:
    """The way arch wires it: PciConfigIo on the I/O bus, BAR0 on the MMIO bus."""
    from devices.bus import Bus

    io_bus, mmio_bus = Bus(), Bus()
    root = PciRoot()
    io_bus.insert(PciConfigIo(root), 0xCF8, 8)
    with VirtioPciDevice(Block.open(image), mem) as dev:
        (bar,) = dev.allocate_bars(lambda size, align: BAR_BASE)
        mmio_bus.insert(dev, bar.address, bar.size)
        slot = root.add_device(dev).device
        io_bus.write(0xCF8, (0x8000_0000 | slot << 11).to_bytes(4, "little"))
        assert io_bus.read(0xCFC, 4) == (0x1042_1AF4).to_bytes(4, "little")
        common = BAR_BASE
        mmio_bus.write(common + 20, bytes([S.ACKNOWLEDGE | S.DRIVER]))
        for sel in (0, 1):
            mmio_bus.write(common + 0, sel.to_bytes(4, "little"))
            feats = mmio_bus.read(common + 4, 4)
            mmio_bus.write(common + 8, sel.to_bytes(4, "little"))
            mmio_bus.write(common + 12, feats)
        mmio_bus.write(common + 20, bytes([S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK]))
        assert mmio_bus.read(common + 20, 1)[0] & S.FEATURES_OK
        vq = VirtQueueDriver(mem, 0x10000, 32)
        mmio_bus.write(common + 22, (0).to_bytes(2, "little"))
        mmio_bus.write(common + 24, (32).to_bytes(2, "little"))
        mmio_bus.write(common + 32, vq.desc_table.to_bytes(8, "little"))
        mmio_bus.write(common + 40, vq.avail_ring.to_bytes(8, "little"))
        mmio_bus.write(common + 48, vq.used_ring.to_bytes(8, "little"))
        mmio_bus.write(common + 28, (1).to_bytes(2, "little"))
        mmio_bus.write(common + 20, bytes([S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK]))
        chain = vq.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 4)], [1024, 1])
        (ioevent,) = dev.ioevents()
        mmio_bus.write(ioevent.address, (0).to_bytes(2, "little"))  # as if KVM had no ioeventfd
        assert vq.wait_used(1) == [(chain.head, 1025)]
        assert vq.read_writable(chain)[:1024] == image.read_bytes()[2048 : 2048 + 1024]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    accesses=st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, BAR0_SIZE + 16),
            st.sampled_from([0, 1, 2, 3, 4, 8, 16]),
            st.binary(min_size=0, max_size=16),
        ),
        max_size=40,
    )
)
def test_random_bar_and_config_accesses_never_raise(
    mem: GuestMemory, image: Path, accesses: list[tuple[bool, int, int, bytes]]
) -> None:
    with make_transport(mem, image, FakeIrqRouter()) as dev:
        root = PciRoot()
        slot = root.add_device(dev).device
        io = PciConfigIo(root)
        for is_read, offset, size, data in accesses:
            if is_read:
                assert len(dev.read(offset, size)) == size
                io.write(0, (0x8000_0000 | slot << 11 | (offset % 256) & ~3).to_bytes(4, "little"))
                assert len(io.read(4 + offset % 4, size)) == size
            else:
                dev.write(offset, data)
                io.write(0, (0x8000_0000 | slot << 11 | (offset % 256) & ~3).to_bytes(4, "little"))
                io.write(4 + offset % 4, data)
        dev.write(20, b"\x00")  # reset whatever state was reached
        assert not dev.activated


def test_connect_intx_registers_resampling_irqfd(mem: GuestMemory, image: Path) -> None:
    router = FakeIrqRouter()
    dev = make_transport(mem, image)
    dev.connect_intx(router, line=10, pin=2)
    assert router.calls == [("register_irqfd", 10)]
    assert dev.config.interrupt_line == 10
    assert dev.read_config_register(15) >> 8 & 0xFF == 2
    block = dev.device
    assert isinstance(block, Block) and isinstance(block.disk, RawDisk)
    disk_fds = block.disk.keep_fds()  # the image (and its O_DIRECT read fd, if any)
    assert 1 <= len(disk_fds) <= 2
    assert len(dev.keep_fds()) == 1 + 2 + len(disk_fds)  # queue evt, INTx pair, the disk
    with pytest.raises(RuntimeError):
        dev.connect_intx(router, line=11, pin=2)
    dev.close()
    dev.close()
    assert router.calls[-1] == ("unregister_irqfd", 10)
    assert dev.closed


def test_device_bugs_do_not_reach_the_vcpu_thread(mem: GuestMemory, image: Path) -> None:
    class Broken(Rng):
        def read_config(self, offset: int, length: int) -> bytes:
            raise RuntimeError("bug")

        def write_config(self, offset: int, data: bytes) -> None:
            raise RuntimeError("bug")

    with VirtioPciDevice(Broken(), mem) as dev:
        assert dev.read(0x2000, 4) == b"\x00" * 4
        dev.write(0x2000, b"\x01")
        assert dev.log.count == 2
