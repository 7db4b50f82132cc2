"""Guest RAM: regions of one memfd, mapped shared, with checked translation.

Layout: the regions (sorted by guest address) are laid end to end in one :class:`SharedMemory`
(region *i* starts at file offset ``sum(sizes[:i])``), and the whole file is mapped once,
``MAP_SHARED``. So a forked device process sees the very same pages, and region *i* lives at host
address ``mapping_base + file_offset``.

Every access translates ``(addr, length)`` to an offset in that one mapping, refusing anything that
is not entirely inside one region (or, for ``iovecs``/``read``/``write``, inside adjacent regions).
The translation is the hot path of every virtqueue operation, so it is written to be cheap: the
common single-region case is two integer comparisons, the general case one ``bisect``.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, Self

from sys_util._address import GuestAddress
from sys_util._mmap import BytesLike, MemoryMapping, pagesize
from sys_util._shm import Seals, SharedMemory
from sys_util.errors import GuestMemoryError, InvalidArgument

__all__ = ["SHMEM_THP_SETTING", "GuestMemory", "MemoryRegion", "shmem_hugepages_enabled"]

_U64_END = 1 << 64
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One contiguous range of guest RAM and where it lives on the host."""

    guest_base: GuestAddress
    size: int
    file_offset: int
    host_address: int

    def end_addr(self) -> int:
        """The first guest address after this region."""
        return int(self.guest_base) + self.size

    def contains(self, addr: int) -> bool:
        return self.guest_base <= addr < self.guest_base + self.size


class GuestMemory:
    """The guest's physical RAM.

    Args:
        regions: ``(guest_base, size)`` pairs; page aligned, non-empty, non-overlapping.
        name: the memfd name (visible in /proc/PID/maps and fd listings).
        memfd: adopt this sealed memfd instead of creating one (see :meth:`from_shared_memory`).
        hugepages: ask for transparent huge pages (``MADV_HUGEPAGE``); they back the memory only
            if the host allows THP for shared memory (see :func:`shmem_hugepages_enabled`).

    Addresses may be plain ints or :class:`GuestAddress`. Every access raises
    :class:`~sys_util.errors.GuestMemoryError` unless it lies entirely in guest RAM; ``view``,
    the scalar and the struct accessors further require a single region, while ``read``,
    ``write`` and ``iovecs`` may span regions that are adjacent in guest address space.
    """

    __slots__ = (
        "_base0",
        "_bases",
        "_closed",
        "_deltas",
        "_ends",
        "_hi_base",
        "_hi_foff",
        "_hi_lim2",
        "_hi_lim4",
        "_hi_lim8",
        "_hi_size",
        "_lim2",
        "_lim4",
        "_lim8",
        "_mapping",
        "_memfd",
        "_mm",
        "_mv",
        "_mv16",
        "_mv32",
        "_mv64",
        "_regions",
        "_size",
        "_size0",
    )

    def __init__(
        self,
        regions: Sequence[tuple[int, int]],
        *,
        name: str = "crosvm_guest",
        memfd: SharedMemory | None = None,
        hugepages: bool = False,
    ) -> None:
        layout = _validate(regions)
        total = sum(size for _, size in layout)
        created = memfd is None
        if memfd is None:
            memfd = SharedMemory(name, total)
            try:
                # The size can never change again: no process holding this fd can truncate it
                # under our mapping (which would turn guest accesses into SIGBUS in the VMM).
                memfd.add_seals(Seals.SHRINK | Seals.GROW)
            except BaseException:
                memfd.close()
                raise
        else:
            _check_adopted(memfd, total)
        try:
            mapping = MemoryMapping.from_shared_memory(memfd, total)
        except BaseException:
            if created:
                memfd.close()
            raise
        self._memfd = memfd
        self._mapping = mapping
        self._mm: mmap.mmap = mapping.mmap
        if hugepages:
            # Transparent huge pages for the shared mapping (and, inherited, for the device
            # processes' mappings): fewer TLB misses and far cheaper pinning and copying of
            # large guest buffers. Effective only where the host lets shmem use THP.
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        self._mv: memoryview = mapping.view()
        # Scalar stores go through casts of the mapping: one aligned store each. struct.pack_into
        # zeroes its destination first, so a vCPU reading concurrently could see a transient 0.
        self._mv16 = self._mv.cast("H")
        self._mv32 = self._mv.cast("I")
        self._mv64 = self._mv.cast("Q")
        self._size = total
        self._closed = False
        host = mapping.host_address
        built: list[MemoryRegion] = []
        offset = 0
        for base, size in layout:
            built.append(MemoryRegion(GuestAddress(base), size, offset, host + offset))
            offset += size
        self._regions = tuple(built)
        self._bases = [r.guest_base for r in built]
        self._ends = [r.end_addr() for r in built]
        # mapping offset = guest address + delta
        self._deltas = [r.file_offset - r.guest_base for r in built]
        # Fast path for the first region (file offset 0, so mapping offset = addr - base0), valid
        # when 0 <= addr - base0 <= size0 - n. It is the whole of RAM for a guest below the PCI
        # hole; accesses above the hole take the bisect path. size0 = -1 disables it (closed).
        self._base0 = built[0].guest_base
        self._size0 = built[0].size
        # Second-chance fast path: the last region (RAM above the PCI hole on x86).
        self._hi_base = built[-1].guest_base
        self._hi_size = built[-1].size
        self._hi_foff = built[-1].file_offset
        self._set_limits()

    def _set_limits(self) -> None:
        # Highest fast-path offset for 2, 4 and 8 byte scalars (negative: fast path disabled).
        size0 = self._size0
        self._lim2 = size0 - 2 if size0 >= 2 else -1
        self._lim4 = size0 - 4 if size0 >= 4 else -1
        self._lim8 = size0 - 8 if size0 >= 8 else -1
        hi = self._hi_size
        self._hi_lim2 = hi - 2 if hi >= 2 else -1
        self._hi_lim4 = hi - 4 if hi >= 4 else -1
        self._hi_lim8 = hi - 8 if hi >= 8 else -1

    @classmethod
    def from_shared_memory(
        cls, memfd: SharedMemory, regions: Sequence[tuple[int, int]]
    ) -> GuestMemory:
        """Map guest RAM that another process created (the memfd arrived over a socket).

        Takes ownership of ``memfd``. It must be sealed against shrinking and growing (as every
        GuestMemory memfd is) and exactly as large as the regions, else InvalidArgument is
        raised (and ``memfd`` is left open for the caller).
        """
        return cls(regions, memfd=memfd)

    # -- layout ---------------------------------------------------------------------------------

    @property
    def regions(self) -> list[MemoryRegion]:
        """The regions, sorted by guest address."""
        return list(self._regions)

    @property
    def memfd(self) -> SharedMemory:
        """The memfd backing all regions (pass it to forked device processes)."""
        return self._memfd

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def keep_fds(self) -> list[int]:
        """Every fd of this process that refers to the guest RAM file.

        That is the memfd and the private duplicate CPython 3.11's ``mmap`` keeps (and closes in
        ``close()``). A jail that closes all other fds must keep these, or a later ``close()``
        could close an unrelated file that reused the number.
        """
        st = os.fstat(self._memfd.fileno())
        fds = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                other = os.fstat(fd)
            except OSError:
                continue  # the fd of the listing itself, closed by now
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                fds.append(fd)
        return sorted(fds)

    def host_regions(self) -> list[tuple[int, int, int]]:
        """``(guest_base, size, host_address)`` per region: a memory table for the kernel.

        ``host_address`` is where this process maps the region (the mapping is inherited by a
        forked device process at the same address), which is what ``KVM_SET_USER_MEMORY_REGION``
        and vhost's ``VHOST_SET_MEM_TABLE`` need. Raises ``OSError(EBADF)`` once closed.
        """
        if self._closed:
            raise OSError(errno.EBADF, "GuestMemory is closed")
        return [(int(r.guest_base), r.size, r.host_address) for r in self._regions]

    def end_addr(self) -> GuestAddress:
        """The first guest address after the highest region."""
        return GuestAddress(self._ends[-1])

    def address_in_range(self, addr: int) -> bool:
        """True if ``addr`` is inside some region."""
        i = bisect_right(self._bases, addr) - 1
        return i >= 0 and addr < self._ends[i]

    def checked_range(self, addr: int, length: int) -> bool:
        """True if ``[addr, addr+length)`` is inside guest RAM (regions may be adjacent)."""
        try:
            self._segments(addr, length)
        except GuestMemoryError:
            return False
        return True

    def find_region(self, addr: int) -> MemoryRegion:
        """The region that holds ``addr`` (GuestMemoryError if none does)."""
        i = bisect_right(self._bases, addr) - 1
        if i < 0 or addr >= self._ends[i]:
            self._fail(addr, 1)
        return self._regions[i]

    # -- translation ----------------------------------------------------------------------------

    def _fail(self, addr: int, length: int) -> NoReturn:
        if self._closed:
            raise OSError(errno.EBADF, "GuestMemory is closed")
        if isinstance(addr, int) and isinstance(length, int) and length < 0:
            raise GuestMemoryError(addr, length, "a negative length")
        if isinstance(addr, int) and isinstance(length, int) and addr + length > _U64_END:
            raise GuestMemoryError(addr, length, "overflowing the 64-bit address space")
        raise GuestMemoryError(addr, length)

    def _offset(self, addr: int, length: int) -> int:
        """Mapping offset of ``[addr, addr+length)``, which must lie in one region."""
        off = addr - self._hi_base
        if 0 <= off <= self._hi_size - length and length >= 0:
            return off + self._hi_foff
        i = bisect_right(self._bases, addr) - 1
        if i >= 0 and length >= 0 and addr + length <= self._ends[i]:
            return addr + self._deltas[i]
        self._fail(addr, length)

    def _segments(self, addr: int, length: int) -> list[tuple[int, int]]:
        """``(mapping offset, length)`` pieces of a range that may span adjacent regions."""
        if length < 0:
            self._fail(addr, length)
        i = bisect_right(self._bases, addr) - 1
        if i < 0 or addr >= self._ends[i]:
            if length == 0 and i >= 0 and addr == self._ends[i]:
                return []
            self._fail(addr, length)
        if addr + length <= self._ends[i]:
            return [(addr + self._deltas[i], length)]
        pieces: list[tuple[int, int]] = []
        cur, left = addr, length
        while True:
            take = min(left, self._ends[i] - cur)
            pieces.append((cur + self._deltas[i], take))
            left -= take
            if not left:
                return pieces
            cur += take
            i += 1
            if i == len(self._bases) or self._bases[i] != cur:
                self._fail(addr, length)

    # -- zero-copy access ----------------------------------------------------------------------

    def view(self, addr: int, length: int) -> memoryview:
        """A writable zero-copy memoryview of ``[addr, addr+length)`` (must be in one region)."""
        off = addr - self._base0
        if not (0 <= off <= self._size0 - length and length >= 0):
            off = self._offset(addr, length)
        return self._mv[off : off + length]

    def iovecs(self, addr: int, length: int) -> list[memoryview]:
        """Zero-copy memoryviews covering ``[addr, addr+length)``, one per region touched.

        Pass them straight to ``os.preadv``/``os.pwritev``.
        """
        off = addr - self._base0
        if 0 <= off <= self._size0 - length and length >= 0:
            return [self._mv[off : off + length]]
        mv = self._mv
        pieces = self._segments(addr, length)
        if len(pieces) == 1:
            o, n = pieces[0]
            return [mv[o : o + n]]
        return [mv[o : o + n] for o, n in pieces]

    # -- copies ---------------------------------------------------------------------------------

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory."""
        off = addr - self._base0
        if 0 <= off <= self._size0 - length and length >= 0:
            return self._mm[off : off + length]
        pieces = self._segments(addr, length)
        if len(pieces) == 1:
            o, n = pieces[0]
            return self._mm[o : o + n]
        return b"".join([self._mm[o : o + n] for o, n in pieces])

    def write(self, addr: int, data: BytesLike) -> None:
        """Copy ``data`` into guest memory at ``addr``."""
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        length = len(data)
        off = addr - self._base0
        if 0 <= off <= self._size0 - length:
            self._mv[off : off + length] = data
            return
        pos = 0
        mv = self._mv
        for o, n in self._segments(addr, length):
            mv[o : o + n] = data[pos : pos + n]
            pos += n

    def read_u8(self, addr: int) -> int:
        off = addr - self._base0
        if not 0 <= off < self._size0:
            off = self._offset(addr, 1)
        return self._mm[off]

    def read_u16(self, addr: int) -> int:
        off = addr - self._base0
        if not 0 <= off <= self._lim2:
            off = addr - self._hi_base
            if 0 <= off <= self._hi_lim2:
                off += self._hi_foff
            else:
                off = self._offset(addr, 2)
        return _U16.unpack_from(self._mm, off)[0]  # type: ignore[no-any-return]

    def read_u32(self, addr: int) -> int:
        off = addr - self._base0
        if not 0 <= off <= self._lim4:
            off = addr - self._hi_base
            if 0 <= off <= self._hi_lim4:
                off += self._hi_foff
            else:
                off = self._offset(addr, 4)
        return _U32.unpack_from(self._mm, off)[0]  # type: ignore[no-any-return]

    def read_u64(self, addr: int) -> int:
        off = addr - self._base0
        if not 0 <= off <= self._lim8:
            off = addr - self._hi_base
            if 0 <= off <= self._hi_lim8:
                off += self._hi_foff
            else:
                off = self._offset(addr, 8)
        return _U64.unpack_from(self._mm, off)[0]  # type: ignore[no-any-return]

    def write_u8(self, addr: int, value: int) -> None:
        off = addr - self._base0
        if not 0 <= off < self._size0:
            off = self._offset(addr, 1)
        self._mm[off] = value

    def write_u16(self, addr: int, value: int) -> None:
        off = addr - self._base0
        if not 0 <= off <= self._lim2:
            off = addr - self._hi_base
            if 0 <= off <= self._hi_lim2:
                off += self._hi_foff
            else:
                off = self._offset(addr, 2)
        if off & 1:
            self._mm[off : off + 2] = value.to_bytes(2, "little")
        else:
            self._mv16[off >> 1] = value

    def write_u32(self, addr: int, value: int) -> None:
        off = addr - self._base0
        if not 0 <= off <= self._lim4:
            off = addr - self._hi_base
            if 0 <= off <= self._hi_lim4:
                off += self._hi_foff
            else:
                off = self._offset(addr, 4)
        if off & 3:
            self._mm[off : off + 4] = value.to_bytes(4, "little")
        else:
            self._mv32[off >> 2] = value

    def write_u64(self, addr: int, value: int) -> None:
        off = addr - self._base0
        if not 0 <= off <= self._lim8:
            off = addr - self._hi_base
            if 0 <= off <= self._hi_lim8:
                off += self._hi_foff
            else:
                off = self._offset(addr, 8)
        if off & 7:
            self._mm[off : off + 8] = value.to_bytes(8, "little")
        else:
            self._mv64[off >> 3] = value

    def read_struct(self, addr: int, st: struct.Struct) -> tuple[Any, ...]:
        """Unpack one ``st`` (which must fit in one region) from ``addr``."""
        off = addr - self._base0
        if not 0 <= off <= self._size0 - st.size:
            off = self._offset(addr, st.size)
        return st.unpack_from(self._mm, off)

    def write_struct(self, addr: int, st: struct.Struct, *values: Any) -> None:
        """Pack ``values`` with ``st`` (which must fit in one region) at ``addr``."""
        off = addr - self._base0
        if not 0 <= off <= self._size0 - st.size:
            off = self._offset(addr, st.size)
        st.pack_into(self._mm, off, *values)

    def remove_range(self, addr: int, length: int) -> None:
        """Discard ``[addr, addr+length)`` (MADV_REMOVE): it reads as zeros afterwards, in every
        process sharing the memfd, and its pages go back to the host. Page aligned (balloon).
        """
        page = pagesize()
        if addr % page or length % page:
            raise InvalidArgument(f"remove_range {addr:#x}+{length:#x} is not page aligned")
        for o, n in self._segments(addr, length):
            if n:
                self._mm.madvise(mmap.MADV_REMOVE, o, n)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap guest RAM and close the memfd. Idempotent.

        Views handed out earlier keep their pages mapped until they are released, so closing is
        always memory safe; afterwards every access raises ``OSError(EBADF)``.
        """
        if self._closed:
            return
        self._closed = True
        # Make the fast path fail and the slow path find nothing.
        self._size0 = -1
        self._hi_size = -1
        self._set_limits()
        self._bases = []
        self._ends = []
        self._deltas = []
        for view in (self._mv16, self._mv32, self._mv64, self._mv):
            view.release()
        self._mapping.close()
        self._memfd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<GuestMemory closed>"
        parts = ", ".join(f"{int(r.guest_base):#x}+{r.size:#x}" for r in self._regions)
        return f"<GuestMemory [{parts}]>"


def _check_adopted(memfd: SharedMemory, total: int) -> None:
    seals = memfd.get_seals()
    if not seals & Seals.SHRINK or not seals & Seals.GROW:
        # An unsealed file could be truncated by its other holders: SIGBUS on access.
        raise InvalidArgument("guest memory memfd is not sealed against shrinking and growing")
    if memfd.size != total:
        raise InvalidArgument(
            f"guest memory memfd holds {memfd.size:#x} bytes but the regions need {total:#x}"
        )


def _validate(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    if not regions:
        raise InvalidArgument("guest memory needs at least one region")
    page = pagesize()
    layout = sorted((int(base), int(size)) for base, size in regions)
    prev_end = -1
    for base, size in layout:
        if size <= 0:
            raise InvalidArgument(f"region at {base:#x} has non-positive size {size:#x}")
        if base < 0 or base + size > _U64_END:
            raise InvalidArgument(f"region {base:#x}+{size:#x} is outside the 64-bit space")
        if base % page or size % page:
            raise InvalidArgument(f"region {base:#x}+{size:#x} is not page aligned")
        if base < prev_end:
            raise InvalidArgument(f"region at {base:#x} overlaps the region before it")
        prev_end = base + size
    return layout


SHMEM_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def shmem_hugepages_enabled(path: str = SHMEM_THP_SETTING) -> bool:
    """Whether ``GuestMemory(..., hugepages=True)`` can get huge pages on this host.

    Guest memory is a memfd (shared memory), whose THP policy is the ``shmem_enabled`` sysfs
    setting (the bracketed word): ``always``, ``within_size`` and ``advise`` honour our
    MADV_HUGEPAGE; ``never`` and ``deny`` (Debian's default is ``never``) do not.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    start, end = text.find("["), text.find("]")
    return 0 <= start < end and text[start + 1 : end] in ("always", "within_size", "advise")
