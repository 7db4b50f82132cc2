"""In-memory forms of qcow2 tables: L2 tables, refcount blocks, and the LRU cache holding them.

Tables are decoded once into native-endian ``array`` objects (one ``byteswap`` per table load),
so the per-cluster work on the I/O path is a list-like index, not a ``struct`` call.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

_LITTLE = sys.byteorder == "little"

# L1/L2 entry bits (spec "Cluster mapping").
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_RESERVED = 0x3F00_0000_0000_01FE


def decode_u64_table(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian on-disk table -> native array of unsigned 64-bit entries."""
    table = array("Q")
    table.frombytes(data)
    if _LITTLE:
        table.byteswap()
    return table


def encode_u64_table(table: array[int]) -> bytes:
    """Native array -> big-endian bytes (the array itself is left untouched)."""
    if not _LITTLE:
        return table.tobytes()
    out = array("Q", table)
    out.byteswap()
    return out.tobytes()


_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def _has_zero_table(order: int) -> bytes:
    """byte -> 1 if one of its packed (1 << order)-bit entries is zero, else 0."""
    bits = 1 << order
    mask = (1 << bits) - 1
    return bytes(
        int(any((b >> shift) & mask == 0 for shift in range(0, 8, bits))) for b in range(256)
    )


_HAS_ZERO = {order: _has_zero_table(order) for order in (0, 1, 2)}


class RefBlock:
    """One refcount block: ``cluster_size * 8 / refcount_bits`` entries of ``1 << order`` bits.

    Widths of 8 bits and more live in a native array; 1, 2 and 4-bit entries stay packed in a
    bytearray (bit 0 is the least significant bit, as the spec says for sub-byte widths).
    """

    __slots__ = ("_bits", "_mask", "_packed", "_wide", "entries", "order")

    def __init__(self, order: int, data: bytes | bytearray) -> None:
        self.order = order
        self.entries = len(data) * 8 >> order
        self._bits = 1 << order
        self._mask = (1 << self._bits) - 1
        self._wide: array[int] | None = None
        self._packed = bytearray()
        if order >= 3:
            wide = array(_TYPECODES[order])
            wide.frombytes(data)
            if _LITTLE and order > 3:
                wide.byteswap()
            self._wide = wide
        else:
            self._packed = bytearray(data)

    @property
    def max_value(self) -> int:
        return self._mask

    def get(self, index: int) -> int:
        wide = self._wide
        if wide is not None:
            return wide[index]
        bit = index << self.order
        return (self._packed[bit >> 3] >> (bit & 7)) & self._mask

    def set(self, index: int, value: int) -> None:
        wide = self._wide
        if wide is not None:
            wide[index] = value
            return
        bit = index << self.order
        shift = bit & 7
        byte = self._packed[bit >> 3]
        self._packed[bit >> 3] = (byte & ~(self._mask << shift) & 0xFF) | (value << shift)

    def find_zero(self, start: int) -> int:
        """Index of the first zero entry at or after ``start``, or -1."""
        wide = self._wide
        if wide is not None:
            try:
                return wide.index(0, start)
            except ValueError:
                return -1
        # sub-byte widths: finish the first byte by hand, then let bytes.translate/find (C
        # speed) skip every byte whose entries are all in use
        per_byte = 8 >> self.order
        first_full = -(-start // per_byte) * per_byte
        for i in range(start, min(first_full, self.entries)):
            if self.get(i) == 0:
                return i
        pos = self._packed.translate(_HAS_ZERO[self.order]).find(1, first_full // per_byte)
        if pos < 0:
            return -1
        for i in range(pos * per_byte, pos * per_byte + per_byte):
            if self.get(i) == 0:
                return i
        raise AssertionError("unreachable: the byte has a zero entry")

    def to_bytes(self) -> bytes:
        wide = self._wide
        if wide is None:
            return bytes(self._packed)
        if _LITTLE and self.order > 3:
            out = array(wide.typecode, wide)
            out.byteswap()
            return out.tobytes()
        return wide.tobytes()

    def nonzero(self) -> Iterator[tuple[int, int]]:
        """(index, refcount) for every nonzero entry."""
        for i in range(self.entries):
            value = self.get(i)
            if value:
                yield i, value


K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small LRU map with a dirty set; the owner decides how dirty entries are written back.

    ``victim()`` names the entry that would be evicted next so the owner can write it (and
    whatever must precede it on disk) before calling ``pop``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[K, V] = OrderedDict()
        self.dirty: set[K] = set()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def victim(self) -> K:
        return next(iter(self._items))

    def pop(self, key: K) -> V | None:
        self.dirty.discard(key)
        return self._items.pop(key, None)

    def items(self) -> list[tuple[K, V]]:
        return list(self._items.items())

    def clear(self) -> None:
        self._items.clear()
        self.dirty.clear()
