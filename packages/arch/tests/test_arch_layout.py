import itertools
import struct

import pytest

from arch.errors import MemoryLayoutError
from arch.loader import InitrdPlacement, LoadedKernel
from arch.testing import build_bzimage
from arch.x86_64 import E820Type, build_zero_page, e820_map, memory_layout
from arch.x86_64.layout import (
    FIRST_ADDR_PAST_32BITS,
    MEM_32BIT_GAP_START,
    PCI_MMIO_WINDOW,
    high_mmio_window,
)

MIB = 1 << 20
GIB = 1 << 30


def _ranges(size_mib: int) -> list[tuple[int, int, E820Type]]:
    return [(e.address, e.end, e.type) for e in e820_map(memory_layout(size_mib * MIB))]


def test_256m() -> None:
    layout = memory_layout(256 * MIB)
    assert layout.regions == ((0, 256 * MIB),)
    assert layout.low_ram_end == layout.end == 256 * MIB
    assert _ranges(256) == [
        (0, 0x9FC00, E820Type.RAM),
        (0x9FC00, 0x10_0000, E820Type.RESERVED),
        (0x10_0000, 256 * MIB, E820Type.RAM),  # includes 1-2 MiB (OLD omitted it)
        (0xFFFB_C000, 0xFFFC_0000, E820Type.RESERVED),
    ]


def test_1024m() -> None:
    assert memory_layout(1024 * MIB).regions == ((0, GIB),)
    assert _ranges(1024)[2] == (0x10_0000, GIB, E820Type.RAM)


def test_5000m_relocates_ram_under_the_hole_above_4g() -> None:
    layout = memory_layout(5000 * MIB)
    assert layout.regions == (
        (0, MEM_32BIT_GAP_START),
        (FIRST_ADDR_PAST_32BITS, 5000 * MIB - MEM_32BIT_GAP_START),
    )
    assert sum(size for _, size in layout.regions) == 5000 * MIB  # nothing dropped
    ranges = _ranges(5000)
    assert ranges[2] == (0x10_0000, 0xD000_0000, E820Type.RAM)
    assert ranges[-1] == (4 * GIB, 4 * GIB + 5000 * MIB - 0xD000_0000, E820Type.RAM)
    ram = sum(end - start for start, end, kind in ranges if kind == E820Type.RAM)
    assert ram == 5000 * MIB - (0x10_0000 - 0x9FC00)


@pytest.mark.parametrize("size", [3328 * MIB, 3329 * MIB])
def test_boundary_at_the_hole(size: int) -> None:
    layout = memory_layout(size)
    assert layout.low_ram_end == min(size, MEM_32BIT_GAP_START)
    assert len(layout.regions) == (1 if size <= MEM_32BIT_GAP_START else 2)


def test_e820_sorted_and_disjoint() -> None:
    for size in (2, 256, 3328, 3329, 5000, 64 * 1024):
        entries = e820_map(memory_layout(size * MIB))
        for a, b in itertools.pairwise(entries):
            assert a.end <= b.address


@pytest.mark.parametrize("size", [0, MIB, 2 * MIB - 4096, 256 * MIB + 1, 1 << 47])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(MemoryLayoutError) as info:
        memory_layout(size)
    assert info.value.size == size and "\n" not in str(info.value)


def test_windows_do_not_overlap_ram_or_fixed_devices() -> None:
    base, size = PCI_MMIO_WINDOW
    assert base >= MEM_32BIT_GAP_START and base + size <= 0xFEC0_0000
    layout = memory_layout(5000 * MIB)
    hbase, hsize = high_mmio_window(layout)
    assert hbase >= layout.end and hbase % GIB == 0 and hsize > 0
    assert high_mmio_window(memory_layout(256 * MIB))[0] == 4 * GIB


def test_zero_page_for_elf() -> None:
    kernel = LoadedKernel(kind="elf", entry=0x100_0000, load_address=0x100_0000, end=0x200_0000)
    e820 = e820_map(memory_layout(256 * MIB))
    page = build_zero_page(
        kernel,
        cmdline_addr=0x2_0000,
        cmdline_size=12,
        e820=e820,
        initrd=InitrdPlacement(0x800_0000, 0x1234),
    )
    assert len(page) == 4096
    assert page[0x210] == 0xFF  # type_of_loader
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x2_0000
    assert struct.unpack_from("<I", page, 0x238)[0] == 12
    assert struct.unpack_from("<I", page, 0x230)[0] == 0x100_0000
    assert struct.unpack_from("<II", page, 0x218) == (0x800_0000, 0x1234)
    assert page[0x1E8] == len(e820) == 4
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(page[0x1E8])]
    assert table == [(e.address, e.size, int(e.type)) for e in e820]
    assert page[0x1EF] == 0  # sentinel stays clear


def test_zero_page_keeps_bzimage_header() -> None:
    from arch.loader import load_kernel
    from sys_util import GuestMemory

    with GuestMemory([(0, 64 * MIB)]) as mem:
        kernel = load_kernel(mem, build_bzimage(b"K" * 64, kernel_alignment=0x20_0000))
    page = build_zero_page(kernel, cmdline_addr=0x2_0000, cmdline_size=1, e820=[])
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x20F  # version from the file
    assert struct.unpack_from("<I", page, 0x230)[0] == 0x20_0000  # its kernel_alignment
    assert struct.unpack_from("<I", page, 0x214)[0] == 0x20_0000  # code32_start = load addr
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x2_0000
    assert page[0x210] == 0xFF
    assert page[:0x1F1] == bytes(0x1F1)


def test_zero_page_rejects_too_many_e820_entries() -> None:
    from arch.x86_64 import E820Entry

    kernel = LoadedKernel(kind="elf", entry=0, load_address=0, end=0)
    entries = [E820Entry(i * 4096, 4096, E820Type.RAM) for i in range(129)]
    with pytest.raises(ValueError, match="e820"):
        build_zero_page(kernel, cmdline_addr=0x2_0000, cmdline_size=1, e820=entries)
