"""The register sequences Linux's 8250 driver performs, replayed against the model.

Written from the driver's documented behaviour (probe, THRE self-test, polled console output,
interrupt-driven transmit and receive), so a change that would make a Linux guest misdetect the
UART, hang at startup or lose console output fails here rather than in a two-minute boot.
"""

from __future__ import annotations

import io
import os

from devices.serial import FdWriter, Serial

DATA, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
FCR = IIR


class FakeEvent:
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


def test_probe_finds_a_16550a() -> None:
    s = Serial(FakeEvent(), None)
    # IER scratch test: a UART keeps the 4 low IER bits.
    wr(s, IER, 0)
    assert rd(s, IER) & 0x0F == 0
    wr(s, IER, 0x0F)
    assert rd(s, IER) & 0x0F == 0x0F
    wr(s, IER, 0)
    # Loopback test: LOOP | OUT2 | RTS reads back DCD | CTS.
    wr(s, MCR, 0x1A)
    assert rd(s, MSR) & 0xF0 == 0x90
    wr(s, MCR, 0x08)
    # FIFO probe: IIR bits 7:6 == 3 means a working 16550A FIFO.
    wr(s, FCR, 0x01)
    assert rd(s, IIR) >> 6 == 3
    # EFR probes (LCR 0xBF / 0x80) must not read 0 at offset 2, or Linux takes it for a 16650.
    wr(s, LCR, 0xBF)
    assert rd(s, 2) != 0
    wr(s, LCR, 0x80)
    assert rd(s, 2) != 0
    # TI16750 probe: the 64-byte bit only with DLAB set.
    wr(s, LCR, 0)
    wr(s, FCR, 0x21)
    status1 = rd(s, IIR) & 0xE0
    wr(s, FCR, 0)
    wr(s, LCR, 0x80)
    wr(s, FCR, 0x21)
    status2 = rd(s, IIR) & 0xE0
    wr(s, FCR, 0)
    wr(s, LCR, 0)
    assert (status1, status2) == (0xC0, 0xE0)
    s.close()


def test_startup_thre_self_test_passes() -> None:
    # serial8250_do_startup: enabling THRI must raise IIR at once, twice (else UART_BUG_THRE).
    evt = FakeEvent()
    s = Serial(evt, None)
    wr(s, FCR, 0x07)
    rd(s, LSR), rd(s, DATA), rd(s, IIR), rd(s, MSR)  # clear the interrupt registers
    assert rd(s, LSR) & 0x20
    wr(s, IER, 0x02)
    iir1 = rd(s, IIR)
    wr(s, IER, 0)
    wr(s, IER, 0x02)
    iir = rd(s, IIR)
    wr(s, IER, 0)
    assert not iir1 & 0x01 and not iir & 0x01
    assert evt.take() == 2
    assert rd(s, LSR) & 0x40  # TEMT
    s.close()


def test_polled_console_write_flushes_at_its_end() -> None:
    # serial8250_console_write: save IER, IER = 0, (wait THRE, write) per char, wait for
    # BOTH_EMPTY, restore IER. Without a trailing newline the output must still go out now.
    r, w = os.pipe2(os.O_CLOEXEC)
    evt = FakeEvent()
    s = Serial(evt, FdWriter(w, owned=True), owns_output=True, flush_delay=3600)
    try:
        wr(s, IER, 0x05)
        evt.take()
        saved = rd(s, IER)
        wr(s, IER, 0)
        for ch in b"login: ":
            while not rd(s, LSR) & 0x20:
                pass
            wr(s, DATA, ch)
        while rd(s, LSR) & 0x60 != 0x60:
            pass
        wr(s, IER, saved)
        assert os.read(r, 100) == b"login: "
        assert evt.take() == 0  # no interrupt while IER was 0; RLS/RDA have nothing pending
    finally:
        s.close()
        os.close(r)


def test_interrupt_driven_transmit() -> None:
    out = io.BytesIO()
    evt = FakeEvent()
    s = Serial(evt, out)
    wr(s, FCR, 0x07)
    pending = bytearray(b"x" * 40)
    wr(s, IER, 0x01 | 0x02)  # start_tx: THRI on
    interrupts = 0
    while evt.take():
        interrupts += 1
        # The handler loops while IIR says an interrupt is pending.
        while not (iir := rd(s, IIR)) & 0x01:
            assert iir & 0x0F == 0x02
            lsr = rd(s, LSR)
            assert lsr & 0x20
            for _ in range(16):  # tx_loadsz bytes per THRE interrupt
                if not pending:
                    break
                wr(s, DATA, pending.pop())
            if not pending:
                wr(s, IER, 0x01)  # stop_tx: THRI off
        assert interrupts < 10
    s.close()
    assert out.getvalue() == b"x" * 40


def test_interrupt_driven_receive() -> None:
    evt = FakeEvent()
    s = Serial(evt, None)
    wr(s, FCR, 0x07)
    wr(s, IER, 0x05)  # RDI | RLSI
    evt.take()
    assert s.queue_input_bytes(b"ls -l\n") == 6
    assert evt.take() == 1
    got = bytearray()
    while not (iir := rd(s, IIR)) & 0x01:
        assert iir & 0x0F == 0x04
        for _ in range(256):
            if not rd(s, LSR) & 0x01:
                break
            got.append(rd(s, DATA))
    assert bytes(got) == b"ls -l\n"
    s.close()
