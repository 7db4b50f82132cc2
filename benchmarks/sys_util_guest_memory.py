"""Micro-benchmark of sys_util.GuestMemory's virtqueue hot path, printed as ns/op.

Run: python benchmarks/sys_util_guest_memory.py [--number N]

Each figure is the best of 5 timeit repeats divided by the loop count. For scale the script also
times the floor each operation is built on (``struct.Struct.unpack_from`` on the raw mmap, a bare
memoryview slice), so the cost of the bounds checks is the difference between the two columns.
"""

from __future__ import annotations

import argparse
import struct
import timeit

from sys_util import GuestMemory

MB = 1 << 20


def bench(label: str, stmt: str, env: dict[str, object], number: int, floor: str | None) -> None:
    best = min(timeit.repeat(stmt, globals=env, number=number, repeat=5)) / number * 1e9
    line = f"{label:<40} {best:8.1f} ns/op"
    if floor is not None:
        base = min(timeit.repeat(floor, globals=env, number=number, repeat=5)) / number * 1e9
        line += f"   (floor {base:6.1f} ns/op, checks +{best - base:5.1f} ns)"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    desc = struct.Struct("<QIHH")  # a virtq_desc
    u16 = struct.Struct("<H")
    for title, layout, addr in (
        ("one region (64 MiB)", [(0, 64 * MB)], 0x10_0000),
        ("two regions, low", [(0, 64 * MB), (4096 * MB, 64 * MB)], 0x10_0000),
        ("two regions, above the hole", [(0, 64 * MB), (4096 * MB, 64 * MB)], 4096 * MB),
    ):
        with GuestMemory(layout) as mem:
            mm = mem._mapping.mmap  # the floor: no checks at all
            mv = mem._mapping.view()
            off = addr - int(mem.find_region(addr).guest_base) + mem.find_region(addr).file_offset
            env = {"mem": mem, "a": addr, "desc": desc, "u16": u16, "mm": mm, "mv": mv, "o": off}
            print(f"-- {title}, access at {addr:#x}")
            bench("read_u16", "mem.read_u16(a)", env, args.number, "u16.unpack_from(mm, o)[0]")
            bench("write_u16", "mem.write_u16(a, 5)", env, args.number, "u16.pack_into(mm, o, 5)")
            bench("read_u32", "mem.read_u32(a)", env, args.number, None)
            bench("read_u64", "mem.read_u64(a)", env, args.number, None)
            bench(
                "read_struct(virtq_desc)",
                "mem.read_struct(a, desc)",
                env,
                args.number,
                "desc.unpack_from(mm, o)",
            )
            bench("view(4 KiB)", "mem.view(a, 4096)", env, args.number, "mv[o:o + 4096]")
            bench("iovecs(4 KiB)", "mem.iovecs(a, 4096)", env, args.number, None)
            bench("read(64 B)", "mem.read(a, 64)", env, args.number, "mm[o:o + 64]")
            bench("write(64 B)", "mem.write(a, b'x' * 64)", env, args.number, None)
            mv.release()


if __name__ == "__main__":
    main()
