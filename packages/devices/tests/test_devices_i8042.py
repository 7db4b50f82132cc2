"""Tests of the reset-only i8042."""

from __future__ import annotations

from devices.bus import Bus
from devices.i8042 import I8042, I8042_BASE, I8042_LENGTH
from sys_util import EventFd


class FakeEvent:
    def __init__(self) -> None:
        self.count = 0

    def write(self, n: int = 1) -> None:
        self.count += n


def make_bus(evt: object) -> tuple[Bus, I8042]:
    dev = I8042(evt)  # type: ignore[arg-type]
    bus = Bus()
    bus.insert(dev, I8042_BASE, I8042_LENGTH)
    return bus, dev


def test_port_61_reads_pit_output_high_and_64_reads_zero() -> None:
    bus, dev = make_bus(FakeEvent())
    assert bus.read(0x61, 1) == b"\x20"
    assert bus.read(0x64, 1) == b"\x00"
    assert bus.read(0x62, 1) == b"\x00"
    assert bus.read(0x61, 2) == b"\x20\x00"
    assert bus.read(0x60, 1) == b"\xff"  # not ours
    assert dev.debug_label() == "i8042"


def test_reset_command_writes_exit_event() -> None:
    with EventFd(nonblocking=True) as evt:
        bus, dev = make_bus(evt)
        assert bus.write(0x64, b"\xfe")
        assert evt.read() == 1
        assert dev.reset_count == 1


def test_other_writes_do_not_reset() -> None:
    evt = FakeEvent()
    bus, dev = make_bus(evt)
    for port, value in ((0x64, 0xAD), (0x64, 0xFF), (0x61, 0xFE), (0x62, 0xFE), (0x63, 0xFE)):
        bus.write(port, bytes([value]))
    assert evt.count == 0 and dev.reset_count == 0
    dev.write(2, b"\x00\xfe")  # a wide write whose second byte lands on 0x64
    assert evt.count == 1
