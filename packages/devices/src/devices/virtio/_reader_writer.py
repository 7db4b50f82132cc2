"""Zero-copy access to one direction of a descriptor chain (crosvm's descriptor_utils).

A :class:`Reader` walks the device-readable segments, a :class:`Writer` the device-writable ones.
Both hand out ``memoryview`` iovecs straight into guest RAM so block I/O can ``os.preadv`` /
``os.pwritev`` without an intermediate copy. The segments were bounds-checked when the chain
was parsed, and the views are slices of the regions' own memoryviews, which cannot reach past
the mapping.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from devices.virtio._errors import ChainTooShort

if TYPE_CHECKING:
    from devices.virtio._queue import RamMap

__all__ = ["Reader", "Writer"]


class _Cursor:
    __slots__ = ("_idx", "_off", "_ram", "_remaining", "_segs", "done")

    def __init__(self, ram: RamMap, segments: list[tuple[int, int]], total: int | None) -> None:
        self._ram = ram
        self._segs = segments
        self._idx = 0
        self._off = 0
        self._remaining = sum(length for _, length in segments) if total is None else total
        self.done = 0

    def available_bytes(self) -> int:
        return self._remaining

    def take_iovecs(self, n: int) -> list[memoryview]:
        """Consume exactly ``n`` bytes and return views covering them."""
        if n > self._remaining:
            raise ChainTooShort(n, self._remaining)
        out: list[memoryview] = []
        segs = self._segs
        iovecs = self._ram.views
        while n:
            addr, length = segs[self._idx]
            left = length - self._off
            if left == 0:
                self._idx += 1
                self._off = 0
                continue
            step = left if left < n else n
            out.extend(iovecs(addr + self._off, step))
            self._off += step
            n -= step
            self._remaining -= step
            self.done += step
        return out

    def split_at(self, offset: int) -> list[tuple[int, int]]:
        """Truncate to ``offset`` more bytes; return the tail's segments."""
        if offset > self._remaining:
            raise ChainTooShort(offset, self._remaining)
        tail: list[tuple[int, int]] = []
        keep: list[tuple[int, int]] = []
        need = offset
        first = True
        for addr, length in self._segs[self._idx :]:
            if first:
                addr, length = addr + self._off, length - self._off
                first = False
            if need >= length:
                keep.append((addr, length))
                need -= length
            elif need > 0:
                keep.append((addr, need))
                tail.append((addr + need, length - need))
                need = 0
            elif length:
                tail.append((addr, length))
        self._segs = keep
        self._idx = 0
        self._off = 0
        self._remaining = offset
        return tail


class Reader:
    """Reads the device-readable part of a chain, front to back."""

    __slots__ = ("_cur",)

    def __init__(
        self, ram: RamMap, segments: list[tuple[int, int]], total: int | None = None
    ) -> None:
        self._cur = _Cursor(ram, segments, total)

    def available_bytes(self) -> int:
        """Bytes left to read."""
        return self._cur.available_bytes()

    @property
    def bytes_read(self) -> int:
        return self._cur.done

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes (copied); :class:`ChainTooShort` if fewer remain."""
        views = self._cur.take_iovecs(n)
        if len(views) == 1:
            return bytes(views[0])
        return b"".join(views)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes."""
        return self.read_exact(min(n, self._cur.available_bytes()))

    def read_struct(self, st: struct.Struct) -> tuple[object, ...]:
        """Unpack one ``st`` from the next ``st.size`` bytes."""
        return st.unpack(self.read_exact(st.size))

    def get_iovecs(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes and return zero-copy views of them (for ``os.pwritev``)."""
        return self._cur.take_iovecs(n)

    def consume(self, n: int) -> None:
        self._cur.take_iovecs(min(n, self._cur.available_bytes()))

    def split_at(self, offset: int) -> Reader:
        """Keep the next ``offset`` bytes in this reader; return a reader of the rest."""
        tail = self._cur.split_at(offset)
        return Reader(self._cur._ram, tail)


class Writer:
    """Writes the device-writable part of a chain, front to back."""

    __slots__ = ("_cur",)

    def __init__(
        self, ram: RamMap, segments: list[tuple[int, int]], total: int | None = None
    ) -> None:
        self._cur = _Cursor(ram, segments, total)

    def available_bytes(self) -> int:
        """Bytes of room left."""
        return self._cur.available_bytes()

    @property
    def bytes_written(self) -> int:
        return self._cur.done

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; :class:`ChainTooShort` (nothing written) if it does not fit."""
        src = memoryview(data).cast("B")
        views = self._cur.take_iovecs(len(src))
        pos = 0
        for view in views:
            n = len(view)
            view[:] = src[pos : pos + n]
            pos += n

    def write_struct(self, st: struct.Struct, *values: object) -> None:
        self.write(st.pack(*values))

    def get_iovecs(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes of room and return zero-copy views of it (for ``os.preadv``)."""
        return self._cur.take_iovecs(n)

    def split_at(self, offset: int) -> Writer:
        """Keep the next ``offset`` bytes in this writer; return a writer of the rest."""
        tail = self._cur.split_at(offset)
        return Writer(self._cur._ram, tail)
