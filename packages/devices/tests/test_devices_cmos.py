"""Tests of the CMOS RAM / RTC: host time, BCD/binary/12h modes, setting the clock, NVRAM."""

from __future__ import annotations

import calendar
import time

import pytest

from devices.bus import Bus
from devices.cmos import CMOS_BASE, CMOS_LENGTH, Cmos

MIB = 1 << 20
GIB = 1 << 30


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rd(c: Cmos, index: int) -> int:
    c.write(0, bytes([index]))
    return c.read(1, 1)[0]


def wr(c: Cmos, index: int, value: int) -> None:
    c.write(0, bytes([index]))
    c.write(1, bytes([value]))


def bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def guest_time(c: Cmos, binary: bool = False) -> int:
    conv = (lambda v: v) if binary else bcd
    year = conv(rd(c, 0x32)) * 100 + conv(rd(c, 0x09))
    fields = [conv(rd(c, i)) for i in (0x08, 0x07, 0x04, 0x02, 0x00)]
    return calendar.timegm((year, *fields, 0, 0, 0))


def test_time_tracks_host_clock_in_bcd() -> None:
    c = Cmos()
    before = time.time()
    t = guest_time(c)
    assert before - 2 <= t <= time.time() + 1
    b = rd(c, 0x0B)
    assert b & 0x04 == 0 and b & 0x02  # BCD, 24 hour


def test_fields_at_a_known_instant() -> None:
    # 2024-02-29 23:59:58 UTC, a Thursday.
    t = calendar.timegm((2024, 2, 29, 23, 59, 58, 0, 0, 0))
    c = Cmos(clock=Clock(t + 0.5))
    assert [rd(c, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)] == [
        0x58,
        0x59,
        0x23,
        0x05,
        0x29,
        0x02,
        0x24,
        0x20,
    ]
    wr(c, 0x0B, 0x06)  # binary, 24h
    assert [rd(c, i) for i in (0x00, 0x04, 0x07, 0x09, 0x32)] == [58, 23, 29, 24, 20]
    wr(c, 0x0B, 0x04)  # binary, 12h: 23h is 11 PM
    assert rd(c, 0x04) == 0x80 | 11
    wr(c, 0x0B, 0x00)  # BCD, 12h
    assert rd(c, 0x04) == 0x80 | 0x11


def test_midnight_and_noon_in_12_hour_mode() -> None:
    clock = Clock(calendar.timegm((2025, 1, 1, 0, 30, 0, 0, 0, 0)))
    c = Cmos(clock=clock)
    wr(c, 0x0B, 0x00)
    assert rd(c, 0x04) == 0x12  # 12 AM
    clock.t += 12 * 3600
    assert rd(c, 0x04) == 0x80 | 0x12  # 12 PM


def test_setting_the_clock_changes_only_the_offset() -> None:
    clock = Clock(calendar.timegm((2024, 5, 5, 10, 0, 0, 0, 0, 0)))
    c = Cmos(clock=clock)
    wr(c, 0x0B, 0x82)  # SET, BCD, 24h
    # Day before month, as Linux writes them: 31 stays valid once the month becomes 1.
    for index, value in ((0x00, 0x30), (0x02, 0x15), (0x04, 0x08), (0x07, 0x31), (0x08, 0x01)):
        wr(c, index, value)
    wr(c, 0x09, 0x99)
    wr(c, 0x32, 0x19)
    assert rd(c, 0x07) == 0x31  # shadow reads back while SET holds
    clock.t += 100  # frozen while SET is held
    assert rd(c, 0x00) == 0x30
    assert not rd(c, 0x0A) & 0x80  # no update cycle while SET
    wr(c, 0x0B, 0x02)
    assert guest_time(c) == calendar.timegm((1999, 1, 31, 8, 15, 30, 0, 0, 0))
    clock.t += 61
    assert guest_time(c) == calendar.timegm((1999, 1, 31, 8, 16, 31, 0, 0, 0))


def test_impossible_dates_and_bad_bcd_are_ignored() -> None:
    t = calendar.timegm((2023, 2, 10, 12, 0, 0, 0, 0, 0))
    c = Cmos(clock=Clock(t))
    wr(c, 0x07, 0x30)  # Feb 30 outside SET: ignored
    wr(c, 0x08, 0x13)  # month 13
    wr(c, 0x00, 0x5A)  # not BCD
    wr(c, 0x04, 0x24)
    assert guest_time(c) == t
    wr(c, 0x0B, 0x82)
    wr(c, 0x07, 0x31)
    wr(c, 0x0B, 0x02)  # Feb 31 at commit: ignored
    assert guest_time(c) == t
    wr(c, 0x02, 0x07)  # a valid single-field write outside SET applies at once
    assert guest_time(c) == t + 7 * 60


def test_register_a_uip_window_and_divider() -> None:
    clock = Clock(1_700_000_000.5)
    c = Cmos(clock=clock)
    assert rd(c, 0x0A) == 0x26
    clock.t = 1_700_000_000.9999
    assert rd(c, 0x0A) == 0xA6
    wr(c, 0x0A, 0xF6)  # UIP is read-only; divider 111 = reset: no update cycles
    clock.t = 1_700_000_000.9999
    assert rd(c, 0x0A) == 0x76


def test_registers_c_and_d() -> None:
    clock = Clock(1000.2)
    c = Cmos(clock=clock)
    assert rd(c, 0x0D) == 0x80
    wr(c, 0x0D, 0)
    assert rd(c, 0x0D) == 0x80
    assert rd(c, 0x0C) == 0
    clock.t = 1001.1
    assert rd(c, 0x0C) == 0x10  # update ended since last read
    assert rd(c, 0x0C) == 0  # read clears
    wr(c, 0x0B, 0x12)  # UIE
    clock.t = 1002.1
    assert rd(c, 0x0C) == 0x90


@pytest.mark.parametrize(
    ("below", "above", "low", "high"),
    [
        (256 * MIB, 0, (256 - 16) * 16, 0),
        (8 * MIB, 0, 0, 0),
        (3 * GIB, 2 * GIB, (3 * 1024 - 16) * 16, 2 * 1024 * 16),
        (4 * GIB, 2048 * GIB, 0xFF00, 0xFFFFFF),
    ],
)
def test_memory_size_fields(below: int, above: int, low: int, high: int) -> None:
    c = Cmos(below, above)
    assert rd(c, 0x34) | rd(c, 0x35) << 8 == low
    assert rd(c, 0x5B) | rd(c, 0x5C) << 8 | rd(c, 0x5D) << 16 == high


def test_negative_memory_rejected() -> None:
    with pytest.raises(ValueError):
        Cmos(-1, 0)


def test_nvram_persists_and_index_is_masked() -> None:
    c = Cmos()
    bus = Bus()
    bus.insert(c, CMOS_BASE, CMOS_LENGTH)
    for i in range(0x0E, 0x80):
        if i not in (0x32,):
            bus.write(0x70, bytes([i | 0x80]))  # NMI-disable bit set: same register
            bus.write(0x71, bytes([(i * 7) & 0xFF]))
    for i in range(0x0E, 0x80):
        if i != 0x32:
            bus.write(0x70, bytes([i]))
            assert bus.read(0x71, 1) == bytes([(i * 7) & 0xFF])
    bus.write(0x70, b"\xb5")
    assert bus.read(0x70, 1) == b"\x35"
    assert c.debug_label() == "cmos"
    assert bus.read(0x72, 1) == b"\xff"
