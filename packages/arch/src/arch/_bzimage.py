"""bzImage loading through the Linux/x86 64-bit boot protocol (Documentation/x86/boot.rst).

The file starts with the real-mode setup (``setup_sects`` + 1 sectors) whose setup header sits
at 0x1f1; the protected-mode payload follows and is ``syssize`` 16-byte paragraphs long. We copy
the payload to its load address and enter it at +0x200 in 64-bit mode, which requires
``xloadflags & XLF_KERNEL_64`` (protocol 2.12+). The real-mode part never runs.

Note for emulating hosts: the payload is compressed, so the decompressor runs at CPL0 (emulated,
~25 s for a small kernel here). Prefer the ELF vmlinux where it exists.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from arch._kernel import DEFAULT_INITRD_ADDR_MAX, HIMEM_START, LoadedKernel, copy_to_guest
from arch._source import ImageSource
from arch.errors import KernelLoadError

if TYPE_CHECKING:
    from sys_util import GuestMemory

__all__ = ["HDRS_MAGIC", "SETUP_HEADER_END", "SETUP_HEADER_OFFSET", "load_bzimage"]

SETUP_HEADER_OFFSET = 0x1F1
#: boot_params.hdr may extend at most to here (``_pad7`` ends at 0x290).
SETUP_HEADER_END = 0x290
HDRS_MAGIC = b"HdrS"

_LOADED_HIGH = 0x01
_XLF_KERNEL_64 = 0x01
_MIN_VERSION = 0x206
_ENTRY_64_OFFSET = 0x200
#: Protocol 2.10+ headers reach at least init_size (0x260..0x264).
_MIN_HEADER_END = 0x264

# Offsets inside the file (== offsets inside boot_params).
_OFF_SETUP_SECTS = 0x1F1
_OFF_SYSSIZE = 0x1F4
_OFF_JUMP = 0x200
_OFF_HEADER = 0x202
_OFF_VERSION = 0x206
_OFF_LOADFLAGS = 0x211
_OFF_CODE32_START = 0x214
_OFF_INITRD_ADDR_MAX = 0x22C
_OFF_KERNEL_ALIGNMENT = 0x230
_OFF_RELOCATABLE = 0x234
_OFF_XLOADFLAGS = 0x236
_OFF_CMDLINE_SIZE = 0x238
_OFF_PREF_ADDRESS = 0x258
_OFF_INIT_SIZE = 0x260


def _u(fmt: str, data: bytes, offset: int) -> int:
    value: int = struct.unpack_from(fmt, data, offset)[0]
    return value


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def load_bzimage(
    memory: GuestMemory, src: ImageSource, *, lowest: int, highest: int
) -> LoadedKernel:
    """Load a bzImage's protected-mode payload; the kernel must fit below ``highest``."""
    name = src.name
    head = src.pread(SETUP_HEADER_END, 0)
    if len(head) < _OFF_VERSION + 2 or head[_OFF_HEADER : _OFF_HEADER + 4] != HDRS_MAGIC:
        raise KernelLoadError("no 'HdrS' boot protocol signature at 0x202 (not a bzImage)", name)
    version = _u("<H", head, _OFF_VERSION)
    if version < _MIN_VERSION:
        raise KernelLoadError(
            f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old (need 2.06+)", name
        )
    header_end = min(_OFF_HEADER + head[_OFF_JUMP + 1], SETUP_HEADER_END)
    if header_end < _MIN_HEADER_END:
        raise KernelLoadError(
            f"setup header ends at {header_end:#x} (jump byte), before the 2.10+ fields", name
        )
    if len(head) < SETUP_HEADER_END:
        raise KernelLoadError(f"truncated setup header ({len(head)} bytes)", name)
    hdr = bytearray(head[SETUP_HEADER_OFFSET:header_end])

    loadflags = head[_OFF_LOADFLAGS]
    if not loadflags & _LOADED_HIGH:
        raise KernelLoadError("zImage kernels (not loaded high) are not supported", name)
    xloadflags = _u("<H", head, _OFF_XLOADFLAGS) if version >= 0x20C else 0
    if not xloadflags & _XLF_KERNEL_64:
        raise KernelLoadError(
            "kernel has no 64-bit entry point (XLF_KERNEL_64 unset; 32-bit kernels are "
            "not supported)",
            name,
        )
    cmdline_size = _u("<I", head, _OFF_CMDLINE_SIZE)
    if cmdline_size == 0:
        raise KernelLoadError("setup header cmdline_size is 0", name)
    setup_sects = head[_OFF_SETUP_SECTS] or 4
    payload_offset = (setup_sects + 1) * 512
    payload_size = _u("<I", head, _OFF_SYSSIZE) * 16
    if payload_size == 0:
        raise KernelLoadError("syssize is 0 (no protected-mode kernel)", name)
    if payload_offset + payload_size > src.size:
        raise KernelLoadError(
            f"protected-mode kernel at {payload_offset:#x}+{payload_size:#x} (syssize) is "
            f"beyond the {src.size:#x}-byte file (truncated?)",
            name,
        )

    kernel_alignment = _u("<I", head, _OFF_KERNEL_ALIGNMENT)
    relocatable = bool(head[_OFF_RELOCATABLE])
    if relocatable:
        if kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1):
            raise KernelLoadError(f"kernel_alignment {kernel_alignment:#x} is invalid", name)
        load_address = _align_up(max(lowest, HIMEM_START), kernel_alignment)
        runtime_start = load_address
    else:
        # A non-relocatable kernel is loaded at the traditional 1 MiB and moves itself to
        # pref_address (LOAD_PHYSICAL_ADDR) before it runs.
        load_address = HIMEM_START
        pref_address = _u("<Q", head, _OFF_PREF_ADDRESS) if version >= 0x20A else 0
        runtime_start = pref_address or load_address
    init_size = _u("<I", head, _OFF_INIT_SIZE) if version >= 0x20A else 0
    end = max(load_address + payload_size, runtime_start + init_size)
    if load_address < lowest or end > highest:
        raise KernelLoadError(
            f"kernel needs guest memory [{load_address:#x}, {end:#x}) but RAM below the "
            f"PCI hole is [{lowest:#x}, {highest:#x})",
            name,
        )
    if not memory.checked_range(load_address, end - load_address):
        raise KernelLoadError(f"kernel range {load_address:#x}-{end:#x} is not guest RAM", name)
    copy_to_guest(memory, src, payload_offset, load_address, payload_size, "protected-mode kernel")

    struct.pack_into("<I", hdr, _OFF_CODE32_START - SETUP_HEADER_OFFSET, load_address)
    return LoadedKernel(
        kind="bzimage",
        entry=load_address + _ENTRY_64_OFFSET,
        load_address=load_address,
        end=end,
        setup_header=bytes(hdr),
        protocol_version=version,
        cmdline_limit=cmdline_size,
        initrd_addr_max=_u("<I", head, _OFF_INITRD_ADDR_MAX) or DEFAULT_INITRD_ADDR_MAX,
        kernel_alignment=kernel_alignment,
    )
