"""Shared state of an open image: geometry, caches, dirty tracking, raw file writes.

The image is implemented in layers, each a small module: this state, the refcounts
(``_refcount``), the L1/L2 mapping and metadata write-back (``_mapping``), and the public
``QcowFile`` (``_qcow``) with the read and write paths.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from array import array

from qcow import _header as H
from qcow._backing import BackingFile
from qcow._tables import (
    LruCache,
    RefBlock,
)

L2_CACHE_BYTES = 8 << 20
RB_CACHE_BYTES = 8 << 20
U64 = struct.Struct(">Q")


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


class ImageState:
    """Fields every layer uses; no behaviour beyond raw writes and syncs."""

    def __init__(
        self,
        path: str,
        fd: int,
        header: H.Header,
        writable: bool,
        backing: BackingFile | None,
        cache_bytes: int | None = None,
    ) -> None:
        self._path = path
        self._fd = fd
        self._hdr = header
        self._writable = writable
        self._backing = backing
        self._lock = threading.RLock()
        cb = header.cluster_bits
        self._cb = cb
        self._cs = 1 << cb
        self._cmask = self._cs - 1
        self._l2b = cb - 3
        self._l2n = 1 << self._l2b
        self._l2mask = self._l2n - 1
        self._rbb = cb + 3 - header.refcount_order  # log2(entries per refcount block)
        self._rbmask = (1 << self._rbb) - 1
        self._v3 = header.version >= 3
        self._lazy = self._v3 and bool(header.compatible_features & H.COMPAT_LAZY_REFCOUNTS)
        self._modified = False  # metadata or header changed since open (dirty bit, autoclear)
        self._data_unsynced = False
        self._rc_unsynced = False
        self._file_end = os.fstat(fd).st_size
        self._hint = 0
        self._pending_free: list[int] = []
        self._l1 = array("Q")
        self._l1_dirty: set[int] = set()
        self._reftable = array("Q")
        self._reftable_dirty: set[int] = set()
        l2_bytes = L2_CACHE_BYTES if cache_bytes is None else cache_bytes
        rb_bytes = RB_CACHE_BYTES if cache_bytes is None else cache_bytes
        self._l2: LruCache[int, array[int]] = LruCache(max(4, l2_bytes >> cb))
        self._rb: LruCache[int, RefBlock] = LruCache(max(4, rb_bytes >> cb))
        self._zc_host = -1
        self._zc_data = b""
        self._meta: set[int] = set()

    def _sync(self) -> None:
        """fdatasync: everything written so far (data and metadata) is durable."""
        os.fdatasync(self._fd)
        self._data_unsynced = False
        self._rc_unsynced = False

    def _pwritev(self, mv: memoryview, offset: int) -> None:
        self._data_unsynced = True
        done = os.pwritev(self._fd, [mv], offset)
        while done < len(mv):
            n = os.pwritev(self._fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n
        if offset + len(mv) > self._file_end:
            self._file_end = offset + len(mv)

    def _write_header_fixed(self) -> None:
        pwrite_all(self._fd, self._hdr.pack_fixed(), 0)

    def _set_incompat(self, value: int) -> None:
        if not self._v3 or value == self._hdr.incompatible_features:
            return
        self._hdr.incompatible_features = value
        pwrite_all(self._fd, U64.pack(value), 72)
        self._sync()

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, byte length) of a compressed cluster's data."""
        x = 62 - (self._cb - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self._cb - 8)) - 1)) + 1
        length = (host & ~511) + sectors * 512 - host
        return host, length
