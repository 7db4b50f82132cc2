"""The zero page (``struct boot_params``) handed to the kernel in RSI.

Layout per Linux ``arch/x86/include/uapi/asm/bootparam.h``. For a bzImage the file's setup header
is the base of ``hdr`` (the kernel reads its own fields back, e.g. ``kernel_alignment``); the
bytes before ``hdr`` (including ``sentinel`` at 0x1ef) stay zero, as the protocol requires of a
loader that builds a clean boot_params.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from arch._kernel import LoadedKernel
from arch.loader import InitrdPlacement
from arch.x86_64.layout import E820Entry

__all__ = [
    "BOOT_PARAMS_SIZE",
    "E820_MAX_ENTRIES",
    "LOADER_TYPE_UNDEFINED",
    "build_zero_page",
]

BOOT_PARAMS_SIZE = 0x1000
E820_MAX_ENTRIES = 128
LOADER_TYPE_UNDEFINED = 0xFF

OFF_E820_ENTRIES = 0x1E8
OFF_HDR = 0x1F1
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER = 0x202
OFF_TYPE_OF_LOADER = 0x210
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_KERNEL_ALIGNMENT = 0x230
OFF_CMDLINE_SIZE = 0x238
OFF_E820_TABLE = 0x2D0
_E820 = struct.Struct("<QQI")


def build_zero_page(
    kernel: LoadedKernel,
    *,
    cmdline_addr: int,
    cmdline_size: int,
    e820: Sequence[E820Entry],
    initrd: InitrdPlacement | None = None,
) -> bytes:
    """The 4 KiB boot_params image.

    Args:
        kernel: what the loader reported (its setup header, for a bzImage).
        cmdline_addr: guest address of the NUL-terminated command line (below 4 GiB).
        cmdline_size: its length including the NUL.
        e820: the memory map (at most 128 entries).
        initrd: where the initrd was placed, if any (below 4 GiB).
    """
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries exceed the zero page's {E820_MAX_ENTRIES}")
    if cmdline_addr + cmdline_size > 1 << 32:
        raise ValueError("the command line must lie below 4 GiB")
    page = bytearray(BOOT_PARAMS_SIZE)
    if kernel.setup_header is not None:
        page[OFF_HDR : OFF_HDR + len(kernel.setup_header)] = kernel.setup_header
        struct.pack_into("<H", page, OFF_VID_MODE, 0xFFFF)  # "normal" text mode
    else:
        struct.pack_into("<I", page, OFF_KERNEL_ALIGNMENT, kernel.kernel_alignment)
    struct.pack_into("<H", page, OFF_BOOT_FLAG, 0xAA55)
    page[OFF_HEADER : OFF_HEADER + 4] = b"HdrS"
    page[OFF_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    struct.pack_into("<I", page, OFF_CMD_LINE_PTR, cmdline_addr)
    struct.pack_into("<I", page, OFF_CMDLINE_SIZE, cmdline_size)
    if initrd is not None:
        if initrd.address + initrd.size > 1 << 32:
            raise ValueError("the initrd must lie below 4 GiB")
        struct.pack_into("<I", page, OFF_RAMDISK_IMAGE, initrd.address)
        struct.pack_into("<I", page, OFF_RAMDISK_SIZE, initrd.size)
    page[OFF_E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        _E820.pack_into(
            page, OFF_E820_TABLE + index * _E820.size, entry.address, entry.size, entry.type
        )
    return bytes(page)
