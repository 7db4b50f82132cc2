"""Bounds-checked memory mappings (anonymous, file-backed, shared).

Python's ``mmap`` already refuses out-of-range slices, but it clips silently in places and its
errors name no offsets. :class:`MemoryMapping` checks every ``offset``/``length`` first and
raises :class:`~sys_util.errors.InvalidArgument` naming them, and adds what a VMM needs on top:
the host address (for KVM), ``MADV_REMOVE``, and zero-copy memoryviews.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import weakref
from mmap import mmap as _Mmap
from types import TracebackType
from typing import Any, Self, TypeAlias

from sys_util._binding import buffer_address
from sys_util._fd import AsRawFd, ebadf, raw_fd
from sys_util.errors import InvalidArgument

__all__ = ["BytesLike", "MemoryMapping", "pagesize"]

#: What the write methods accept (collections.abc.Buffer is 3.12+).
BytesLike: TypeAlias = bytes | bytearray | memoryview | mmap.mmap


@functools.cache
def pagesize() -> int:
    """Return the system page size in bytes."""
    return os.sysconf("SC_PAGESIZE")


def _close_mmap(mm: _Mmap) -> None:
    try:
        mm.close()
    except BufferError:
        # Someone still holds a memoryview: the mapping will be unmapped when the last view
        # is released. That is memory safe; dropping our reference is all we can do.
        pass


class MemoryMapping:
    """A mapping of ``size`` bytes with bounds-checked access.

    Build one with :meth:`anonymous`, :meth:`from_fd` or :meth:`from_shared_memory`.
    """

    __slots__ = ("__weakref__", "_finalizer", "_host_address", "_mm", "_size", "_view")

    def __init__(self, mm: _Mmap) -> None:
        """Take ownership of an existing ``mmap`` object (prefer the factory methods)."""
        self._mm: _Mmap | None = mm
        self._size = len(mm)
        self._view = memoryview(mm)
        self._host_address = buffer_address(mm)
        # Safety net: unmap on garbage collection if close() was never called.
        self._finalizer = weakref.finalize(self, _close_mmap, mm)

    @classmethod
    def anonymous(cls, size: int) -> Self:
        """Map ``size`` bytes of private zero-filled memory."""
        _check_size(size)
        return cls(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))

    @classmethod
    def from_fd(
        cls,
        fd: int | AsRawFd,
        size: int,
        offset: int = 0,
        *,
        writable: bool = True,
        shared: bool = True,
    ) -> Self:
        """Map ``size`` bytes of a file starting at ``offset`` (a multiple of the page size).

        ``shared=True`` (MAP_SHARED) makes writes visible to every other mapping of the file, in
        this process or another; ``shared=False`` gives a private copy-on-write view.
        """
        _check_size(size)
        if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise InvalidArgument(f"mapping offset {offset:#x} is not page aligned")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        return cls(mmap.mmap(raw_fd(fd), size, flags=flags, prot=prot, offset=offset))

    @classmethod
    def from_shared_memory(cls, shm: AsRawFd, size: int | None = None) -> Self:
        """Map a whole :class:`~sys_util.SharedMemory` (or its first ``size`` bytes), shared."""
        if size is None:
            size = os.fstat(shm.fileno()).st_size
        return cls.from_fd(shm, size)

    # -- properties -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def host_address(self) -> int:
        """The address of the first byte in this process (for KVM_SET_USER_MEMORY_REGION).

        Valid until :meth:`close`; the kernel must stop using it before then.
        """
        self._mapping()
        return self._host_address

    @property
    def mmap(self) -> _Mmap:
        """The underlying ``mmap`` object (for struct.unpack_from and friends)."""
        return self._mapping()

    # -- access ---------------------------------------------------------------------------------

    def _mapping(self) -> _Mmap:
        mm = self._mm
        if mm is None:
            raise ebadf("MemoryMapping")
        return mm

    def _check(self, offset: int, length: int) -> None:
        if self._mm is None:
            raise ebadf("MemoryMapping")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidArgument(
                f"range {offset:#x}+{length:#x} is outside the {self._size:#x}-byte mapping"
            )

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """Return a writable zero-copy memoryview of ``[offset, offset+length)``."""
        if length is None:
            length = self._size - offset
        self._check(offset, length)
        return self._view[offset : offset + length]

    def as_memoryview(self) -> memoryview:
        """Return a zero-copy memoryview of the whole mapping."""
        return self.view(0, self._size)

    def read_slice(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes out of the mapping."""
        self._check(offset, length)
        return self._view[offset : offset + length].tobytes()

    def write_slice(self, offset: int, data: BytesLike) -> None:
        """Copy ``data`` into the mapping at ``offset``."""
        src = memoryview(data).cast("B")
        self._check(offset, len(src))
        self._view[offset : offset + len(src)] = src

    def read_obj(self, offset: int, st: struct.Struct) -> tuple[Any, ...]:
        """Unpack one ``st`` at ``offset``."""
        self._check(offset, st.size)
        return st.unpack_from(self._view, offset)

    def write_obj(self, offset: int, st: struct.Struct, *values: Any) -> None:
        """Pack ``values`` with ``st`` at ``offset``."""
        self._check(offset, st.size)
        st.pack_into(self._view, offset, *values)

    def remove_range(self, offset: int, length: int) -> None:
        """Give ``[offset, offset+length)`` back to the kernel (MADV_REMOVE).

        The range then reads as zeros, in every process that maps the same shared file. Both ends
        must be page aligned.
        """
        self._check(offset, length)
        page = pagesize()
        if offset % page or length % page:
            raise InvalidArgument(f"remove_range {offset:#x}+{length:#x} is not page aligned")
        if length:
            self._mapping().madvise(mmap.MADV_REMOVE, offset, length)

    def msync(self) -> None:
        """Flush a file-backed shared mapping to its file."""
        self._mapping().flush()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (deferred while memoryviews of the mapping are still alive). Idempotent."""
        mm, self._mm = self._mm, None
        if mm is not None:
            self._finalizer.detach()
            self._view.release()
            _close_mmap(mm)

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
        if self._mm is None:
            return "<MemoryMapping closed>"
        return f"<MemoryMapping size={self._size:#x} at {self._host_address:#x}>"


def _check_size(size: int) -> None:
    if size <= 0:
        raise InvalidArgument(f"mapping size must be positive, got {size}")
