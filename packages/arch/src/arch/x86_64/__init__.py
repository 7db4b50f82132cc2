"""x86_64 VM construction: memory layout, e820, zero page, MP table, boot GDT and page tables.

The modules are small and usable on their own (a test or another VMM can build a zero page or
an MP table without KVM); :func:`build_vm` puts them together over ``kvm.Vm``.
"""

from arch.x86_64.bootparams import build_zero_page
from arch.x86_64.gdt import boot_gdt, boot_idt, page_tables
from arch.x86_64.layout import E820Entry, E820Type, MemoryLayout, e820_map, memory_layout
from arch.x86_64.mptable import PciIrq, build_mptable

__all__ = [
    "E820Entry",
    "E820Type",
    "MemoryLayout",
    "PciIrq",
    "boot_gdt",
    "boot_idt",
    "build_mptable",
    "build_zero_page",
    "e820_map",
    "memory_layout",
    "page_tables",
]
