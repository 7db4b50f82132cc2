import struct

from arch.x86_64.gdt import (
    BOOT_CS,
    BOOT_DS,
    BOOT_TSS,
    boot_gdt,
    boot_idt,
    gdt_entry,
    gdt_segments,
    page_tables,
    segment_from_gdt,
)
from arch.x86_64.layout import BOOT_GDT_ADDR, BOOT_IDT_ADDR, PML4_ADDR


def test_gdt_entry_matches_known_encodings() -> None:
    # Values from the Linux boot GDT / crosvm's gdt tests.
    assert gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF_9B00_0000_FFFF
    assert gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF_9300_0000_FFFF
    assert gdt_entry(0x808B, 0, 0xFFFFF) == 0x008F_8B00_0000_FFFF
    assert gdt_entry(0xC093, 0x1234_5678, 0xABCDE) == 0x12CA_9334_5678_BCDE


def test_segment_decode_round_trip() -> None:
    seg = segment_from_gdt(gdt_entry(0xA09B, 0, 0xFFFFF), 0x10)
    assert (seg.type, seg.present, seg.dpl, seg.s, seg.l, seg.db, seg.g) == (11, 1, 0, 1, 1, 0, 1)
    assert seg.limit == 0xFFFF_FFFF and seg.base == 0 and seg.selector == 0x10
    odd = segment_from_gdt(gdt_entry(0x4093, 0x1234_5678, 0xABCDE), 0x18)
    assert (odd.base, odd.limit, odd.g, odd.db) == (0x1234_5678, 0xABCDE, 0, 1)


def test_boot_gdt_is_linux_layout() -> None:
    addr, data = boot_gdt()
    assert addr == BOOT_GDT_ADDR
    entries = struct.unpack("<6Q", data)
    assert entries[0] == entries[1] == 0
    assert entries[BOOT_CS // 8] == 0x00AF_9B00_0000_FFFF
    assert entries[BOOT_DS // 8] == 0x00CF_9300_0000_FFFF
    assert entries[BOOT_TSS // 8] == 0x008F_8B00_0000_FFFF
    assert BOOT_GDT_ADDR + len(data) <= BOOT_IDT_ADDR
    assert boot_idt() == (BOOT_IDT_ADDR, bytes(8))
    segs = gdt_segments()
    assert segs["code"].l == 1 and segs["data"].type == 3 and segs["tss"].type == 11


def test_page_tables_identity_map_4g() -> None:
    chunks = dict(page_tables())
    pml4 = struct.unpack("<512Q", chunks[PML4_ADDR])
    assert pml4[0] == 0xA003 and not any(pml4[1:])
    pdpt = struct.unpack("<512Q", chunks[0xA000])
    assert pdpt[:4] == (0xB003, 0xC003, 0xD003, 0xE003) and not any(pdpt[4:])
    pds = struct.unpack("<2048Q", chunks[0xB000])
    assert all(pds[i] == (i << 21) | 0x83 for i in range(2048))

    def translate(va: int) -> int:
        pdpt_base = pml4[(va >> 39) & 511] & ~0xFFF
        pd_base = pdpt[(va >> 30) & 511] & ~0xFFF
        pde = pds[((pd_base - 0xB000) // 8) + ((va >> 21) & 511)]
        assert pdpt_base == 0xA000 and pde & 0x80
        return (pde & ~0x1F_FFFF & ((1 << 52) - 1)) | (va & 0x1F_FFFF)

    for va in (0, 0x7000, 0x100_0000, 0xD000_0000, 0xFEC0_0000, 0xFFFF_FFFF):
        assert translate(va) == va
