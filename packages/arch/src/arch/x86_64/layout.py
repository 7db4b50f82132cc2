"""The x86_64 guest physical memory map, and the e820 table that tells the guest about it.

Fixed low-memory structures (all below 1 MiB, so any guest size >= 2 MiB holds them)::

    0x0000_0500  boot GDT (NULL, NULL, CODE 0x10, DATA 0x18, TSS 0x20 -- Linux __BOOT_CS/DS)
    0x0000_0530  boot IDT (empty, limit 7)
    0x0000_7000  zero page (struct boot_params); RSI points here
    0x0000_8000  boot stack top (RSP = RBP)
    0x0000_9000  PML4, 0xA000 PDPT, 0xB000-0xE000 four page directories (4 GiB, 2 MiB pages)
    0x0002_0000  kernel command line
    0x0009_FC00  MP table (last KiB below 640 KiB, where Linux scans for "_MP_")
    0x0009_FC00 - 0x0010_0000  reserved in e820 (EBDA, VGA hole, BIOS area)
    0x0010_0000  first address a kernel may use (bzImage protected-mode code goes here or
                 at the next kernel_alignment boundary)

The 32-bit hole ``[0xD000_0000, 4 GiB)`` holds the PCI BAR window ``[0xE000_0000, 0xFEC0_0000)``,
the IOAPIC (0xFEC0_0000), LAPIC (0xFEE0_0000), KVM's identity-map page (0xFFFB_C000) and TSS
(0xFFFB_D000, 3 pages). RAM that would fall in the hole is relocated above 4 GiB -- never
dropped (OLD crosvm gave a 5 GiB guest 4.25 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from arch.errors import MemoryLayoutError

__all__ = [
    "BOOT_GDT_ADDR",
    "BOOT_IDT_ADDR",
    "BOOT_STACK_POINTER",
    "CMDLINE_ADDR",
    "CMDLINE_MAX_SIZE",
    "EBDA_START",
    "FIRST_ADDR_PAST_32BITS",
    "HIGH_MMIO_SIZE",
    "HIMEM_START",
    "IDENTITY_MAP_ADDR",
    "IOAPIC_ADDR",
    "IO_PORT_WINDOW",
    "KVM_PRIVATE_SIZE",
    "LAPIC_ADDR",
    "MEM_32BIT_GAP_START",
    "MIN_MEMORY_SIZE",
    "MPTABLE_ADDR",
    "PAGE_SIZE",
    "PCI_MMIO_WINDOW",
    "PDE_ADDR",
    "PDPTE_ADDR",
    "PML4_ADDR",
    "TSS_ADDR",
    "ZERO_PAGE_ADDR",
    "E820Entry",
    "E820Type",
    "MemoryLayout",
    "e820_map",
    "high_mmio_window",
    "memory_layout",
]

PAGE_SIZE = 0x1000
BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x530
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_POINTER = 0x8000
PML4_ADDR = 0x9000
PDPTE_ADDR = 0xA000
PDE_ADDR = 0xB000  # four pages: 0xB000-0xEFFF
CMDLINE_ADDR = 0x2_0000
#: Room for the command line: up to the MP table (far above any kernel's own limit).
CMDLINE_MAX_SIZE = 0x1_0000
MPTABLE_ADDR = 0x9_FC00
EBDA_START = 0x9_FC00
HIMEM_START = 0x10_0000
MEM_32BIT_GAP_START = 0xD000_0000
FIRST_ADDR_PAST_32BITS = 1 << 32
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
IDENTITY_MAP_ADDR = 0xFFFB_C000
TSS_ADDR = 0xFFFB_D000
#: KVM_SET_IDENTITY_MAP_ADDR takes one page, KVM_SET_TSS_ADDR three.
KVM_PRIVATE_SIZE = 4 * PAGE_SIZE
#: (base, size) of the 32-bit PCI BAR window: 0xE000_0000 up to the IOAPIC.
PCI_MMIO_WINDOW = (0xE000_0000, IOAPIC_ADDR - 0xE000_0000)
#: (base, size) of the I/O port window handed to PCI devices.
IO_PORT_WINDOW = (0xC000, 0x1_0000 - 0xC000)
#: Smallest guest: the fixed structures plus some RAM above 1 MiB for a kernel.
MIN_MEMORY_SIZE = 2 << 20
#: Size of the 64-bit MMIO window placed above the highest RAM address.
HIGH_MMIO_SIZE = 64 << 30


class E820Type(IntEnum):
    """e820 range types (ACPI address range types)."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@dataclass(frozen=True, slots=True)
class E820Entry:
    """One e820 range ``[address, address + size)``."""

    address: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True, slots=True)
class MemoryLayout:
    """Guest RAM regions for a memory size, as ``GuestMemory`` wants them.

    Attributes:
        size: total RAM in bytes.
        regions: ``(guest_base, size)`` pairs: ``[0, min(size, 0xD000_0000))`` and, for larger
            guests, ``[4 GiB, 4 GiB + size - 0xD000_0000)``.
    """

    size: int
    regions: tuple[tuple[int, int], ...]

    @property
    def low_ram_end(self) -> int:
        """End of RAM below the PCI hole."""
        return self.regions[0][1]

    @property
    def end(self) -> int:
        """One past the highest RAM address."""
        base, size = self.regions[-1]
        return base + size


def memory_layout(size: int) -> MemoryLayout:
    """Lay out ``size`` bytes of guest RAM around the 32-bit PCI hole.

    Raises:
        MemoryLayoutError: size not page aligned, below :data:`MIN_MEMORY_SIZE`, or beyond what
            the guest can address (46 bits).
    """
    if size % PAGE_SIZE:
        raise MemoryLayoutError(size, "not a multiple of 4 KiB")
    if size < MIN_MEMORY_SIZE:
        raise MemoryLayoutError(size, f"less than the minimum {MIN_MEMORY_SIZE >> 20} MiB")
    if size > (1 << 46) - FIRST_ADDR_PAST_32BITS:
        raise MemoryLayoutError(size, "more than the 46-bit guest physical address space")
    low = min(size, MEM_32BIT_GAP_START)
    regions: list[tuple[int, int]] = [(0, low)]
    if size > low:
        regions.append((FIRST_ADDR_PAST_32BITS, size - low))
    return MemoryLayout(size, tuple(regions))


def e820_map(layout: MemoryLayout) -> list[E820Entry]:
    """The e820 table for ``layout``, sorted by address.

    ``[0, 0x9FC00)`` RAM; ``[0x9FC00, 1 MiB)`` reserved (MP table, BIOS area); ``[1 MiB,
    low end)`` RAM -- including 1-2 MiB, which OLD crosvm left out; KVM's identity map and TSS
    pages reserved; RAM above 4 GiB when the guest has any.
    """
    low_end = layout.low_ram_end
    entries = [
        E820Entry(0, EBDA_START, E820Type.RAM),
        E820Entry(EBDA_START, HIMEM_START - EBDA_START, E820Type.RESERVED),
        E820Entry(HIMEM_START, low_end - HIMEM_START, E820Type.RAM),
        E820Entry(IDENTITY_MAP_ADDR, KVM_PRIVATE_SIZE, E820Type.RESERVED),
    ]
    entries.extend(E820Entry(base, size, E820Type.RAM) for base, size in layout.regions[1:])
    return entries


def high_mmio_window(layout: MemoryLayout) -> tuple[int, int]:
    """``(base, size)`` of the 64-bit MMIO window: from the first 1 GiB boundary above RAM."""
    base = max(layout.end, FIRST_ADDR_PAST_32BITS)
    base = (base + (1 << 30) - 1) & ~((1 << 30) - 1)
    return base, HIGH_MMIO_SIZE
