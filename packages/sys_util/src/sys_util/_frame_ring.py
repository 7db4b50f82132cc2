"""Batches of frames between an fd (a tap) and one-descriptor chains of a split virtqueue.

Why: at 1.5 KB frames the kernel moves a frame through a tap in about a microsecond, and a
Python loop that reads the ring, checks the descriptor, slices a view and stores the used
element costs as much again. :class:`FrameRing` does that loop in C, with the GIL released, for
the one chain shape almost every network frame has: a single descriptor in one RAM region (a
device-readable header + frame to transmit, or a device-writable receive buffer).

It is a helper for a device that owns the queue, not a queue: it starts at the caller's
``next_avail``/``next_used`` and hands the new values back, stops at the first chain of any
other shape (:attr:`FrameRing.SLOW`) so the caller can validate that one fully, and never
reads or writes outside the buffers it was built from, whatever the guest puts in the rings.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

from sys_util._binding import ffi, lib
from sys_util.errors import InvalidArgument

__all__ = ["FrameBatch", "FrameRing"]

_MAX_QUEUE_SIZE = 32768


class FrameBatch(NamedTuple):
    """What one :meth:`FrameRing.tx`/:meth:`FrameRing.rx` call did."""

    status: int
    next_avail: int
    next_used: int
    #: Chains completed (their used elements are published).
    frames: int
    #: Bytes moved by those chains, headers included.
    nbytes: int
    #: tx: frames the fd refused (completed with length 0); rx: reads shorter than a header.
    errors: int
    last_errno: int
    #: OVERSIZE only: (head, offset of its buffer in ``ram``, buffer length, bytes read); the
    #: chain is consumed (counted in ``next_avail``) but not used, the bytes past the buffer are
    #: at the start of the stage buffer.
    oversize: tuple[int, int, int, int] | None


class FrameRing:
    """Fast paths over one split virtqueue whose rings and RAM the caller validated.

    ``ram`` is a writable view of one guest RAM region starting at guest address ``ram_base``;
    ``desc`` (16 bytes per entry), ``avail`` (4 + 2 per entry) and ``used`` (4 + 8 per entry)
    are writable views of the queue's rings, ``size`` entries each (a power of two). The views
    are pinned until :meth:`close`.
    """

    __slots__ = ("_batch", "_handles", "_stage", "_stage_len", "_vq")

    #: The budget or the available chains ran out.
    DONE: ClassVar[int] = lib.SYS_UTIL_VQ_DONE
    #: The next chain is not one descriptor in RAM of the kind asked for: use the full path for it.
    SLOW: ClassVar[int] = lib.SYS_UTIL_VQ_SLOW
    #: rx: the fd had nothing to read (EAGAIN); the buffer stays available.
    EMPTY_FD: ClassVar[int] = lib.SYS_UTIL_VQ_EMPTY_FD
    #: rx: the read failed (``last_errno``); the buffer stays available.
    FD_ERROR: ClassVar[int] = lib.SYS_UTIL_VQ_FD_ERROR
    #: rx: the frame was longer than the buffer; see :class:`FrameBatch` ``oversize``.
    OVERSIZE: ClassVar[int] = lib.SYS_UTIL_VQ_OVERSIZE

    def __init__(
        self,
        ram: memoryview,
        ram_base: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        size: int,
    ) -> None:
        if not 1 <= size <= _MAX_QUEUE_SIZE or size & (size - 1):
            raise InvalidArgument(f"queue size {size} is not a power of two up to 32768")
        for name, view, need in (
            ("desc", desc, 16 * size),
            ("avail", avail, 4 + 2 * size),
            ("used", used, 4 + 8 * size),
        ):
            if view.nbytes < need:
                raise InvalidArgument(f"{name} ring of {view.nbytes} bytes is shorter than {need}")
        if not 0 <= ram_base < 1 << 64:
            raise InvalidArgument(f"RAM base {ram_base:#x} is not a 64-bit address")
        # SAFETY: from_buffer pins each exporter (the guest-memory mmap) while the handle lives,
        # and the C code is given each buffer's length (ram_len; the rings' lengths follow from
        # size, checked above), so it cannot reach outside them.
        ram_h = ffi.from_buffer("uint8_t[]", ram, require_writable=True)
        desc_h = ffi.from_buffer("uint64_t[]", desc)
        avail_h = ffi.from_buffer("uint16_t[]", avail, require_writable=True)
        used_h = ffi.from_buffer("uint16_t[]", used, require_writable=True)
        for handle in (desc_h, used_h):
            if int(ffi.cast("uintptr_t", handle)) % 4:
                raise InvalidArgument("ring is not 4-byte aligned")
        if int(ffi.cast("uintptr_t", desc_h)) % 8:
            raise InvalidArgument("descriptor table is not 8-byte aligned")
        vq = ffi.new("struct sys_util_vq *")
        vq.ram = ram_h
        vq.ram_base = ram_base
        vq.ram_len = ram.nbytes
        vq.desc = desc_h
        vq.avail = avail_h
        vq.used_idx = used_h + 1
        vq.used = ffi.cast("uint32_t *", used_h + 2)
        vq.size = size
        self._vq: Any = vq
        self._handles: list[Any] | None = [ram_h, desc_h, avail_h, used_h]
        self._batch: Any = ffi.new("struct sys_util_vq_batch *")
        self._stage: Any = ffi.NULL
        self._stage_len = 0

    @property
    def closed(self) -> bool:
        return self._handles is None

    def close(self) -> None:
        """Unpin the buffers (idempotent); the object is unusable afterwards."""
        handles, self._handles = self._handles, None
        if handles is None:
            return
        self._vq = None
        self._stage = ffi.NULL
        for handle in handles:
            ffi.release(handle)

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_stage(self, stage: bytearray | memoryview) -> None:
        """The overflow buffer :meth:`rx` reads a frame's tail into (pinned until close)."""
        if self._handles is None:
            raise InvalidArgument("FrameRing is closed")
        # SAFETY: the handle pins ``stage`` until close(); rx() passes its length with it.
        handle = ffi.from_buffer("uint8_t[]", stage, require_writable=True)
        self._handles.append(handle)
        self._stage = handle
        self._stage_len = len(handle)

    def _result(self, status: int) -> FrameBatch:
        b = self._batch
        over = None
        if status == FrameRing.OVERSIZE:
            over = (b.head, b.offset, b.length, b.received)
        return FrameBatch(status, b.next_avail, b.next_used, b.frames, b.bytes, b.errors,
                          b.last_errno, over)  # fmt: skip

    def _start(self, next_avail: int, next_used: int) -> Any:
        if self._vq is None:
            raise InvalidArgument("FrameRing is closed")
        b = self._batch
        b.next_avail = next_avail & 0xFFFF
        b.next_used = next_used & 0xFFFF
        b.last_errno = 0
        return b

    def tx(
        self, fd: int, next_avail: int, next_used: int, budget: int, hdr_len: int, max_len: int
    ) -> FrameBatch:
        """write() each available one-descriptor, device-readable chain of ``hdr_len..max_len``
        bytes to ``fd``, up to ``budget``; complete each with used length 0 and publish."""
        b = self._start(next_avail, next_used)
        status = lib.sys_util_vq_tx(self._vq, fd, budget, hdr_len, max_len, b)
        return self._result(status)

    def rx(
        self, fd: int, next_avail: int, next_used: int, budget: int, hdr_len: int,
        clear_flags: bool,
    ) -> FrameBatch:  # fmt: skip
        """readv() frames from ``fd`` into available one-descriptor device-writable buffers.

        Each frame goes into the buffer plus the stage (:meth:`set_stage`); a frame that fits
        is completed with its length (``num_buffers`` set to 1 when ``hdr_len`` is 12, the
        header's flags byte cleared when ``clear_flags``); one that does not stops the batch
        with :attr:`OVERSIZE`.
        """
        if self._stage == ffi.NULL:
            raise InvalidArgument("FrameRing.rx needs a stage buffer (set_stage)")
        b = self._start(next_avail, next_used)
        status = lib.sys_util_vq_rx(
            self._vq, fd, budget, hdr_len, 1 if clear_flags else 0, self._stage,
            self._stage_len, b,
        )  # fmt: skip
        return self._result(status)
