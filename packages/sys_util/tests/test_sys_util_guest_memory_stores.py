"""Scalar stores into guest memory are single stores: a parallel reader never sees a torn or
zeroed value. (struct.pack_into zeroes its destination first; guests poll rings concurrently.)"""

from __future__ import annotations

import os
import struct

import pytest

from sys_util import GuestMemory


@pytest.mark.parametrize(("width", "fmt"), [(2, "<H"), (4, "<I"), (8, "<Q")])
def test_parallel_reader_never_sees_a_value_go_backwards(width: int, fmt: str) -> None:
    addr = 0x1000 + width  # aligned
    write = {2: GuestMemory.write_u16, 4: GuestMemory.write_u32, 8: GuestMemory.write_u64}[width]
    with GuestMemory([(0, 1 << 20)]) as mem:
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                view = mem.view(addr, width)
                unpack = struct.Struct(fmt).unpack_from
                last, bad = 0, b"ok"
                os.write(ready_w, b"r")
                for _ in range(4_000_000):
                    value = unpack(view)[0]
                    if value < last:
                        bad = f"{last}->{value}".encode()
                        break
                    last = value
                os.write(result_w, bad)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(result_w)
        assert os.read(ready_r, 1) == b"r"
        for value in range(1, min(300_000, 1 << (8 * width))):
            write(mem, addr, value)
        os.waitpid(pid, 0)
        verdict = os.read(result_r, 64)
        os.close(ready_r)
        os.close(result_r)
    assert verdict == b"ok", f"a parallel reader saw the value go {verdict.decode()}"


def test_unaligned_and_byte_stores_still_work() -> None:
    with GuestMemory([(0, 1 << 16)]) as mem:
        mem.write_u16(0x101, 0xBEEF)
        mem.write_u32(0x203, 0xDEADBEEF)
        mem.write_u64(0x305, 0x0123456789ABCDEF)
        mem.write_u8(0x400, 0x7F)
        assert mem.read_u16(0x101) == 0xBEEF and mem.read_u32(0x203) == 0xDEADBEEF
        assert mem.read_u64(0x305) == 0x0123456789ABCDEF and mem.read_u8(0x400) == 0x7F
