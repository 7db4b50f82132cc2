"""Micro-benchmark of the serial console's output path: ns per THR write through ``Bus.write``.

Run: python benchmarks/serial_output.py [--bytes N]

Every byte a guest prints is one ``out`` to 0x3F8, one vCPU exit and one ``Bus.write``; a Linux
boot prints ~20 KB, and Linux's console driver also polls LSR before each byte. Figures (best of
5 repeats, ns per operation):

* ``Bus.write(THR)`` to a sink, to /dev/null (buffered, written by the flusher thread) and
  with the THR-empty interrupt enabled (a real ``EventFd`` written per burst);
* ``Bus.read(LSR)``, the poll Linux's ``serial8250_console_write`` does per byte;
* floors: an empty Python call and a bare ``dict`` lookup + bound-method call, so the bus and
  device overheads are visible as differences;
* end to end: a 20 KB boot log written byte by byte to a pipe drained by a reader thread.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import timeit

from devices.bus import Bus
from devices.serial import FdWriter, Serial
from sys_util import EventFd


def bench(label: str, stmt: str, env: dict[str, object], number: int) -> float:
    best = min(timeit.repeat(stmt, globals=env, number=number, repeat=5)) / number * 1e9
    print(f"{label:<48} {best:8.1f} ns/op")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=200_000, help="writes per repeat")
    args = parser.parse_args()
    n = args.bytes

    def nop(offset: int, data: bytes) -> None:
        return None

    table = {0x3F8: nop}
    floor = bench("floor: dict lookup + call", "t[0x3F8](0, b'A')", {"t": table}, n)

    with EventFd() as evt, open(os.devnull, "wb", buffering=0) as devnull:
        sink = Serial(evt, None)
        bus = Bus()
        bus.insert(sink, 0x3F8, 8)
        env: dict[str, object] = {"bus": bus}
        sink_ns = bench("Bus.write(THR), sink", "bus.write(0x3F8, b'A')", env, n)
        bench("Bus.read(LSR)", "bus.read(0x3FD, 1)", env, n)
        bench("Bus.write(unmapped port)", "bus.write(0x80, b'A')", env, n)
        sink.close()

        dn = Serial(evt, FdWriter(devnull.fileno()))
        bus2 = Bus()
        bus2.insert(dn, 0x3F8, 8)
        env2: dict[str, object] = {"bus": bus2}
        bench("Bus.write(THR), /dev/null, no newline", "bus.write(0x3F8, b'A')", env2, n)
        bench("Bus.write(THR), /dev/null, every byte \\n", "bus.write(0x3F8, b'\\n')", env2, n)
        dn.write(1, b"\x02")  # IER: THR-empty interrupt on
        # The interrupt-driven tty path: the ISR reads IIR (acknowledging THR-empty), then
        # writes a FIFO's worth (16 bytes); the first write re-raises the interrupt.
        irq_ns = (
            bench(
                "16 x Bus.write(THR) + IIR read, THRE irq on",
                "for _ in r16: bus.write(0x3F8, b'A')\nbus.read(0x3FA, 1)",
                {"bus": bus2, "r16": range(16)},
                n // 16,
            )
            / 16
        )
        print(f"{'  = per byte':<48} {irq_ns:8.1f} ns/op")
        dn.close()
        while evt.read_timeout(0) is not None:
            pass

        # End to end: a 20 KB boot log, written byte by byte as Linux's console does (LSR poll,
        # THR write), to a pipe drained by another thread.
        r, w = os.pipe2(os.O_CLOEXEC)
        got = bytearray()

        def drain() -> None:
            while chunk := os.read(r, 65536):
                got.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        ser = Serial(evt, FdWriter(w, owned=True), owns_output=True)
        bus3 = Bus()
        bus3.insert(ser, 0x3F8, 8)
        line = b"[    0.123456] virtio_blk virtio0: [vda] 2097152 512-byte logical blocks\n"
        log = (line * (20_000 // len(line) + 1))[:20_000]
        start = time.perf_counter()
        for b in log:
            bus3.read(0x3FD, 1)
            bus3.write(0x3F8, bytes((b,)))
        elapsed = time.perf_counter() - start
        ser.close()
        reader.join()
        os.close(r)
        assert bytes(got) == log, "output lost"
        print(
            f"{'20 KB boot log (LSR poll + THR per byte)':<48} {elapsed * 1e3:8.2f} ms "
            f"({elapsed / len(log) * 1e9:.0f} ns/byte)"
        )
    print(
        f"ratio THR write / floor: {sink_ns / floor:.1f}x; THRE-irq path / sink: "
        f"{irq_ns / sink_ns:.1f}x"
    )


if __name__ == "__main__":
    main()
