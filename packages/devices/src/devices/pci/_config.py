"""A type-0 PCI configuration space: 64 dwords with per-bit write masks, BARs, capabilities.

Every guest write goes through a write mask, so read-only fields (IDs, class, capability bytes)
cannot be changed, and BAR sizing works the standard way: the guest writes all ones and reads
back ``~(size - 1)`` plus the read-only type bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from devices.pci._errors import CapabilitySpaceFull

__all__ = [
    "NUM_BARS",
    "BarType",
    "PciBar",
    "PciClass",
    "PciConfiguration",
]

NUM_CONFIG_REGS = 64
NUM_BARS = 6
BAR0_REG = 4
ROM_REG = 12
CAP_PTR_REG = 13
INTERRUPT_REG = 15
CAP_START = 0x40
STATUS_CAP_LIST = 0x0010_0000  # status register bit 4, seen in dword 1
COMMAND_WRITABLE = 0x0000_0547  # I/O, memory, bus master, parity err, SERR, INTx disable
_U32 = struct.Struct("<I")


class PciClass(IntEnum):
    """Class codes (upper byte of the 24-bit class) we use."""

    MASS_STORAGE = 0x01
    NETWORK = 0x02
    BRIDGE = 0x06
    COMMUNICATION = 0x07
    OTHER = 0xFF


class BarType(IntEnum):
    """Memory BAR kinds (low bits of the BAR register)."""

    MEM32 = 0x0
    MEM64 = 0x4


@dataclass(frozen=True, slots=True)
class PciBar:
    """A memory BAR: its index, guest-physical address and power-of-two size."""

    index: int
    address: int
    size: int
    bar_type: BarType = BarType.MEM32
    prefetchable: bool = False


class PciConfiguration:
    """The 256 bytes a device exposes through configuration cycles.

    Not thread-safe by itself; the owner (``PciRoot``) serialises config cycles.
    """

    __slots__ = ("_bars", "_last_cap", "_next_cap", "_regs", "_writable")

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        subclass: int,
        prog_if: int = 0,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        header_type: int = 0,
    ) -> None:
        self._regs = [0] * NUM_CONFIG_REGS
        self._writable = [0] * NUM_CONFIG_REGS
        self._regs[0] = (device_id & 0xFFFF) << 16 | (vendor_id & 0xFFFF)
        self._regs[1] = 0  # command 0, status 0 (bit 4 set when a capability is added)
        self._writable[1] = COMMAND_WRITABLE
        self._regs[2] = (
            (class_code & 0xFF) << 24
            | (subclass & 0xFF) << 16
            | (prog_if & 0xFF) << 8
            | (revision & 0xFF)
        )
        self._regs[3] = (header_type & 0xFF) << 16
        self._writable[3] = 0x0000_00FF  # cache line size is scratch space for the OS
        self._regs[11] = (subsystem_id & 0xFFFF) << 16 | (subsystem_vendor_id & 0xFFFF)
        self._writable[INTERRUPT_REG] = 0x0000_00FF  # interrupt line is written by the OS
        self._bars: dict[int, PciBar] = {}
        self._next_cap = CAP_START
        self._last_cap = 0

    # -- raw access ------------------------------------------------------------------------

    def read_reg(self, reg_idx: int) -> int:
        """Return dword ``reg_idx`` (out-of-range indexes read as 0xffffffff)."""
        if not 0 <= reg_idx < NUM_CONFIG_REGS:
            return 0xFFFF_FFFF
        return self._regs[reg_idx]

    def write_reg(self, reg_idx: int, offset: int, data: bytes) -> None:
        """Apply a 1/2/4-byte guest write at byte ``offset`` of dword ``reg_idx``.

        Accesses that straddle a dword or have an odd width are ignored, as hardware would.
        """
        size = len(data)
        if not 0 <= reg_idx < NUM_CONFIG_REGS or size not in (1, 2, 4) or offset + size > 4:
            return
        shift = offset * 8
        mask = ((1 << (size * 8)) - 1) << shift
        value = int.from_bytes(data, "little") << shift
        writable = self._writable[reg_idx] & mask
        self._regs[reg_idx] = (self._regs[reg_idx] & ~writable) | (value & writable)

    def set_reg(self, reg_idx: int, value: int, writable_mask: int = 0) -> None:
        """Device-side: set a dword and its write mask (used by capabilities with RW bits)."""
        self._regs[reg_idx] = value & 0xFFFF_FFFF
        self._writable[reg_idx] = writable_mask & 0xFFFF_FFFF

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Device-side: read ``length`` bytes of the space starting at ``offset``."""
        raw = b"".join(_U32.pack(r) for r in self._regs)
        return raw[offset : offset + length]

    # -- fields ----------------------------------------------------------------------------

    @property
    def vendor_id(self) -> int:
        return self._regs[0] & 0xFFFF

    @property
    def device_id(self) -> int:
        return self._regs[0] >> 16

    @property
    def command(self) -> int:
        return self._regs[1] & 0xFFFF

    @property
    def memory_enabled(self) -> bool:
        return bool(self._regs[1] & 0x2)

    @property
    def interrupt_line(self) -> int:
        return self._regs[INTERRUPT_REG] & 0xFF

    def set_irq(self, line: int, pin: int) -> None:
        """Record the legacy interrupt line and pin (1 = INTA# .. 4 = INTD#)."""
        self._regs[INTERRUPT_REG] = (self._regs[INTERRUPT_REG] & 0xFFFF_0000) | (
            (pin & 0xFF) << 8 | (line & 0xFF)
        )

    # -- BARs ------------------------------------------------------------------------------

    def add_bar(self, bar: PciBar) -> None:
        """Install a memory BAR; ``size`` must be a power of two of at least 16 bytes."""
        size = bar.size
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} is not a power of two >= 16")
        if bar.address & (size - 1):
            raise ValueError(f"BAR address {bar.address:#x} is not aligned to its size")
        last = bar.index + (1 if bar.bar_type == BarType.MEM64 else 0)
        if not bar.index >= 0 or last >= NUM_BARS:
            raise ValueError(f"BAR index {bar.index} out of range")
        if bar.bar_type == BarType.MEM32 and bar.address + size > 1 << 32:
            raise ValueError("32-bit BAR above 4 GiB")
        for idx in range(bar.index, last + 1):
            if idx in self._bars or any(
                b.bar_type == BarType.MEM64 and b.index + 1 == idx for b in self._bars.values()
            ):
                raise ValueError(f"BAR {idx} already in use")
        low_bits = int(bar.bar_type) | (0x8 if bar.prefetchable else 0)
        mask = ~(size - 1) & 0xFFFF_FFFF_FFFF_FFFF
        reg = BAR0_REG + bar.index
        self._regs[reg] = (bar.address & 0xFFFF_FFF0) | low_bits
        self._writable[reg] = mask & 0xFFFF_FFF0
        if bar.bar_type == BarType.MEM64:
            self._regs[reg + 1] = bar.address >> 32
            self._writable[reg + 1] = mask >> 32
        self._bars[bar.index] = bar

    @property
    def bars(self) -> list[PciBar]:
        return [self._bars[i] for i in sorted(self._bars)]

    def bar_address(self, index: int) -> int:
        """The address the guest currently has programmed into BAR ``index``."""
        bar = self._bars[index]
        reg = BAR0_REG + index
        addr = self._regs[reg] & 0xFFFF_FFF0
        if bar.bar_type == BarType.MEM64:
            addr |= self._regs[reg + 1] << 32
        return addr

    # -- capabilities ----------------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes) -> int:
        """Append a capability (``body`` excludes the 2-byte id/next header); return its offset.

        The capability is read-only to the guest; call :meth:`set_reg` afterwards to open bits
        (MSI-X message control).
        """
        total = 2 + len(body)
        start = (self._next_cap + 3) & ~3
        if start + total > NUM_CONFIG_REGS * 4:
            raise CapabilitySpaceFull(total)
        raw = bytearray(self.read_bytes(0, NUM_CONFIG_REGS * 4))
        raw[start] = cap_id & 0xFF
        raw[start + 1] = 0
        raw[start + 2 : start + total] = body
        if self._last_cap:
            raw[self._last_cap + 1] = start
        else:
            raw[CAP_PTR_REG * 4] = start
        for i in range(NUM_CONFIG_REGS):
            self._regs[i] = _U32.unpack_from(raw, i * 4)[0]
        self._regs[1] |= STATUS_CAP_LIST
        self._last_cap = start
        self._next_cap = start + total
        return start

    def capabilities(self) -> list[tuple[int, int]]:
        """Walk the capability list as a driver would: ``[(offset, cap_id), ...]``."""
        raw = self.read_bytes(0, NUM_CONFIG_REGS * 4)
        out: list[tuple[int, int]] = []
        ptr = raw[CAP_PTR_REG * 4] & 0xFC
        seen: set[int] = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            out.append((ptr, raw[ptr]))
            ptr = raw[ptr + 1] & 0xFC
        return out
