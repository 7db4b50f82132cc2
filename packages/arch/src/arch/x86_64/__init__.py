"""x86_64 VM construction: memory layout, e820, zero page, MP table, boot GDT and page tables,
CPUID, vCPU boot state, GSI routing, and :func:`build_vm` which puts them together.

The modules are small and usable on their own (a test or another VMM can build a zero page or
an MP table without KVM): :mod:`~arch.x86_64.layout`, :mod:`~arch.x86_64.bootparams`,
:mod:`~arch.x86_64.mptable`, :mod:`~arch.x86_64.gdt`, :mod:`~arch.x86_64.regs`,
:mod:`~arch.x86_64.cpuid`, :mod:`~arch.x86_64.irq`, :mod:`~arch.x86_64.build`.
"""

from arch.x86_64.bootparams import build_zero_page
from arch.x86_64.build import (
    PciDeviceFactory,
    PlaceablePciDevice,
    RunnableVm,
    VmConfig,
    VmContext,
    build_vm,
)
from arch.x86_64.cpuid import HIDDEN_FEATURES, filter_cpuid, guest_cmdline_workarounds
from arch.x86_64.gdt import boot_gdt, boot_idt, page_tables
from arch.x86_64.irq import KvmIrqRouter
from arch.x86_64.layout import E820Entry, E820Type, MemoryLayout, e820_map, memory_layout
from arch.x86_64.mptable import PciIrq, build_mptable
from arch.x86_64.regs import configure_vcpu

__all__ = [
    "HIDDEN_FEATURES",
    "E820Entry",
    "E820Type",
    "KvmIrqRouter",
    "MemoryLayout",
    "PciDeviceFactory",
    "PciIrq",
    "PlaceablePciDevice",
    "RunnableVm",
    "VmConfig",
    "VmContext",
    "boot_gdt",
    "boot_idt",
    "build_mptable",
    "build_vm",
    "build_zero_page",
    "configure_vcpu",
    "e820_map",
    "filter_cpuid",
    "guest_cmdline_workarounds",
    "memory_layout",
    "page_tables",
]
