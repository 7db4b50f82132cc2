"""The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs.

Linux (CONFIG_X86_MPPARSE) scans the last KiB below 640 KiB for the ``_MP_`` floating pointer,
follows it to the ``PCMP`` configuration table and learns from it: one processor entry per vCPU
(APIC ID = vCPU index, CPU 0 the bootstrap processor), the IOAPIC (ID ``ncpus + 1`` at
0xFEC0_0000), the buses (PCI = 0, ISA = 1), how ISA IRQs and PCI INTx pins reach IOAPIC pins, and
that LINT0 is ExtINT (the PIC, virtual-wire mode) and LINT1 NMI. Without it an SMP guest that
has no ACPI boots on one CPU.

ISA IRQ n goes to IOAPIC pin n (KVM's default routing sends GSI n to pin n, the in-kernel PIT
included, so no timer override is needed). PCI INTx lines use pins 16-23, which no ISA device
shares; their entries are level-triggered, active low, as PCI requires.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from arch.errors import MpTableError
from arch.x86_64.layout import IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR

__all__ = [
    "IOAPIC_PINS",
    "ISA_BUS_ID",
    "MAX_CPUS",
    "MPTABLE_LIMIT",
    "PCI_BUS_ID",
    "PciIrq",
    "build_mptable",
    "ioapic_id",
]

#: Table bytes must stay below this (0x9FC00-0x100000 is reserved in e820).
MPTABLE_LIMIT = 0xF_0000
#: APIC IDs are 8 bits; 0xFF is the broadcast ID and the IOAPIC takes ``ncpus + 1``.
MAX_CPUS = 253
IOAPIC_PINS = 24
PCI_BUS_ID = 0
ISA_BUS_ID = 1

_APIC_VERSION = 0x14
_IOAPIC_VERSION = 0x11
_CPU_ENABLED = 0x1
_CPU_BOOTPROCESSOR = 0x2
_IOAPIC_ENABLED = 0x1
_MP_PROCESSOR, _MP_BUS, _MP_IOAPIC, _MP_INTSRC, _MP_LINTSRC = range(5)
_MP_INT, _MP_NMI, _MP_SMI, _MP_EXTINT = range(4)
_IRQ_CONFORMS = 0x0
_IRQ_LEVEL_ACTIVE_LOW = 0x3 | (0x3 << 2)
_ALL_LOCAL_APICS = 0xFF

_MPF = struct.Struct("<4sIBBBB4s")  # signature, physptr, length, specrev, checksum, feature1..5
_MPC = struct.Struct("<4sHBB8s12sIHHIHBB")
_PROCESSOR = struct.Struct("<BBBBII8s")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTSRC = struct.Struct("<BBHBBBB")


@dataclass(frozen=True, slots=True)
class PciIrq:
    """A PCI function's INTx line: ``device`` (slot 0-31) ``pin`` (0 = INTA#) raises ``gsi``."""

    device: int
    pin: int
    gsi: int


def ioapic_id(num_cpus: int) -> int:
    """The IOAPIC's APIC ID: one above the highest CPU ID plus one (as crosvm)."""
    return num_cpus + 1


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(
    num_cpus: int,
    pci_irqs: Sequence[PciIrq] = (),
    *,
    address: int = MPTABLE_ADDR,
    cpu_signature: int = 0x600,
    cpu_features: int = 0x201,
) -> bytes:
    """The floating pointer followed by the configuration table, to be written at ``address``.

    Args:
        num_cpus: vCPU count; CPU i gets APIC ID i.
        pci_irqs: INTx routes of the PCI devices (GSIs 16-23 recommended).
        address: where the bytes will be written (the table pointer is absolute).
        cpu_signature / cpu_features: CPUID 1 EAX / EDX summary for the processor entries.

    Raises:
        MpTableError: too many CPUs, a bad PCI route, or a table that does not fit.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise MpTableError(f"{num_cpus} CPUs: the MP table describes 1 to {MAX_CPUS}")
    io_apic = ioapic_id(num_cpus)
    pci_pins: set[int] = set()
    for route in pci_irqs:
        if not (0 <= route.device < 32 and 0 <= route.pin < 4 and 0 <= route.gsi < IOAPIC_PINS):
            raise MpTableError(f"invalid PCI interrupt route {route}")
        pci_pins.add(route.gsi)

    entries: list[bytes] = []
    for cpu in range(num_cpus):
        flags = _CPU_ENABLED | (_CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(
            _PROCESSOR.pack(
                _MP_PROCESSOR, cpu, _APIC_VERSION, flags, cpu_signature, cpu_features, b""
            )
        )
    entries.append(_BUS.pack(_MP_BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(_BUS.pack(_MP_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(_IOAPIC.pack(_MP_IOAPIC, io_apic, _IOAPIC_VERSION, _IOAPIC_ENABLED, IOAPIC_ADDR))
    for irq in range(16):
        if irq == 2 or irq in pci_pins:  # 2 is the PIC cascade; nothing raises it
            continue
        entries.append(
            _INTSRC.pack(_MP_INTSRC, _MP_INT, _IRQ_CONFORMS, ISA_BUS_ID, irq, io_apic, irq)
        )
    for route in pci_irqs:
        entries.append(
            _INTSRC.pack(
                _MP_INTSRC,
                _MP_INT,
                _IRQ_LEVEL_ACTIVE_LOW,
                PCI_BUS_ID,
                (route.device << 2) | route.pin,
                io_apic,
                route.gsi,
            )
        )
    entries.append(
        _INTSRC.pack(_MP_LINTSRC, _MP_EXTINT, _IRQ_CONFORMS, ISA_BUS_ID, 0, _ALL_LOCAL_APICS, 0)
    )
    entries.append(
        _INTSRC.pack(_MP_LINTSRC, _MP_NMI, _IRQ_CONFORMS, ISA_BUS_ID, 0, _ALL_LOCAL_APICS, 1)
    )

    body = b"".join(entries)
    table_addr = address + _MPF.size
    table_len = _MPC.size + len(body)
    if table_addr + table_len > MPTABLE_LIMIT or table_len > 0xFFFF:
        raise MpTableError(f"MP table of {table_len} bytes does not fit below {MPTABLE_LIMIT:#x}")
    header = bytearray(
        _MPC.pack(
            b"PCMP", table_len, 4, 0, b"CROSVM  ", b"PYCROSVM    ", 0, 0, len(entries),
            LAPIC_ADDR, 0, 0, 0,
        )
    )  # fmt: skip
    header[7] = _checksum(bytes(header) + body)
    mpf = bytearray(_MPF.pack(b"_MP_", table_addr, 1, 4, 0, 0, b"\0\0\0\0"))
    mpf[10] = _checksum(bytes(mpf))
    return bytes(mpf) + bytes(header) + body
