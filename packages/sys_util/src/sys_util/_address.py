"""Guest physical addresses."""

from __future__ import annotations

from typing import Self

from sys_util.errors import GuestMemoryError, InvalidArgument

__all__ = ["GuestAddress"]

_U64_END = 1 << 64


class GuestAddress(int):
    """A guest physical address: a plain ``int`` in [0, 2**64), with checked arithmetic.

    It subclasses ``int`` so hot paths can pass plain ints everywhere a GuestAddress is expected
    (GuestMemory accepts either); the class exists for the checked helpers and a readable repr.
    Ordinary arithmetic returns plain ints.
    """

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Self:
        if not 0 <= value < _U64_END:
            raise InvalidArgument(f"guest address {value:#x} is outside [0, 2**64)")
        return super().__new__(cls, value)

    def checked_add(self, n: int) -> GuestAddress:
        """Return ``self + n``; raise GuestMemoryError if it leaves [0, 2**64)."""
        value = int(self) + n
        if not 0 <= value < _U64_END:
            raise GuestMemoryError(int(self), n, "overflowing the 64-bit address space")
        return GuestAddress(value)

    def checked_sub(self, n: int) -> GuestAddress:
        """Return ``self - n``; raise GuestMemoryError if it leaves [0, 2**64)."""
        return self.checked_add(-n)

    def offset_from(self, base: int) -> int:
        """Return ``self - base`` (a byte count); raise InvalidArgument if base is above self."""
        if base > self:
            raise InvalidArgument(f"{base:#x} is above guest address {int(self):#x}")
        return int(self) - base

    def align_up(self, alignment: int) -> GuestAddress:
        """Round up to a multiple of ``alignment`` (a power of two); raise on overflow."""
        if alignment <= 0 or alignment & (alignment - 1):
            raise InvalidArgument(f"alignment {alignment:#x} is not a power of two")
        value = (int(self) + alignment - 1) & ~(alignment - 1)
        if value >= _U64_END:
            raise GuestMemoryError(int(self), alignment, "overflowing the 64-bit address space")
        return GuestAddress(value)

    def align_down(self, alignment: int) -> GuestAddress:
        """Round down to a multiple of ``alignment`` (a power of two)."""
        if alignment <= 0 or alignment & (alignment - 1):
            raise InvalidArgument(f"alignment {alignment:#x} is not a power of two")
        return GuestAddress(int(self) & ~(alignment - 1))

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"
