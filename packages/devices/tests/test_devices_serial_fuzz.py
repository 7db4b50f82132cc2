"""Property tests: any sequence of guest accesses keeps the UART and CMOS consistent.

The guest is hostile: whatever it writes, the device must not raise (that would take down the
vCPU thread), reads must return exactly the requested size, and the register invariants hold.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from devices.cmos import Cmos
from devices.serial import Serial

access = st.tuples(
    st.sampled_from(["r", "w", "in"]),
    st.integers(0, 9),  # offsets past the 8 registers too (a device must not care)
    st.binary(min_size=1, max_size=4),
)


class CountingEvent:
    def __init__(self) -> None:
        self.count = 0

    def write(self, n: int = 1) -> None:
        self.count += n


@settings(max_examples=300, deadline=None)
@given(st.lists(access, max_size=80))
def test_serial_survives_any_access_sequence(ops: list[tuple[str, int, bytes]]) -> None:
    s = Serial(CountingEvent(), None)
    try:
        for kind, offset, data in ops:
            if kind == "r":
                assert len(s.read(offset, len(data))) == len(data)
            elif kind == "w":
                s.write(offset, data)
            else:
                s.queue_input_bytes(data)
            lcr = s.read(3, 1)[0]
            s.write(3, bytes([lcr & 0x7F]))  # look at IIR/IER without DLAB
            iir = s.read(2, 1)[0]
            assert iir & 0x0F in (0x00, 0x01, 0x02, 0x04, 0x06)
            assert iir & 0x10 == 0
            fifo = iir & 0xC0
            assert fifo in (0x00, 0xC0)
            lsr = s.read(5, 1)[0]
            assert lsr & 0x60 == 0x60  # the transmitter is always ready
            assert s.read(1, 1)[0] <= 0x0F  # IER keeps only its 4 defined bits
            assert len(s._rx) <= (64 if iir & 0x20 else 16 if fifo else 1)
            s.write(3, bytes([lcr]))
    finally:
        s.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 255)), max_size=80))
def test_cmos_survives_any_access_sequence(ops: list[tuple[int, int]]) -> None:
    clock_t = 1_700_000_000.25
    c = Cmos(512 << 20, 0, clock=lambda: clock_t)
    for port, value in ops:
        if port < 2:
            c.write(port, bytes([value]))
        else:
            assert len(c.read(port - 2, 1)) == 1
    # Whatever the guest did, the clock still reads as valid fields in the current mode.
    c.write(0, b"\x0b")
    b = c.read(1, 1)[0]
    if b & 0x80:  # the guest left SET held: release it (an impossible date is ignored)
        c.write(1, bytes([b & 0x7F]))
        b &= 0x7F

    def field(index: int) -> int:
        c.write(0, bytes([index]))
        v = c.read(1, 1)[0]
        if index == 0x04 and not b & 0x02:
            v &= 0x7F
        if b & 0x04:
            return v
        assert v >> 4 <= 9 and v & 0xF <= 9, hex(v)
        return (v >> 4) * 10 + (v & 0xF)

    assert 0 <= field(0x00) <= 59
    assert 0 <= field(0x02) <= 59
    assert 0 <= field(0x04) <= 23
    assert 1 <= field(0x06) <= 7
    assert 1 <= field(0x07) <= 31
    assert 1 <= field(0x08) <= 12
    assert 0 <= field(0x09) <= 99
    c.write(0, b"\x0d")
    assert c.read(1, 1) == b"\x80"
