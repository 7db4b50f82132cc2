"""Unit tests of devices.bus: insertion rules, offsets, lookups, unhandled accesses."""

from __future__ import annotations

import pickle
import threading

import pytest

from devices.bus import Bus, BusDevice, BusRange
from devices.errors import BusError


class Recorder:
    """A BusDevice that records accesses and reads back a pattern derived from the offset."""

    def __init__(self, label: str = "rec") -> None:
        self.label = label
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []
        self.lock = threading.Lock()

    def debug_label(self) -> str:
        return self.label

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            self.reads.append((offset, size))
        return bytes((offset + i) & 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.writes.append((offset, bytes(data)))


def test_recorder_is_a_busdevice() -> None:
    assert isinstance(Recorder(), BusDevice)


def test_insert_rejects_non_device() -> None:
    with pytest.raises(TypeError):
        Bus().insert(object(), 0, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("base", "length"), [(0, 0), (-1, 4), (0x10, -1), ((1 << 64) - 1, 2)])
def test_insert_rejects_invalid_ranges(base: int, length: int) -> None:
    with pytest.raises(BusError) as info:
        Bus().insert(Recorder(), base, length)
    assert info.value.existing_base is None


@pytest.mark.parametrize(
    ("base", "length"),
    [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FC, 0x10), (0x300, 0x200), (0x3F9, 2)],
)
def test_insert_rejects_overlaps_and_names_both_ranges(base: int, length: int) -> None:
    bus = Bus()
    bus.insert(Recorder("serial"), 0x3F8, 8)
    with pytest.raises(BusError) as info:
        bus.insert(Recorder("other"), base, length)
    err = info.value
    assert (err.base, err.length) == (base, length)
    assert (err.existing_base, err.existing_length, err.existing_label) == (0x3F8, 8, "serial")
    assert "0x3f8" in str(err) and "serial" in str(err)
    assert len(bus) == 1


def test_adjacent_ranges_are_allowed() -> None:
    bus = Bus()
    a, b, c = Recorder("a"), Recorder("b"), Recorder("c")
    bus.insert(b, 0x10, 0x10)
    bus.insert(a, 0x0, 0x10)
    bus.insert(c, 0x20, 0x10)
    assert [r.base for r in bus.ranges()] == [0x0, 0x10, 0x20]
    assert bus.get_device(0x0F) == (a, 0xF)
    assert bus.get_device(0x10) == (b, 0)
    assert bus.get_device(0x2F) == (c, 0xF)
    assert bus.get_device(0x30) is None


def test_offsets_are_relative_to_the_range() -> None:
    bus = Bus()
    dev = Recorder()
    bus.insert(dev, 0x1000, 0x100)
    assert bus.write(0x1004, b"\x01\x02")
    assert bus.read(0x10FC, 4) == bytes([0xFC, 0xFD, 0xFE, 0xFF])
    assert dev.writes == [(4, b"\x01\x02")]
    assert dev.reads == [(0xFC, 4)]


def test_same_device_at_several_ranges() -> None:
    bus = Bus()
    dev = Recorder()
    bus.insert(dev, 0x40, 4)
    bus.insert(dev, 0x80, 4)
    assert bus.get_device(0x41) == (dev, 1)
    assert bus.get_device(0x83) == (dev, 3)


def test_unhandled_accesses() -> None:
    bus = Bus()
    dev = Recorder()
    bus.insert(dev, 0x60, 4)
    assert bus.read(0x80, 2) == b"\xff\xff"
    assert bus.read(0x5F, 1) == b"\xff"
    assert not bus.write(0x64, b"\x00")
    assert not bus.write(0x80, b"")
    # Straddling the end of a range is not served: the device never sees size > its range.
    assert bus.read(0x62, 4) == b"\xff" * 4
    assert not bus.write(0x63, b"\x00\x00")
    assert bus.read(0x62, 2) == b"\x02\x03"
    assert dev.reads == [(2, 2)]
    assert dev.writes == []


def test_cache_sees_later_inserts_and_removals() -> None:
    bus = Bus()
    assert bus.read(0x70, 1) == b"\xff"  # caches a miss
    dev = Recorder()
    bus.insert(dev, 0x70, 2)
    assert bus.read(0x70, 1) == b"\x00"
    assert bus.remove(0x70) is dev
    assert bus.read(0x70, 1) == b"\xff"
    with pytest.raises(BusError):
        bus.remove(0x70)


def test_many_distinct_addresses_do_not_grow_unbounded() -> None:
    bus = Bus()
    dev = Recorder()
    bus.insert(dev, 0, 1 << 20)
    for a in range(0, 1 << 20, 64):
        bus.write(a, b"\x00")
    assert len(dev.writes) == (1 << 20) // 64
    assert len(bus._snap.cache) <= 4096


def test_concurrent_dispatch_and_insert() -> None:
    bus = Bus()
    devs = [Recorder(f"d{i}") for i in range(8)]
    bus.insert(devs[0], 0, 0x10)
    stop = threading.Event()
    errors: list[BaseException] = []

    def vcpu() -> None:
        try:
            while not stop.is_set():
                assert bus.write(0x4, b"\x01")
                assert bus.read(0x4, 1) == b"\x04"
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=vcpu) for _ in range(3)]
    for t in threads:
        t.start()
    for i, d in enumerate(devs[1:], 1):
        bus.insert(d, i * 0x10, 0x10)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert [r.device for r in bus.ranges()] == devs


def test_bus_error_pickles() -> None:
    err = BusError(0x10, 4, "overlaps", 0x8, 0x10, "x")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.existing_label == "x"


def test_repr_names_devices() -> None:
    bus = Bus()
    bus.insert(Recorder("cmos"), 0x70, 2)
    assert "cmos" in repr(bus)
    assert repr(BusRange(0x70, 2, Recorder("cmos"))) == "BusRange(0x70, 0x2, 'cmos')"
