"""Refcounts: loading and caching refcount blocks, allocation, refcount table growth.

Increments are applied at once; decrements are the caller's business (deferred until the
tables that dropped a reference are durable, see ``_mapping``). So the refcounts held here may
be written to disk at any time, which is what cache eviction does.
"""

from __future__ import annotations

import os
from array import array

from qcow import _header as H
from qcow._state import U64, ImageState, pwrite_all
from qcow._tables import (
    RefBlock,
    encode_u64_table,
)
from qcow.errors import CorruptImage, Error


class RefcountLayer(ImageState):
    """Refcount blocks and cluster allocation."""

    def _refblock(self, ti: int, create: bool) -> RefBlock | None:
        rb = self._rb.get(ti)
        if rb is not None:
            return rb
        off = self._reftable[ti] if ti < len(self._reftable) else 0
        if not off:
            return self._new_refblock(ti) if create else None
        raw = os.pread(self._fd, self._cs, off)
        if len(raw) != self._cs:
            raise CorruptImage("refcount block extends past the end of the file", off)
        rb = RefBlock(self._hdr.refcount_order, raw)
        self._rb_put(ti, rb)
        return rb

    def _rb_put(self, ti: int, rb: RefBlock) -> None:
        cache = self._rb
        while cache.full():
            victim = cache.victim()
            if victim in cache.dirty:
                # Writing refcounts early is always safe (they never undercount the disk).
                vb = cache.peek(victim)
                assert vb is not None
                pwrite_all(self._fd, vb.to_bytes(), self._reftable[victim])
                self._rc_unsynced = True
            cache.pop(victim)
        cache.put(ti, rb)

    def _get_refcount(self, cluster: int) -> int:
        rb = self._refblock(cluster >> self._rbb, False)
        return 0 if rb is None else rb.get(cluster & self._rbmask)

    def _add_refcount(self, cluster: int, delta: int) -> int:
        ti = cluster >> self._rbb
        rb = self._refblock(ti, True)
        assert rb is not None
        i = cluster & self._rbmask
        value = rb.get(i) + delta
        if value < 0:
            raise CorruptImage("refcount would drop below zero", cluster << self._cb)
        if value > rb.max_value:
            raise Error(
                f"refcount of cluster {cluster} would exceed {rb.max_value} "
                f"(refcount_bits={self._hdr.refcount_bits})"
            )
        rb.set(i, value)
        self._rb.dirty.add(ti)
        return value

    def _protected(self, c: int) -> bool:
        """Clusters allocation never hands out, whatever the refcounts claim."""
        return c in self._meta

    def _alloc(self) -> int:
        """Allocate one cluster (refcount 0 -> 1); returns its cluster index."""
        rbb, rbmask = self._rbb, self._rbmask
        while True:
            c = self._hint
            ti = c >> rbb
            rb = self._refblock(ti, True)
            assert rb is not None
            j = rb.find_zero(c & rbmask)
            if j < 0:
                self._hint = (ti + 1) << rbb
                continue
            c = (ti << rbb) | j
            self._hint = c + 1
            if self._protected(c):
                continue
            rb.set(j, 1)
            self._rb.dirty.add(ti)
            end = (c + 1) << self._cb
            if end > self._file_end:
                self._file_end = end
            return c

    def _alloc_contiguous(self, n: int) -> int:
        """Allocate ``n`` physically contiguous clusters (for L1 tables)."""
        saved = self._hint
        self._hint = -(-self._file_end // self._cs)
        got: list[int] = []
        while len(got) < n:
            c = self._alloc()
            if got and c != got[-1] + 1:
                # a refcount block landed in the middle: give the run back, start after it
                for old in got:
                    self._add_refcount(old, -1)
                got = []
            got.append(c)
        self._hint = saved
        return got[0]

    def _new_refblock(self, ti: int) -> RefBlock:
        """Create the refcount block for table index ``ti``, stored inside the range it covers."""
        if ti >= len(self._reftable):
            self._grow_reftable(ti + 1)
            rb = self._rb.get(ti)
            if rb is not None:
                return rb
            if self._reftable[ti]:
                found = self._refblock(ti, False)
                assert found is not None
                return found
        rb = RefBlock(self._hdr.refcount_order, bytes(self._cs))
        first = ti << self._rbb
        place = first
        while self._protected(place):
            place += 1
        rb.set(place - first, 1)
        self._rb_put(ti, rb)
        self._rb.dirty.add(ti)
        self._reftable[ti] = place << self._cb
        self._meta.add(place)
        self._reftable_dirty.add(ti)
        self._file_end = max(self._file_end, (place + 1) << self._cb)
        return rb

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a larger one at the end of the file.

        The new table and the refcount blocks that describe it are written and synced before
        the header points to them; the old table is freed afterwards.
        """
        cs, cb, rbb = self._cs, self._cb, self._rbb
        per_cluster = cs // 8
        old_n = len(self._reftable)
        entries = max(min_entries, old_n * 2)
        start = -(-self._file_end // cs)
        while True:
            t = -(-entries // per_cluster)
            b = 0
            while True:
                lo = start >> rbb
                hi = (start + t + b - 1) >> rbb
                missing = [
                    i
                    for i in range(lo, hi + 1)
                    if not (i < old_n and self._reftable[i]) and i not in self._rb
                ]
                if len(missing) == b:
                    break
                b = len(missing)
            if hi < entries:
                break
            entries = hi + 1
        t = -(-entries // per_cluster)
        if t * cs > H.MAX_REFTABLE_BYTES:
            raise Error("refcount table would exceed its maximum size")
        new_table = array("Q", self._reftable)
        new_table.extend([0] * (t * per_cluster - old_n))
        for k, i in enumerate(missing):
            new_table[i] = (start + t + k) << cb
        self._reftable = new_table
        for i in missing:
            rb = RefBlock(self._hdr.refcount_order, bytes(cs))
            self._rb_put(i, rb)
            self._rb.dirty.add(i)
        for c in range(start, start + t + b):
            self._add_refcount(c, 1)
            self._meta.add(c)
        self._file_end = max(self._file_end, (start + t + b) << cb)
        # persist: blocks, then the table, then the header switch
        self._persist_refcounts(force_sync=True, skip_table=True)
        pwrite_all(self._fd, encode_u64_table(new_table), start << cb)
        self._sync()
        old_off, old_clusters = self._hdr.refcount_table_offset, self._hdr.refcount_table_clusters
        self._hdr.refcount_table_offset = start << cb
        self._hdr.refcount_table_clusters = t
        self._write_header_fixed()
        self._sync()
        self._reftable_dirty.clear()
        for c in range(old_off >> cb, (old_off >> cb) + old_clusters):
            if self._add_refcount(c, -1) == 0:
                self._meta.discard(c)
            self._hint = min(self._hint, c)

    def _persist_refcounts(self, *, force_sync: bool = False, skip_table: bool = False) -> None:
        """Write dirty refcount blocks, then (after a sync) new refcount table entries."""
        fd = self._fd
        wrote = False
        for ti in sorted(self._rb.dirty):
            rb = self._rb.peek(ti)
            if rb is not None:
                pwrite_all(fd, rb.to_bytes(), self._reftable[ti])
                wrote = True
        self._rb.dirty.clear()
        if self._reftable_dirty and not skip_table:
            if wrote:
                self._sync()
            base = self._hdr.refcount_table_offset
            for ti in sorted(self._reftable_dirty):
                pwrite_all(fd, U64.pack(self._reftable[ti]), base + 8 * ti)
            self._reftable_dirty.clear()
            wrote = True
        if wrote or self._rc_unsynced or force_sync:
            self._sync()
