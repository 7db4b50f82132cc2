"""Unit tests of the 16550A model: registers, interrupts, FIFO, loopback, input and output."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

from devices.bus import Bus
from devices.serial import FdWriter, Serial

DATA, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)


class FakeEvent:
    """Counts interrupt pulses (stands in for an irqfd EventFd)."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, n: int = 1) -> None:
        self.count += n

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def rd(s: Serial, reg: int) -> int:
    return s.read(reg, 1)[0]


def wr(s: Serial, reg: int, value: int) -> None:
    s.write(reg, bytes([value]))


@pytest.fixture
def evt() -> FakeEvent:
    return FakeEvent()


@pytest.fixture
def serial(evt: FakeEvent) -> Serial:
    s = Serial(evt, None, label="test")
    yield s
    s.close()


def test_reset_values(serial: Serial) -> None:
    assert rd(serial, IER) == 0
    assert rd(serial, IIR) == 0x01  # no interrupt, FIFO disabled
    assert rd(serial, LCR) == 0x03
    assert rd(serial, MCR) == 0x08
    assert rd(serial, LSR) == 0x60  # THR empty | transmitter idle
    assert rd(serial, MSR) == 0xB0  # DCD | DSR | CTS
    assert rd(serial, SCR) == 0
    assert serial.debug_label() == "test"


def test_dlab_switches_data_and_ier_to_divisor(serial: Serial, evt: FakeEvent) -> None:
    wr(serial, LCR, 0x83)
    assert rd(serial, DATA) == 12 and rd(serial, IER) == 0
    wr(serial, DATA, 0x01)
    wr(serial, IER, 0x02)
    assert (rd(serial, DATA), rd(serial, IER)) == (0x01, 0x02)
    wr(serial, LCR, 0x03)
    assert rd(serial, IER) == 0  # IER untouched by the DLM write
    wr(serial, LCR, 0x83)
    assert (rd(serial, DATA), rd(serial, IER)) == (0x01, 0x02)
    assert evt.count == 0


def test_scratch_and_register_masks(serial: Serial) -> None:
    wr(serial, SCR, 0xA5)
    assert rd(serial, SCR) == 0xA5
    wr(serial, IER, 0xFF)
    assert rd(serial, IER) == 0x0F
    wr(serial, MCR, 0xFF)
    assert rd(serial, MCR) == 0x1F
    wr(serial, LSR, 0x00)  # read-only
    assert rd(serial, LSR) & 0x60 == 0x60


def test_output_reaches_writer_and_close_flushes(evt: FakeEvent) -> None:
    out = io.BytesIO()
    s = Serial(evt, out)
    bus = Bus()
    bus.insert(s, 0x3F8, 8)
    for b in b"hello, world":
        assert bus.write(0x3F8, bytes([b]))
    s.close()
    assert out.getvalue() == b"hello, world"
    assert evt.count == 0  # THRE interrupt not enabled


def test_newline_flushes_without_close(evt: FakeEvent) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    s = Serial(evt, FdWriter(w, owned=True), owns_output=True, flush_delay=60.0)
    try:
        for b in b"line\n":
            wr(s, DATA, b)
        assert os.read(r, 100) == b"line\n"  # no 60 s delay: the newline pushed it out
    finally:
        s.close()
        os.close(r)


def test_partial_line_flushes_after_delay(evt: FakeEvent) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    s = Serial(evt, FdWriter(w, owned=True), owns_output=True, flush_delay=0.001)
    try:
        for b in b"# ":
            wr(s, DATA, b)
        assert os.read(r, 100) == b"# "
    finally:
        s.close()
        os.close(r)


def test_output_to_file(tmp_path: Path, evt: FakeEvent) -> None:
    path = tmp_path / "com1.log"
    path.write_bytes(b"old content that must be truncated")
    s = Serial(evt, FdWriter.create_file(path), owns_output=True)
    s.write(0, b"A")
    s.write(0, b"B")
    s.close()
    s.close()  # idempotent
    assert path.read_bytes() == b"AB"
    assert s.closed


def test_write_error_drops_output_instead_of_raising(evt: FakeEvent) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)  # writes now fail with EPIPE
    s = Serial(evt, FdWriter(w, owned=True), owns_output=True)
    s.write(0, b"x")
    s.flush()
    assert s.dropped_output == 1
    s.write(0, b"y")  # still fine
    s.close()


def test_thre_interrupt_on_enable_and_iir_read_clears_it(serial: Serial, evt: FakeEvent) -> None:
    wr(serial, IER, 0x02)
    assert evt.take() == 1
    assert rd(serial, IIR) == 0x02
    assert rd(serial, IIR) == 0x01  # acknowledged by the read
    wr(serial, DATA, ord("a"))
    assert evt.take() == 1
    wr(serial, DATA, ord("b"))  # still pending: no second pulse
    assert evt.take() == 0
    assert rd(serial, IIR) == 0x02
    wr(serial, DATA, ord("c"))
    assert evt.take() == 1
    # Re-enabling THRE raises it again (Linux's UART_BUG_THRE probe relies on this).
    rd(serial, IIR)
    wr(serial, IER, 0)
    wr(serial, IER, 0x02)
    assert evt.take() == 1
    assert rd(serial, IIR) == 0x02


def test_no_interrupt_when_disabled(serial: Serial, evt: FakeEvent) -> None:
    wr(serial, DATA, 1)
    assert serial.queue_input_bytes(b"a") == 1
    assert evt.count == 0
    assert rd(serial, IIR) == 0x01


def test_data_available_interrupt_and_lsr_dr(serial: Serial, evt: FakeEvent) -> None:
    wr(serial, IIR, 0x01)  # enable FIFO
    wr(serial, IER, 0x01)
    assert evt.take() == 0  # nothing received yet
    assert serial.queue_input_bytes(b"xy") == 2
    assert evt.take() == 1
    assert rd(serial, IIR) == 0xC4
    assert rd(serial, LSR) & 0x01
    assert rd(serial, DATA) == ord("x")
    assert rd(serial, DATA) == ord("y")
    assert not rd(serial, LSR) & 0x01
    assert rd(serial, IIR) == 0xC1
    assert rd(serial, DATA) == 0  # empty FIFO


def test_iir_priority(serial: Serial, evt: FakeEvent) -> None:
    wr(serial, IIR, 0x01)
    wr(serial, IER, 0x0F)  # THR is empty: THRE pending at once
    serial.queue_input_bytes(b"a")
    assert rd(serial, IIR) & 0x0F == 0x04  # data beats THRE, and THRE stays pending
    rd(serial, DATA)
    assert rd(serial, IIR) & 0x0F == 0x02
    assert rd(serial, IIR) & 0x0F == 0x01
    # Loopback overrun: line status beats data available.
    wr(serial, MCR, 0x10)
    assert rd(serial, IIR) & 0x0F == 0x00  # modem status delta from entering loopback
    rd(serial, MSR)
    for i in range(17):
        wr(serial, DATA, i)
    assert rd(serial, IIR) & 0x0F == 0x06
    assert rd(serial, LSR) & 0x02  # OE, cleared by the read
    assert not rd(serial, LSR) & 0x02
    assert rd(serial, IIR) & 0x0F == 0x04
    assert evt.count > 0


def test_loopback_echoes_and_drives_modem_inputs(serial: Serial) -> None:
    wr(serial, IIR, 0x01)
    # Linux's 8250 probe: LOOP | OUT2 | RTS must read back as DCD | CTS.
    wr(serial, MCR, 0x1A)
    assert rd(serial, MSR) & 0xF0 == 0x90
    wr(serial, MCR, 0x1F)
    assert rd(serial, MSR) & 0xF0 == 0xF0
    wr(serial, MCR, 0x10)
    msr = rd(serial, MSR)
    assert msr & 0xF0 == 0
    assert msr & 0x0F == 0x0F  # DCTS, DDSR, TERI (RI fell), DDCD
    assert rd(serial, MSR) & 0x0F == 0  # deltas cleared by the read
    for b in b"loop":
        wr(serial, DATA, b)
    assert bytes(rd(serial, DATA) for _ in range(4)) == b"loop"
    # Host input waits while in loopback.
    assert serial.queue_input_bytes(b"z") == 0
    wr(serial, MCR, 0x08)
    assert rd(serial, MSR) & 0xF0 == 0xB0
    assert serial.queue_input_bytes(b"z") == 1


def test_loopback_output_does_not_reach_writer(evt: FakeEvent) -> None:
    out = io.BytesIO()
    s = Serial(evt, out)
    wr(s, MCR, 0x10)
    wr(s, DATA, ord("q"))
    s.close()
    assert out.getvalue() == b""


def test_fifo_capacity_and_back_pressure(serial: Serial) -> None:
    assert serial.queue_input_bytes(b"abc") == 1  # FIFO disabled: one holding register
    wr(serial, IIR, 0x07)  # enable + clear
    assert not rd(serial, LSR) & 0x01
    assert serial.queue_input_bytes(bytes(range(20))) == 16
    assert serial.queue_input_bytes(b"more") == 0
    assert rd(serial, DATA) == 0
    assert serial.queue_input_bytes(b"more") == 1
    wr(serial, IIR, 0x03)  # clear RX
    assert not rd(serial, LSR) & 0x01


def test_fifo64_mode_needs_dlab(serial: Serial) -> None:
    wr(serial, IIR, 0x21)  # without DLAB the 64-byte bit is ignored
    assert rd(serial, IIR) == 0xC1
    wr(serial, LCR, 0x80)
    wr(serial, IIR, 0x21)
    assert rd(serial, IIR) == 0xE1
    wr(serial, LCR, 0x03)
    assert serial.queue_input_bytes(bytes(100)) == 64


def test_write_input_blocks_until_guest_reads(serial: Serial, evt: FakeEvent) -> None:
    wr(serial, IIR, 0x01)
    wr(serial, IER, 0x01)
    payload = bytes(range(256)) * 2
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(serial.write_input(payload)))
    t.start()
    received = bytearray()
    deadline = time.monotonic() + 10
    while len(received) < len(payload) and time.monotonic() < deadline:
        if rd(serial, LSR) & 0x01:
            received.append(rd(serial, DATA))
    t.join()
    assert bytes(received) == payload  # nothing lost, in order
    assert done == [len(payload)]
    assert evt.count >= len(payload) // 16


def test_write_input_timeout_and_close(serial: Serial) -> None:
    assert serial.write_input(b"ab", timeout=0.01) == 1
    serial.close()
    assert serial.write_input(b"c") == 0
    assert serial.queue_input_bytes(b"c") == 0


def test_start_input_reads_fd_without_loss(serial: Serial) -> None:
    wr(serial, IIR, 0x01)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        serial.start_input(r)
        with pytest.raises(RuntimeError):
            serial.start_input(r)
        payload = b"typed on the host\n" * 20
        os.write(w, payload)
        received = bytearray()
        deadline = time.monotonic() + 10
        while len(received) < len(payload) and time.monotonic() < deadline:
            if rd(serial, LSR) & 0x01:
                received.append(rd(serial, DATA))
        assert bytes(received) == payload
    finally:
        serial.close()  # stops the reader thread
        os.close(r)
        os.close(w)


def test_input_thread_ends_at_eof(serial: Serial) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    serial.start_input(r)
    serial.close()
    os.close(r)


def test_wide_accesses_split_into_bytes(serial: Serial) -> None:
    serial.write(SCR, b"\x5a\x00")  # offset 8 is ignored
    assert serial.read(LCR, 2) == b"\x03\x08"
    assert serial.read(SCR, 1) == b"\x5a"


def test_concurrent_output_keeps_every_byte(evt: FakeEvent) -> None:
    out = io.BytesIO()
    s = Serial(evt, out, flush_delay=0.0)
    bus = Bus()
    bus.insert(s, 0x3F8, 8)

    def vcpu(ch: bytes) -> None:
        for _ in range(2000):
            bus.write(0x3F8, ch)

    threads = [threading.Thread(target=vcpu, args=(c,)) for c in (b"a", b"b", b"\n")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    data = out.getvalue()
    assert len(data) == 6000
    assert data.count(b"a") == data.count(b"b") == data.count(b"\n") == 2000


class BlockingWriter:
    """An output whose reader has stopped reading until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.release.wait()
        self.data.extend(data)
        return len(data)


def test_stalled_reader_never_blocks_the_vcpu_for_long(evt: FakeEvent) -> None:
    out = BlockingWriter()
    s = Serial(evt, out, flush_delay=0.0, output_stall_timeout=0.05, output_buffer_limit=64)
    try:
        # One bounded wait (50 ms) when the buffer first fills up, then drops without waiting
        # (were it waiting per byte, this loop would take 50 s).
        for _ in range(1000):
            s.write(0, b"x")
        assert s.dropped_output > 0
        out.release.set()
        s.flush()
        # Buffered bytes (the flusher's in-flight chunk plus the buffer) all arrive.
        assert len(out.data) + s.dropped_output == 1000
        s.write(0, b"\n")  # accepting output again after the reader caught up
        s.flush()
        assert out.data.endswith(b"\n")
    finally:
        out.release.set()
        s.close()


def test_close_does_not_hang_on_a_stuck_reader(evt: FakeEvent) -> None:
    out = BlockingWriter()
    s = Serial(evt, out, flush_delay=0.0)
    s.write(0, b"\n")
    time.sleep(0.01)  # let the flusher pick it up and block
    s.close(timeout=0.05)
    assert s.closed
    out.release.set()


def test_fd_writer_ownership_and_ebadf(tmp_path: Path) -> None:
    with FdWriter.create_file(tmp_path / "f") as w:
        fd = w.fileno()
        assert w.write(b"abc") == 3
    assert w.closed
    w.close()
    with pytest.raises(OSError) as info:
        w.write(b"x")
    assert info.value.errno == 9
    with pytest.raises(OSError):
        os.fstat(fd)  # owned: closed
    r, wfd = os.pipe2(os.O_CLOEXEC)
    FdWriter(wfd).close()  # not owned: still open
    os.write(wfd, b"ok")
    assert os.read(r, 2) == b"ok"
    os.close(r)
    os.close(wfd)


def test_syslog_writer_sends_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import syslog

    from devices.serial import SyslogWriter

    lines: list[str] = []
    monkeypatch.setattr(syslog, "openlog", lambda *a, **k: None)
    monkeypatch.setattr(syslog, "syslog", lambda prio, msg: lines.append(msg))
    w = SyslogWriter("test")
    w.write(b"first li")
    assert lines == []
    w.write(b"ne\r\nsecond\nthi")
    assert lines == ["first line", "second"]
    w.close()
    assert lines == ["first line", "second", "thi"]


def test_start_input_after_close_fails(serial: Serial) -> None:
    serial.close()
    with pytest.raises(OSError):
        serial.start_input(0)


def test_invalid_buffer_limit(evt: FakeEvent) -> None:
    with pytest.raises(ValueError):
        Serial(evt, None, output_buffer_limit=0)


def test_closed_interrupt_event_does_not_raise() -> None:
    from sys_util import EventFd

    irq = EventFd()
    s = Serial(irq, None)
    irq.close()
    wr(s, IER, 0x03)  # would pulse: the closed eventfd is reported, not raised
    assert s.queue_input_bytes(b"a") == 1
    assert rd(s, IIR) == 0x04
    s.close()
