"""PCI: config mechanism #1, configuration space, BAR sizing, capabilities, MSI-X."""

from __future__ import annotations

import struct

import pytest

from devices.pci import (
    MSIX_CAP_ID,
    BarType,
    MsixConfig,
    PciBar,
    PciClass,
    PciConfigIo,
    PciConfiguration,
    PciRoot,
)
from devices.testing import FakeIrqRouter
from sys_util import EventFd


def cfg_addr(dev: int, reg: int, bus: int = 0, func: int = 0) -> bytes:
    return (0x8000_0000 | bus << 16 | dev << 11 | func << 8 | reg << 2).to_bytes(4, "little")


def read32(io: PciConfigIo, dev: int, reg: int) -> int:
    io.write(0, cfg_addr(dev, reg))
    return int.from_bytes(io.read(4, 4), "little")


def write32(io: PciConfigIo, dev: int, reg: int, value: int) -> None:
    io.write(0, cfg_addr(dev, reg))
    io.write(4, value.to_bytes(4, "little"))


def make_device() -> PciConfiguration:
    cfg = PciConfiguration(
        vendor_id=0x1AF4, device_id=0x1042, class_code=PciClass.MASS_STORAGE, subclass=0x80
    )
    cfg.add_bar(PciBar(0, 0xE000_0000, 0x8000, BarType.MEM64))
    cfg.add_bar(PciBar(2, 0xE010_0000, 0x1000, BarType.MEM32, prefetchable=True))
    return cfg


class CfgDevice:
    def __init__(self, cfg: PciConfiguration) -> None:
        self.config = cfg

    def debug_label(self) -> str:
        return "test"

    def read_config_register(self, reg_idx: int) -> int:
        return self.config.read_reg(reg_idx)

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        self.config.write_reg(reg_idx, offset, data)


def test_host_bridge_and_absent_devices() -> None:
    io = PciConfigIo(PciRoot())
    assert read32(io, 0, 0) == 0x1237_8086
    assert read32(io, 0, 2) >> 24 == PciClass.BRIDGE
    assert read32(io, 5, 0) == 0xFFFF_FFFF  # empty slot
    io.write(0, cfg_addr(0, 0, bus=1))
    assert io.read(4, 4) == b"\xff" * 4  # other bus
    io.write(0, cfg_addr(0, 0, func=3))
    assert io.read(4, 4) == b"\xff" * 4  # other function
    io.write(0, (0).to_bytes(4, "little"))  # enable bit clear
    assert io.read(4, 4) == b"\xff" * 4


def test_address_register_byte_access_and_data_widths() -> None:
    io = PciConfigIo(PciRoot())
    # Linux's type-1 probe: outb(0x01, 0xCFB), then a dword address write and read-back.
    io.write(3, b"\x01")
    io.write(0, (0x8000_0000).to_bytes(4, "little"))
    assert io.read(0, 4) == (0x8000_0000).to_bytes(4, "little")
    io.write(0, cfg_addr(0, 0))
    assert io.read(4, 2) == b"\x86\x80"
    assert io.read(6, 2) == b"\x37\x12"
    assert io.read(5, 1) == b"\x80"
    assert io.read(7, 1) == b"\x12"
    assert io.read(6, 4) == b"\xff" * 4  # straddles the dword


def test_bar_sizing_and_readonly_fields() -> None:
    root = PciRoot()
    dev = CfgDevice(make_device())
    addr = root.add_device(dev)
    assert str(addr) == "00:01.0"
    io = PciConfigIo(root)
    n = addr.device
    bar0 = read32(io, n, 4)
    assert bar0 == 0xE000_0000 | 0x4  # 64-bit memory BAR
    write32(io, n, 4, 0xFFFF_FFFF)
    write32(io, n, 5, 0xFFFF_FFFF)
    low, high = read32(io, n, 4), read32(io, n, 5)
    size = ~((high << 32 | low) & ~0xF) & 0xFFFF_FFFF_FFFF_FFFF
    assert size + 1 == 0x8000 and low & 0xF == 0x4
    write32(io, n, 4, 0xE000_0000)
    write32(io, n, 5, 0)
    assert dev.config.bar_address(0) == 0xE000_0000
    write32(io, n, 6, 0xFFFF_FFFF)
    assert read32(io, n, 6) == 0xFFFF_F000 | 0x8  # 4 KiB, prefetchable, 32-bit
    write32(io, n, 9, 0xFFFF_FFFF)  # unused BAR: not writable
    assert read32(io, n, 9) == 0
    write32(io, n, 12, 0xFFFF_FFFF)  # no expansion ROM
    assert read32(io, n, 12) == 0
    write32(io, n, 0, 0x1234_5678)  # IDs are read-only
    assert read32(io, n, 0) == 0x1042_1AF4
    write32(io, n, 1, 0xFFFF_FFFF)
    assert read32(io, n, 1) & 0xFFFF == 0x0547  # only the defined command bits
    io.write(0, cfg_addr(n, 15))
    io.write(4, b"\x0b")  # interrupt line (byte write)
    assert dev.config.interrupt_line == 0x0B


def test_capability_list_walk() -> None:
    cfg = make_device()
    a = cfg.add_capability(0x09, b"\x10\x01\x00\x00" + bytes(10))  # a 16-byte virtio cap
    b = cfg.add_capability(MSIX_CAP_ID, bytes(10))
    assert (a, b) == (0x40, 0x50)
    assert cfg.capabilities() == [(0x40, 0x09), (0x50, MSIX_CAP_ID)]
    assert cfg.read_reg(1) & 0x0010_0000  # status: capability list
    assert cfg.read_reg(13) & 0xFF == 0x40


def test_bar_validation() -> None:
    cfg = make_device()
    with pytest.raises(ValueError):
        cfg.add_bar(PciBar(1, 0xE000_8000, 0x1000))  # upper half of 64-bit BAR0
    with pytest.raises(ValueError):
        cfg.add_bar(PciBar(3, 0xE000_0100, 0x1000))  # misaligned
    with pytest.raises(ValueError):
        cfg.add_bar(PciBar(3, 0xE000_0000, 0x1800))  # not a power of two


def test_msix_routes_masking_and_pba() -> None:
    router = FakeIrqRouter()
    msix = MsixConfig(3, router)
    entry = struct.Struct("<IIII")
    # Program vector 1 while disabled: no routes yet.
    msix.write_table(16, entry.pack(0xFEE0_0000, 0, 0x41, 1)[:8])
    msix.write_table(24, entry.pack(0, 0, 0x41, 1)[8:])
    assert router.routes == {}
    assert not msix.trigger(1)  # MSI-X disabled: nothing delivered
    msix.write_message_control(0x8000)  # enable
    assert len(router.irqfds) == 3
    gsi1 = sorted(router.irqfds)[1]
    assert router.routes[gsi1] == (0xFEE0_0000, 0x41)
    # Vector 1 is masked (reset state): triggering sets the PBA bit only.
    evt1 = router.irqfds[gsi1]
    assert isinstance(evt1, EventFd)
    assert msix.trigger(1)
    assert msix.is_pending(1)
    assert int.from_bytes(msix.read_pba(0, 8), "little") == 0b010
    assert evt1.read_timeout(0) is None
    # Unmask: the pending interrupt is delivered and the PBA bit cleared.
    msix.write_table(28, (0).to_bytes(4, "little"))
    assert not msix.is_pending(1)
    assert evt1.read_timeout(0) == 1
    # Reprogramming the address/data updates the route.
    msix.write_table(16, (0xFEE0_1000).to_bytes(4, "little"))
    assert router.routes[gsi1] == (0xFEE0_1000, 0x41)
    # Function mask: pending, then delivered on clear.
    msix.write_message_control(0xC000)
    assert msix.trigger(1) and msix.is_pending(1)
    msix.write_message_control(0x8000)
    assert evt1.read_timeout(0) == 1
    # Out-of-range / oddly sized accesses are ignored.
    assert not msix.trigger(7)
    msix.write_table(3 * 16, b"\x00" * 4)
    msix.write_table(1, b"\x00\x00")
    assert msix.read_table(0, 2) == b"\x00\x00"
    msix.close()
    msix.close()
    assert sorted(router.released) == [24, 25, 26]
    assert router.irqfds == {}
