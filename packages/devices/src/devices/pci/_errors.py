"""PCI errors (the lead merges these into :mod:`devices.errors`)."""

from __future__ import annotations

from devices.errors import Error


class PciError(Error):
    """Base class of PCI errors."""


class BarAllocationError(PciError):
    """The allocator could not place a BAR (or returned a misaligned address)."""

    def __init__(self, bar: int, size: int, reason: str) -> None:
        super().__init__(f"cannot allocate BAR{bar} of {size:#x} bytes: {reason}")
        self.bar = bar
        self.size = size
        self.reason = reason

    def __reduce__(self) -> tuple[type[BarAllocationError], tuple[int, int, str]]:
        return (type(self), (self.bar, self.size, self.reason))


class PciSlotsExhausted(PciError):
    """All 32 device numbers on bus 0 are taken."""

    def __init__(self, label: str) -> None:
        super().__init__(f"no free PCI device slot on bus 0 for {label}")
        self.label = label

    def __reduce__(self) -> tuple[type[PciSlotsExhausted], tuple[str]]:
        return (type(self), (self.label,))


class CapabilitySpaceFull(PciError):
    """The 256-byte configuration space has no room for another capability."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"no room for a {needed}-byte capability in PCI configuration space")
        self.needed = needed

    def __reduce__(self) -> tuple[type[CapabilitySpaceFull], tuple[int]]:
        return (type(self), (self.needed,))
