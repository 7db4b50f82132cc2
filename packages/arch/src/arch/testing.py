"""Builders of synthetic kernel images, for tests of loaders and VMMs (no pytest import here).

* :func:`build_elf64` -- an ELF64 executable from ``(paddr, bytes, memsz)`` segments.
* :func:`build_bzimage` -- a bzImage-shaped file with a chosen setup header.
* :func:`serial_hello_guest` -- a tiny runnable ELF64 guest for the 64-bit boot state
  :func:`arch.x86_64.build_vm` sets up: it writes a message and the kernel command line (read
  through ``boot_params.hdr.cmd_line_ptr`` at RSI + 0x228) to COM1, then resets through the
  i8042 (0xFE to port 0x64). About a hundred instructions, since CPL0 code is emulated on some
  hosts.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["build_bzimage", "build_elf64", "serial_hello_guest"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def build_elf64(
    segments: Sequence[tuple[int, bytes, int]],
    entry: int,
    *,
    elf_class: int = 2,
    data_encoding: int = 1,
    machine: int = 62,
    elf_type: int = 2,
    pvh_entry: int | None = None,
) -> bytes:
    """An ELF64 file whose ``PT_LOAD`` segments are ``(paddr, file bytes, memsz)``.

    ``p_vaddr`` is set to ``paddr + 0xffffffff80000000`` (like vmlinux) so a loader that wrongly
    uses it fails loudly. ``pvh_entry`` adds a Xen PHYS32_ENTRY note in a ``PT_NOTE`` segment.
    """
    notes = _note(b"Xen\0", 18, struct.pack("<Q", pvh_entry)) if pvh_entry is not None else b""
    phnum = len(segments) + (1 if notes else 0)
    offset = _EHDR.size + phnum * _PHDR.size
    phdrs = []
    blobs = []
    for paddr, data, memsz in segments:
        phdrs.append(
            _PHDR.pack(1, 5, offset, paddr + 0xFFFF_FFFF_8000_0000, paddr, len(data), memsz, 16)
        )
        blobs.append(data)
        offset += len(data)
    if notes:
        phdrs.append(_PHDR.pack(4, 4, offset, 0, 0, len(notes), len(notes), 4))
        blobs.append(notes)
    ident = b"\x7fELF" + bytes([elf_class, data_encoding, 1]) + bytes(9)
    ehdr = _EHDR.pack(
        ident, elf_type, machine, 1, entry, _EHDR.size, 0, 0, _EHDR.size, _PHDR.size, phnum,
        0, 0, 0,
    )  # fmt: skip
    return ehdr + b"".join(phdrs) + b"".join(blobs)


def build_bzimage(
    payload: bytes,
    *,
    version: int = 0x20F,
    setup_sects: int = 1,
    relocatable: bool = True,
    kernel_alignment: int = 0x20_0000,
    xloadflags: int = 0x1,
    loadflags: int = 0x1,
    init_size: int = 0,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    pref_address: int = 0x100_0000,
    syssize: int | None = None,
) -> bytes:
    """A bzImage: ``setup_sects + 1`` sectors of setup, then ``payload`` padded to 16 bytes."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    padded = payload + bytes(-len(payload) % 16)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, len(padded) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = 0x26C - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x10_0000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = int(relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + padded


def serial_hello_guest(
    message: bytes = b"Hello from the guest\n", load_addr: int = 0x10_0000
) -> bytes:
    """An ELF64 guest (entry = ``load_addr``) that prints ``message``, the command line, resets.

    The code, with RSI = zero page as the 64-bit boot protocol says::

        lea rbx, [rip + msg] ; mov ecx, len ; mov dx, 0x3f8
        1: mov al, [rbx] ; out dx, al ; inc rbx ; dec ecx ; jnz 1b
        mov ebx, [rsi + 0x228]                  ; boot_params.hdr.cmd_line_ptr
        2: mov al, [rbx] ; test al, al ; jz 3f ; out dx, al ; inc rbx ; jmp 2b
        3: mov al, 0xfe ; out 0x64, al          ; i8042 reset
        4: hlt ; jmp 4b
    """
    if not message:
        raise ValueError("message must not be empty")
    code = bytearray()
    code += b"\x48\x8d\x1d" + struct.pack("<i", 0)  # lea rbx, [rip + disp32] (patched below)
    code += b"\xb9" + struct.pack("<I", len(message))  # mov ecx, len
    code += b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
    code += b"\x8a\x03\xee\x48\xff\xc3\xff\xc9\x75\xf6"  # loop 1
    code += b"\x8b\x9e\x28\x02\x00\x00"  # mov ebx, [rsi + 0x228]
    code += b"\x8a\x03\x84\xc0\x74\x06\xee\x48\xff\xc3\xeb\xf4"  # loop 2
    code += b"\xb0\xfe\xe6\x64\xf4\xeb\xfd"  # reset, then hlt forever
    struct.pack_into("<i", code, 3, len(code) - 7)
    text = bytes(code) + message
    return build_elf64([(load_addr, text, len(text))], load_addr)
