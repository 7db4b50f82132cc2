"""The L1/L2 mapping: loading and validating tables, copy-on-write of shared L2 tables, and
the crash-safe write-back of all metadata (see DESIGN.md).
"""

from __future__ import annotations

import os
import struct
from array import array

from qcow import _header as H
from qcow._refcount import RefcountLayer
from qcow._state import U64, pwrite_all
from qcow._tables import (
    COMPRESSED,
    COPIED,
    L1_RESERVED,
    OFFSET_MASK,
    decode_u64_table,
    encode_u64_table,
)
from qcow.errors import CorruptImage, InvalidImage

# Total bytes of snapshot L1 tables read at open (a real image is far below this).
_SNAPSHOT_L1_BUDGET = 256 << 20


class MappingLayer(RefcountLayer):
    """L1/L2 tables and metadata write-back."""

    def _load_tables(self) -> None:
        hdr, cs, fd = self._hdr, self._cs, self._fd
        raw = os.pread(fd, hdr.l1_size * 8, hdr.l1_table_offset) if hdr.l1_size else b""
        self._l1 = decode_u64_table(raw)
        for i, e in enumerate(self._l1):
            if not e:
                continue
            off = e & OFFSET_MASK
            if e & L1_RESERVED:
                raise CorruptImage(
                    f"L1 entry {i} has reserved bits set", hdr.l1_table_offset + 8 * i
                )
            if off < cs or off & self._cmask or off + cs > self._file_end:
                raise CorruptImage(f"L1 entry {i} points outside the image", off)
        raw = os.pread(fd, hdr.refcount_table_clusters * cs, hdr.refcount_table_offset)
        self._reftable = decode_u64_table(raw)
        for i, e in enumerate(self._reftable):
            if not e:
                continue
            if e & 0x1FF:
                raise CorruptImage(f"refcount table entry {i} is misaligned", e)
            if e & self._cmask or e < cs or e + cs > self._file_end:
                raise CorruptImage(f"refcount table entry {i} points outside the image", e)
        self._collect_metadata()

    def _collect_metadata(self) -> None:
        """Note every metadata cluster, so no data write can ever land on one.

        A hostile image can point a data cluster (COPIED, refcount 1) at its own refcount table
        or at a snapshot's L1 table; writing through it would corrupt the image, so such writes
        are refused and allocation never hands these clusters out.
        """
        hdr, cb, cs, fd = self._hdr, self._cb, self._cs, self._fd
        meta = {0}

        def span(off: int, length: int) -> None:
            if length > 0:
                meta.update(range(off >> cb, ((off + length - 1) >> cb) + 1))

        span(hdr.l1_table_offset, hdr.l1_size * 8)
        span(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
        meta.update(e >> cb for e in self._reftable if e)
        meta.update((e & OFFSET_MASK) >> cb for e in self._l1 if e & OFFSET_MASK)
        pos = hdr.snapshots_offset
        seen: set[tuple[int, int]] = set()
        budget = _SNAPSHOT_L1_BUDGET
        for _ in range(hdr.nb_snapshots):
            fixed = os.pread(fd, 40, pos)
            if len(fixed) != 40:
                break
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", fixed)
            (extra,) = struct.unpack_from(">I", fixed, 36)
            pos += 40 + extra + id_len + name_len
            pos += -pos % 8
            if l1_size * 8 > H.MAX_L1_BYTES or l1_off % cs or (l1_off, l1_size) in seen:
                continue
            seen.add((l1_off, l1_size))
            budget -= l1_size * 8
            if budget < 0:
                # a hostile table could make us read terabytes here
                raise InvalidImage("snapshot L1 tables are implausibly large")
            span(l1_off, l1_size * 8)
            raw = os.pread(fd, l1_size * 8, l1_off)
            table = decode_u64_table(raw[: len(raw) // 8 * 8])
            meta.update((e & OFFSET_MASK) >> cb for e in table if e & OFFSET_MASK)
        if hdr.nb_snapshots:
            span(hdr.snapshots_offset, pos - hdr.snapshots_offset)
        for ext in hdr.extensions:
            if ext.kind == H.EXT_BITMAPS and len(ext.data) >= 24:
                _, _, dir_size, dir_off = struct.unpack_from(">IIQQ", ext.data)
                span(dir_off, min(dir_size, 1 << 26))
        self._meta = meta

    def _load_l2(self, l1i: int) -> array[int]:
        off = self._l1[l1i] & OFFSET_MASK
        if not off:
            raise AssertionError("_load_l2 called for an unallocated L2 table")
        table = self._l2.get(off)
        if table is not None:
            return table
        raw = os.pread(self._fd, self._cs, off)
        if len(raw) != self._cs:
            raise CorruptImage("L2 table extends past the end of the file", off)
        table = decode_u64_table(raw)
        self._l2_put(off, table)
        return table

    def _l2_put(self, off: int, table: array[int]) -> None:
        cache = self._l2
        while cache.full():
            victim = cache.victim()
            if victim in cache.dirty:
                # A dirty L2 may only reach the disk after the refcounts it relies on.
                self._write_metadata()
            cache.pop(victim)
        cache.put(off, table)

    def _writable_l2(self, l1i: int) -> array[int]:
        """The L2 table for ``l1i``, owned by the active L1 alone (allocated or COWed here)."""
        e = self._l1[l1i]
        off = e & OFFSET_MASK
        if off and e & COPIED and self._get_refcount(off >> self._cb) == 1:
            return self._load_l2(l1i)
        new_off = self._alloc() << self._cb
        if not off:
            table = array("Q", bytes(self._cs))
        else:
            # Shared with a snapshot. Refcounts count L1-to-cluster paths, so the clusters it
            # maps keep their counts (our path now goes through the copy); only the old table
            # loses a reference. COPIED is recomputed for the copy.
            old = self._load_l2(l1i)
            table = array("Q", old)
            for i, entry in enumerate(table):
                host = entry & OFFSET_MASK
                if not host or entry & COMPRESSED:
                    continue
                if self._get_refcount(host >> self._cb) == 1:
                    table[i] = entry | COPIED
                else:
                    table[i] = entry & ~COPIED
        # (putting it in the cache may write back metadata: the L1 still points at the old
        # table then, so the old table's decrement is queued only once the L1 entry changed)
        self._l2_put(new_off, table)
        self._l2.dirty.add(new_off)
        self._meta.add(new_off >> self._cb)
        self._l1[l1i] = new_off | COPIED
        self._l1_dirty.add(l1i)
        if off:
            self._pending_free.append(off >> self._cb)
        return table

    def _write_metadata(self) -> None:
        """Write back metadata in crash-safe order; then apply deferred refcount drops.

        1. refcount blocks (+ new refcount table entries), fdatasync   [skipped: lazy refcounts]
        2. L2 tables, fdatasync
        3. L1 entries, fdatasync
        4. refcount decrements of clusters the tables no longer reference (in memory)
        """
        fd = self._fd
        if not self._lazy and (self._rb.dirty or self._reftable_dirty or self._rc_unsynced):
            self._persist_refcounts()
        wrote = False
        if self._l2.dirty and self._data_unsynced:
            self._sync()  # data before the L2 entries that point at it (lazy mode needs this)
        for off in sorted(self._l2.dirty):
            table = self._l2.peek(off)
            if table is not None:
                pwrite_all(fd, encode_u64_table(table), off)
                wrote = True
        self._l2.dirty.clear()
        if self._l1_dirty:
            if wrote:
                self._sync()
            base = self._hdr.l1_table_offset
            for i in sorted(self._l1_dirty):
                pwrite_all(fd, U64.pack(self._l1[i]), base + 8 * i)
            self._l1_dirty.clear()
            wrote = True
        if wrote:
            self._sync()
        if self._pending_free:
            pending, self._pending_free = self._pending_free, []
            for c in pending:
                if self._get_refcount(c) == 0:
                    continue  # a corrupt image: never underflow
                if self._add_refcount(c, -1) == 0:
                    self._meta.discard(c)
                    if c < self._hint:
                        self._hint = c

    def _release(self, e: int) -> None:
        """Queue the drop of a reference once the table that held it is durable."""
        if not e:
            return
        if e & COMPRESSED:
            host, length = self._compressed_range(e)
            for c in range(host >> self._cb, (host + length - 1 >> self._cb) + 1):
                self._pending_free.append(c)
            self._zc_host = -1
            return
        host = e & OFFSET_MASK
        if host:
            self._pending_free.append(host >> self._cb)

    def _entry(self, cl: int) -> int:
        l1i = cl >> self._l2b
        if l1i >= len(self._l1) or not self._l1[l1i] & OFFSET_MASK:
            return 0
        return self._load_l2(l1i)[cl & self._l2mask]

    def _reload_refcounts(self) -> None:
        """Forget cached refcounts after the refcount structures were rebuilt on disk."""
        self._rb.clear()
        self._reftable_dirty.clear()
        self._l2.clear()
        self._file_end = os.fstat(self._fd).st_size
        self._load_tables()
        self._hint = 0
