"""The MP table is checked with an independent parser written from the MP spec 1.4."""

import struct
from dataclasses import dataclass, field

import pytest

from arch.errors import MpTableError
from arch.x86_64 import PciIrq, build_mptable
from arch.x86_64.layout import EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR


@dataclass
class Parsed:
    cpus: list[tuple[int, int]] = field(default_factory=list)  # (apic id, flags)
    buses: dict[int, str] = field(default_factory=dict)
    ioapics: list[tuple[int, int]] = field(default_factory=list)  # (id, address)
    ints: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    lints: list[tuple[int, int, int]] = field(default_factory=list)  # (type, dst apic, lint)


def parse(data: bytes, base: int) -> Parsed:
    assert data[:4] == b"_MP_"
    assert sum(data[:16]) % 256 == 0
    physptr, length, rev = struct.unpack_from("<IBB", data, 4)
    assert (length, rev) == (1, 4)
    off = physptr - base
    assert data[off : off + 4] == b"PCMP"
    tlen, trev = struct.unpack_from("<HB", data, off + 4)
    assert trev == 4
    assert sum(data[off : off + tlen]) % 256 == 0
    count, lapic = struct.unpack_from("<HI", data, off + 34)
    assert lapic == LAPIC_ADDR
    p = Parsed()
    pos = off + 44
    for _ in range(count):
        kind = data[pos]
        if kind == 0:
            _, apic, _ver, flags = struct.unpack_from("<BBBB", data, pos)
            p.cpus.append((apic, flags))
            pos += 20
            continue
        if kind == 1:
            p.buses[data[pos + 1]] = data[pos + 2 : pos + 8].decode().strip()
        elif kind == 2:
            _, apic, _ver, flags, addr = struct.unpack_from("<BBBBI", data, pos)
            assert flags & 1
            p.ioapics.append((apic, addr))
        elif kind == 3:
            _, itype, iflag, bus, busirq, dst, pin = struct.unpack_from("<BBHBBBB", data, pos)
            p.ints.append((itype, iflag, bus, busirq, dst, pin))
        elif kind == 4:
            _, itype, _f, _b, _bi, dst, lint = struct.unpack_from("<BBHBBBB", data, pos)
            p.lints.append((itype, dst, lint))
        else:
            raise AssertionError(f"unknown entry type {kind}")
        pos += 8
    assert pos == off + tlen
    return p


@pytest.mark.parametrize("ncpus", [1, 2, 4, 64])
def test_cpus_ioapic_buses_lints(ncpus: int) -> None:
    p = parse(build_mptable(ncpus), MPTABLE_ADDR)
    assert p.cpus == [(i, 3 if i == 0 else 1) for i in range(ncpus)]
    assert p.ioapics == [(ncpus + 1, IOAPIC_ADDR)]
    assert p.buses == {0: "PCI", 1: "ISA"}
    assert sorted(p.lints) == [(1, 0xFF, 1), (3, 0xFF, 0)]  # NMI on LINT1, ExtINT on LINT0
    isa = {busirq: pin for (_t, _f, bus, busirq, _d, pin) in p.ints if bus == 1}
    assert isa == {irq: irq for irq in range(16) if irq != 2}


def test_pci_intx_entries() -> None:
    routes = [PciIrq(1, 0, 16), PciIrq(2, 1, 17), PciIrq(3, 0, 5)]
    p = parse(build_mptable(2, routes), MPTABLE_ADDR)
    pci = [(busirq, pin, flags, dst) for (_t, flags, bus, busirq, dst, pin) in p.ints if bus == 0]
    assert pci == [(1 << 2, 16, 0xF, 3), ((2 << 2) | 1, 17, 0xF, 3), (3 << 2, 5, 0xF, 3)]
    isa_pins = {pin for (_t, _f, bus, _bi, _d, pin) in p.ints if bus == 1}
    assert 5 not in isa_pins  # the ISA entry for a pin taken by PCI is dropped


def test_table_lies_in_reserved_low_memory() -> None:
    data = build_mptable(253)
    assert MPTABLE_ADDR >= EBDA_START
    assert MPTABLE_ADDR + len(data) <= 0xF_0000
    parse(data, MPTABLE_ADDR)


@pytest.mark.parametrize("ncpus", [0, 254, 1000])
def test_cpu_count_limits(ncpus: int) -> None:
    with pytest.raises(MpTableError):
        build_mptable(ncpus)


@pytest.mark.parametrize("route", [PciIrq(32, 0, 16), PciIrq(1, 4, 16), PciIrq(1, 0, 24)])
def test_bad_pci_routes(route: PciIrq) -> None:
    with pytest.raises(MpTableError):
        build_mptable(1, [route])
