"""Boot GDT, IDT and identity-mapping page tables: the state a 64-bit entry needs in memory.

Linux's 64-bit boot protocol requires a GDT with flat 4 GiB descriptors for ``__BOOT_CS``
(selector 0x10, execute/read) and ``__BOOT_DS`` (0x18, read/write), CS = __BOOT_CS and
DS/ES/SS = __BOOT_DS, so the GDT follows Linux's layout (as current crosvm does), not OLD
crosvm's 0x08/0x10: NULL, NULL, CODE 0x10, DATA 0x18, and a 16-byte 64-bit TSS descriptor at
0x20 (KVM insists on a usable TR in long mode). It sits at 0x500-0x52F; the empty IDT follows at
0x530 (any exception before the kernel loads its own IDT triple-faults, which KVM reports as a
shutdown exit).

The page tables identity-map the first 4 GiB with 2 MiB pages (PML4 0x9000, PDPT 0xA000, four
page directories 0xB000-0xEFFF), covering the kernel, zero page, command line and initrd -- the
protocol's "identity mapped" requirement -- and the MMIO hole for early device access.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from arch.x86_64.layout import BOOT_GDT_ADDR, BOOT_IDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR

__all__ = [
    "BOOT_CS",
    "BOOT_DS",
    "BOOT_GDT_BYTES",
    "BOOT_TSS",
    "GDT_CODE64",
    "GDT_DATA",
    "GDT_TSS64",
    "IDENTITY_MAPPED_GIB",
    "SegmentDescriptor",
    "boot_gdt",
    "boot_idt",
    "gdt_entry",
    "gdt_segments",
    "page_tables",
    "segment_from_gdt",
]

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
#: Access/flags words (bits 8-15 access byte, 20-23 flags, as in crosvm's gdt_entry).
GDT_CODE64 = 0xA09B  # G, L, present, DPL0, code exec/read accessed
GDT_DATA = 0xC093  # G, D/B, present, DPL0, data read/write accessed
GDT_TSS64 = 0x808B  # G, present, busy 64-bit TSS
IDENTITY_MAPPED_GIB = 4
#: Size of the boot GDT: six 8-byte slots (the TSS descriptor takes two).
BOOT_GDT_BYTES = 48

_PTE_PRESENT_RW = 0x3
_PDE_2M_PAGE = 0x83  # present, writable, page size


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """An 8-byte segment descriptor as an integer (limit in its units, 20 bits)."""
    return (
        ((base & 0xFF00_0000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF_0000) << 32)
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0xFFFF)
    )


@dataclass(frozen=True, slots=True)
class SegmentDescriptor:
    """A descriptor decoded into the fields ``struct kvm_segment`` wants."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 (the field's name in kvm_segment)
    g: int
    avl: int


def segment_from_gdt(entry: int, selector: int) -> SegmentDescriptor:
    """Decode ``entry`` (from :func:`gdt_entry`) loaded with ``selector``."""
    base = ((entry >> 16) & 0xFF_FFFF) | ((entry >> 32) & 0xFF00_0000)
    raw_limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF_0000)
    g = (entry >> 55) & 1
    limit = (raw_limit << 12) | 0xFFF if g else raw_limit
    return SegmentDescriptor(
        base=base,
        limit=limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
    )


def _entries() -> list[int]:
    return [
        0,
        0,
        gdt_entry(GDT_CODE64, 0, 0xF_FFFF),
        gdt_entry(GDT_DATA, 0, 0xF_FFFF),
        gdt_entry(GDT_TSS64, 0, 0xF_FFFF),
        0,  # upper half of the 16-byte TSS descriptor: base bits 63:32 = 0
    ]


def boot_gdt() -> tuple[int, bytes]:
    """``(address, bytes)`` of the boot GDT."""
    data = struct.pack("<6Q", *_entries())
    assert len(data) == BOOT_GDT_BYTES
    return BOOT_GDT_ADDR, data


def boot_idt() -> tuple[int, bytes]:
    """``(address, bytes)`` of the (empty) boot IDT."""
    return BOOT_IDT_ADDR, bytes(8)


def gdt_segments() -> dict[str, SegmentDescriptor]:
    """The code, data and TSS segments the vCPU starts with."""
    entries = _entries()
    return {
        "code": segment_from_gdt(entries[BOOT_CS // 8], BOOT_CS),
        "data": segment_from_gdt(entries[BOOT_DS // 8], BOOT_DS),
        "tss": segment_from_gdt(entries[BOOT_TSS // 8], BOOT_TSS),
    }


@functools.cache
def _page_tables() -> tuple[tuple[int, bytes], ...]:
    pml4 = struct.pack("<Q", PDPTE_ADDR | _PTE_PRESENT_RW) + bytes(4096 - 8)
    pdpt = b"".join(
        struct.pack("<Q", (PDE_ADDR + i * 0x1000) | _PTE_PRESENT_RW)
        for i in range(IDENTITY_MAPPED_GIB)
    ) + bytes(4096 - 8 * IDENTITY_MAPPED_GIB)
    pds = struct.pack(
        f"<{512 * IDENTITY_MAPPED_GIB}Q",
        *((i << 21) | _PDE_2M_PAGE for i in range(512 * IDENTITY_MAPPED_GIB)),
    )
    return ((PML4_ADDR, pml4), (PDPTE_ADDR, pdpt), (PDE_ADDR, pds))


def page_tables() -> list[tuple[int, bytes]]:
    """``(address, bytes)`` chunks of the identity map of the first 4 GiB (2 MiB pages)."""
    return list(_page_tables())
