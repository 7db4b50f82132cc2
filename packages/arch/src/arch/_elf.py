"""ELF64 ``vmlinux`` loading (the fast path on emulating hosts: no decompressor runs).

Every header field that decides where bytes go is checked before one byte is copied: class,
byte order, machine, program header size and position, each ``PT_LOAD``'s file range and its
guest range. Segments go to ``p_paddr`` (vmlinux's ``p_vaddr`` is the high kernel mapping), the
bss is zeroed, and the entry point is ``e_entry`` (vmlinux links ``ENTRY(phys_startup_64)``, a
physical address) -- not a fixed 0x200200, the OLD crosvm pitfall.
"""

from __future__ import annotations

import itertools
import struct
from typing import TYPE_CHECKING

from arch._kernel import LoadedKernel, copy_to_guest, zero_guest
from arch._source import ImageSource
from arch.errors import KernelLoadError

if TYPE_CHECKING:
    from sys_util import GuestMemory

__all__ = ["ELF_MAGIC", "load_elf"]

ELF_MAGIC = b"\x7fELF"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ET_EXEC = 2
_EM_X86_64 = 62
_PT_LOAD = 1
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_MAX_NOTE_SEGMENT = 1 << 20


def _parse_pvh_entry(notes: bytes) -> int | None:
    """Find XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment; malformed notes are ignored."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_start = pos + 12
        desc_start = name_start + ((namesz + 3) & ~3)
        end = desc_start + ((descsz + 3) & ~3)
        if end > len(notes):
            return None
        name = notes[name_start : name_start + namesz]
        if name == b"Xen\0" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
            fmt = "<I" if descsz == 4 else "<Q"
            value: int = struct.unpack_from(fmt, notes, desc_start)[0]
            return value
        pos = end
    return None


def load_elf(memory: GuestMemory, src: ImageSource, *, lowest: int, highest: int) -> LoadedKernel:
    """Load an ELF64 x86-64 executable whose segments must lie in ``[lowest, highest)``."""
    name = src.name
    head = src.pread(_EHDR.size, 0)
    if len(head) < _EHDR.size:
        raise KernelLoadError(f"truncated ELF header ({len(head)} of {_EHDR.size} bytes)", name)
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = _EHDR.unpack(head)  # fmt: skip
    if ident[:4] != ELF_MAGIC:
        raise KernelLoadError("not an ELF file", name)
    if ident[4] != _ELFCLASS64:
        bits = {1: "32-bit"}.get(ident[4], f"class {ident[4]}")
        raise KernelLoadError(f"{bits} ELF kernels are not supported (need ELF64)", name)
    if ident[5] != _ELFDATA2LSB:
        raise KernelLoadError("ELF file is not little-endian", name)
    if e_machine != _EM_X86_64:
        raise KernelLoadError(f"ELF machine {e_machine} is not x86-64 (62)", name)
    if e_type != _ET_EXEC:
        raise KernelLoadError(f"ELF type {e_type} is not an executable (ET_EXEC)", name)
    if e_phentsize != _PHDR.size:
        raise KernelLoadError(f"ELF program header size {e_phentsize} is not {_PHDR.size}", name)
    if e_phnum == 0:
        raise KernelLoadError("ELF file has no program headers", name)
    table_len = e_phnum * _PHDR.size
    if e_phoff < _EHDR.size or e_phoff + table_len > src.size:
        raise KernelLoadError(
            f"ELF program headers at {e_phoff:#x}+{table_len:#x} lie outside the "
            f"{src.size:#x}-byte file",
            name,
        )
    table = src.pread(table_len, e_phoff)
    if len(table) != table_len:
        raise KernelLoadError("file shrank while reading the program headers", name)

    loads: list[tuple[int, int, int, int]] = []  # (paddr, memsz, offset, filesz)
    pvh_entry: int | None = None
    for index in range(e_phnum):
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = _PHDR.unpack_from(
            table, index * _PHDR.size
        )
        if p_type == _PT_NOTE and pvh_entry is None and 0 < p_filesz <= _MAX_NOTE_SEGMENT:
            if p_offset + p_filesz <= src.size:
                pvh_entry = _parse_pvh_entry(src.pread(p_filesz, p_offset))
            continue
        if p_type != _PT_LOAD or p_memsz == 0:
            continue
        where = f"segment {index} (paddr {p_paddr:#x}, memsz {p_memsz:#x})"
        if p_filesz > p_memsz:
            raise KernelLoadError(f"{where}: file size {p_filesz:#x} exceeds memory size", name)
        if p_offset + p_filesz > src.size:
            raise KernelLoadError(
                f"{where}: file range {p_offset:#x}+{p_filesz:#x} is beyond the "
                f"{src.size:#x}-byte file (truncated?)",
                name,
            )
        if p_paddr < lowest or p_paddr + p_memsz > highest:
            raise KernelLoadError(
                f"{where} does not fit guest RAM [{lowest:#x}, {highest:#x})", name
            )
        if not memory.checked_range(p_paddr, p_memsz):
            raise KernelLoadError(f"{where} is not backed by guest RAM", name)
        loads.append((p_paddr, p_memsz, p_offset, p_filesz))
    if not loads:
        raise KernelLoadError("ELF file has no loadable segments", name)
    loads.sort()
    for (a_addr, a_size, _, _), (b_addr, _, _, _) in itertools.pairwise(loads):
        if a_addr + a_size > b_addr:
            raise KernelLoadError(f"segments at {a_addr:#x} and {b_addr:#x} overlap", name)
    if not any(addr <= e_entry < addr + size for addr, size, _, _ in loads):
        raise KernelLoadError(f"entry point {e_entry:#x} is outside every loaded segment", name)

    for paddr, memsz, offset, filesz in loads:
        copy_to_guest(memory, src, offset, paddr, filesz, f"segment at {paddr:#x}")
        zero_guest(memory, paddr + filesz, memsz - filesz)
    return LoadedKernel(
        kind="elf",
        entry=e_entry,
        load_address=loads[0][0],
        end=max(addr + size for addr, size, _, _ in loads),
        pvh_entry=pvh_entry,
    )
