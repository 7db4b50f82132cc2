"""Consistency check and refcount rebuild.

The check counts every reference to every host cluster (header, L1 and L2 tables of the active
image and of each internal snapshot, data and compressed clusters, refcount structures, snapshot
table, bitmap directory/tables/data) and compares the counts with the stored refcounts:

- a stored refcount *below* the references is a corruption (the cluster could be reused while
  still in use);
- a stored refcount *above* them is a leak (space lost, harmless);
- references outside the file or misaligned are corruptions too.

The rebuild (``repair=True``, and opening a dirty lazy-refcount image writable) writes a fresh
refcount table and blocks past the end of the file, syncs, then switches the header to them in
one sector write: a crash during repair leaves the old, still valid, structures in use.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qcow import _header as H
from qcow._tables import (
    COMPRESSED,
    COPIED,
    L1_RESERVED,
    L2_RESERVED,
    OFFSET_MASK,
    ZERO,
    RefBlock,
    decode_u64_table,
    encode_u64_table,
)
from qcow.errors import CorruptImage

if TYPE_CHECKING:
    from qcow._qcow import QcowFile

__all__ = ["CheckResult", "check_image"]

_MAX_MESSAGES = 50


@dataclass
class CheckResult:
    """The outcome of :meth:`QcowFile.check`.

    Attributes:
        corruptions: references the refcounts do not cover, or that point outside the file.
        leaks: clusters whose refcount is higher than their references.
        refcount_errors: clusters whose refcount is below their references (counted within
            ``corruptions``; these are what a repair fixes).
        copied_flag_errors: L1/L2 COPIED flags that disagree with the refcount (counted within
            ``corruptions`` too, as qemu-img does).
        allocated_clusters: guest clusters stored in this image.
        total_clusters: guest clusters of the virtual disk.
        compressed_clusters: of those, compressed.
        image_end_offset: end of the last referenced cluster.
        messages: the first problems found, one line each.
        repaired: True if refcounts were rebuilt.
    """

    corruptions: int = 0
    leaks: int = 0
    copied_flag_errors: int = 0
    refcount_errors: int = 0
    allocated_clusters: int = 0
    total_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    leaked_clusters: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0

    def _note(self, text: str) -> None:
        if len(self.messages) < _MAX_MESSAGES:
            self.messages.append(text)


class _Counter:
    def __init__(self, qf: QcowFile, res: CheckResult) -> None:
        self.fd = qf.fileno()
        self.cs = qf.cluster_size
        self.cb = qf.header.cluster_bits
        self.size = os.fstat(self.fd).st_size
        self.nclusters = -(-self.size // self.cs)
        self.refs = array("Q", bytes(8 * max(1, self.nclusters)))
        self.res = res

    def add(self, offset: int, length: int, what: str) -> bool:
        """Count a reference to the clusters of [offset, offset+length)."""
        if offset % self.cs and what not in ("compressed cluster",):
            self.res.corruptions += 1
            self.res._note(f"{what} at {offset:#x} is not cluster aligned")
            return False
        if offset < self.cs and what != "header":
            self.res.corruptions += 1
            self.res._note(f"{what} at {offset:#x} overlaps the header")
            return False
        first = offset >> self.cb
        last = (offset + max(1, length) - 1) >> self.cb
        if last >= self.nclusters:
            self.res.corruptions += 1
            self.res._note(f"{what} at {offset:#x} is past the end of the file")
            return False
        for c in range(first, last + 1):
            self.refs[c] += 1
        end = (last + 1) << self.cb
        if end > self.res.image_end_offset:
            self.res.image_end_offset = end
        return True

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


def _walk_l1(
    qf: QcowFile, cnt: _Counter, l1_off: int, l1_size: int, seen_l2: set[int], active: bool
) -> None:
    res = cnt.res
    if not l1_size:
        return
    if not cnt.add(l1_off, l1_size * 8, "L1 table"):
        return
    l1 = decode_u64_table(cnt.read(l1_off, l1_size * 8))
    cb = cnt.cb
    x = 62 - (cb - 8)
    total_guest = -(-qf.virtual_size // cnt.cs)
    for l1i, e in enumerate(l1):
        off = e & OFFSET_MASK
        if not off:
            continue
        if e & L1_RESERVED:
            res.corruptions += 1
            res._note(f"L1 entry {l1i} has reserved bits set")
        if not cnt.add(off, cnt.cs, "L2 table"):
            continue
        # Refcounts count L1-to-cluster paths: an L2 table shared by two L1 tables (a
        # snapshot and the active image) contributes its clusters twice.
        seen_l2.add(off)
        table = decode_u64_table(cnt.read(off, cnt.cs))
        for l2i, entry in enumerate(table):
            if not entry:
                continue
            guest_cluster = (l1i << (cb - 3)) + l2i
            if entry & COMPRESSED:
                host = entry & ((1 << x) - 1)
                sectors = ((entry >> x) & ((1 << (cb - 8)) - 1)) + 1
                length = (host & ~511) + sectors * 512 - host
                cnt.add(host, length, "compressed cluster")
                if active and guest_cluster < total_guest:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                continue
            host = entry & OFFSET_MASK
            if entry & L2_RESERVED:
                res.corruptions += 1
                res._note(f"L2 entry at {off + 8 * l2i:#x} has reserved bits set")
            if host:
                cnt.add(host, cnt.cs, "data cluster")
                if active and not entry & ZERO and guest_cluster < total_guest:
                    res.allocated_clusters += 1


def _walk_snapshots(qf: QcowFile, cnt: _Counter, seen_l2: set[int]) -> None:
    hdr = qf.header
    pos = hdr.snapshots_offset
    start = pos
    for i in range(hdr.nb_snapshots):
        fixed = cnt.read(pos, 40)
        if len(fixed) != 40:
            cnt.res.corruptions += 1
            cnt.res._note(f"snapshot {i} header is past the end of the file")
            return
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", fixed)
        (extra,) = struct.unpack_from(">I", fixed, 36)
        pos += 40 + extra + id_len + name_len
        pos += -pos % 8
        if l1_size * 8 > H.MAX_L1_BYTES:
            cnt.res.corruptions += 1
            cnt.res._note(f"snapshot {i} L1 table is too large")
            continue
        _walk_l1(qf, cnt, l1_off, l1_size, seen_l2, active=False)
    if hdr.nb_snapshots:
        cnt.add(start, pos - start, "snapshot table")


def _walk_bitmaps(qf: QcowFile, cnt: _Counter) -> None:
    # Without the autoclear bit the bitmaps are inconsistent (a writer without bitmap support,
    # like us, touched the image): their clusters are then leaks, as qemu-img check says too.
    if not qf.header.autoclear_features & H.AUTOCLEAR_BITMAPS:
        return
    for ext in qf.header.extensions:
        if ext.kind != H.EXT_BITMAPS or len(ext.data) < 24:
            continue
        nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", ext.data)
        if not dir_size or not cnt.add(dir_off, dir_size, "bitmap directory"):
            continue
        directory = cnt.read(dir_off, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(directory):
                break
            tab_off, tab_size, _flags, _type, _gran, name_size, extra = struct.unpack_from(
                ">QIIBBHI", directory, pos
            )
            pos += 24 + extra + name_size
            pos += -pos % 8
            if not tab_size or not cnt.add(tab_off, tab_size * 8, "bitmap table"):
                continue
            for e in decode_u64_table(cnt.read(tab_off, tab_size * 8)):
                if e & OFFSET_MASK:
                    cnt.add(e & OFFSET_MASK, cnt.cs, "bitmap data")


def _count_references(qf: QcowFile, res: CheckResult, *, with_refcount: bool) -> _Counter:
    hdr = qf.header
    cnt = _Counter(qf, res)
    cnt.add(0, cnt.cs, "header")
    seen_l2: set[int] = set()
    _walk_l1(qf, cnt, hdr.l1_table_offset, hdr.l1_size, seen_l2, active=True)
    _walk_snapshots(qf, cnt, seen_l2)
    _walk_bitmaps(qf, cnt)
    if with_refcount:
        cnt.add(hdr.refcount_table_offset, hdr.refcount_table_clusters * cnt.cs, "refcount table")
        reftable = decode_u64_table(
            cnt.read(hdr.refcount_table_offset, hdr.refcount_table_clusters * cnt.cs)
        )
        for e in reftable:
            if e:
                cnt.add(e & ~0x1FF, cnt.cs, "refcount block")
    res.total_clusters = -(-hdr.size // cnt.cs)
    return cnt


def _stored_refcounts(qf: QcowFile, cnt: _Counter) -> dict[int, int]:
    hdr = qf.header
    reftable = decode_u64_table(
        cnt.read(hdr.refcount_table_offset, hdr.refcount_table_clusters * cnt.cs)
    )
    per_block = cnt.cs * 8 >> hdr.refcount_order
    stored: dict[int, int] = {}
    for ti, e in enumerate(reftable):
        off = e & ~0x1FF
        if not off or off + cnt.cs > cnt.size:
            continue
        rb = RefBlock(hdr.refcount_order, cnt.read(off, cnt.cs))
        base = ti * per_block
        for i, value in rb.nonzero():
            stored[base + i] = value
    return stored


def _check_copied(qf: QcowFile, res: CheckResult, final: array[int]) -> None:
    """COPIED flags in the active L1/L2 must say exactly "refcount is 1"."""
    hdr = qf.header
    if not hdr.l1_size:
        return
    l1 = decode_u64_table(os.pread(qf.fileno(), hdr.l1_size * 8, hdr.l1_table_offset))
    cb = hdr.cluster_bits

    def rc(off: int) -> int:
        c = off >> cb
        return final[c] if c < len(final) else 0

    for e in l1:
        off = e & OFFSET_MASK
        if not off or off + qf.cluster_size > len(final) << cb:
            continue
        if bool(e & COPIED) != (rc(off) == 1):
            res.copied_flag_errors += 1
        table = decode_u64_table(os.pread(qf.fileno(), qf.cluster_size, off))
        for entry in table:
            host = entry & OFFSET_MASK
            if not host or entry & COMPRESSED or host >= len(final) << cb:
                continue
            if bool(entry & COPIED) != (rc(host) == 1):
                res.copied_flag_errors += 1
    res.corruptions += res.copied_flag_errors
    if res.copied_flag_errors:
        res._note(f"{res.copied_flag_errors} COPIED flags disagree with refcounts")


def check_image(qf: QcowFile, *, repair: bool = False) -> CheckResult:
    """Check ``qf`` (whose metadata must already be on disk); rebuild refcounts if asked."""
    res = CheckResult()
    cnt = _count_references(qf, res, with_refcount=True)
    stored = _stored_refcounts(qf, cnt)
    refs = cnt.refs
    for c in range(len(refs)):
        want = refs[c]
        have = stored.pop(c, 0)
        if have < want:
            res.corruptions += 1
            res.refcount_errors += 1
            res._note(f"cluster {c}: refcount {have} but {want} references")
        elif have > want:
            res.leaks += 1
            res.leaked_clusters.append(c)
    # refcounts for clusters past the end of the file: leaks, unless nothing refers to them
    for c, _have in sorted(stored.items()):
        res.leaks += 1
        res.leaked_clusters.append(c)
    _check_copied(qf, res, refs)
    if repair and not res.ok:
        _rebuild(qf, res)
    return res


def _rebuild(qf: QcowFile, res: CheckResult) -> None:
    """Write new refcount structures from the reference counts, then switch the header."""
    if res.corruptions - res.copied_flag_errors - res.refcount_errors:
        raise CorruptImage("image has damage beyond refcounts; refusing to repair it")
    hdr = qf.header
    fd = qf.fileno()
    scratch = CheckResult()
    cnt = _count_references(qf, scratch, with_refcount=False)
    cs, cb = cnt.cs, cnt.cb
    per_block = cs * 8 >> hdr.refcount_order
    start = cnt.nclusters
    t = b = 1
    while True:
        total = start + t + b
        nb = -(-total // per_block)
        nt = -(-(nb * 8) // cs)
        if (nb, nt) == (b, t):
            break
        b, t = nb, nt
    total = start + t + b
    counts = array("Q", cnt.refs)
    counts.extend([0] * (total - len(counts)))
    for c in range(start, total):
        counts[c] = 1
    max_value = (1 << hdr.refcount_bits) - 1
    reftable = array("Q", bytes(t * cs))
    blocks = bytearray()
    for i in range(b):
        rb = RefBlock(hdr.refcount_order, bytes(cs))
        base = i * per_block
        for j in range(min(per_block, total - base)):
            value = counts[base + j]
            if value > max_value:
                raise CorruptImage(f"cluster {base + j} needs refcount {value} > {max_value}")
            if value:
                rb.set(j, value)
        reftable[i] = (start + t + i) << cb
        blocks += rb.to_bytes()
    os.pwrite(fd, encode_u64_table(reftable), start << cb)
    os.pwrite(fd, bytes(blocks), (start + t) << cb)
    os.fdatasync(fd)
    hdr.refcount_table_offset = start << cb
    hdr.refcount_table_clusters = t
    os.pwrite(fd, hdr.pack_fixed(), 0)
    os.fdatasync(fd)
    _fix_copied(qf, counts)
    os.fdatasync(fd)
    qf._reload_refcounts()
    res.repaired = True


def _fix_copied(qf: QcowFile, counts: array[int]) -> None:
    hdr = qf.header
    if not hdr.l1_size:
        return
    fd, cs, cb = qf.fileno(), qf.cluster_size, hdr.cluster_bits
    l1 = decode_u64_table(os.pread(fd, hdr.l1_size * 8, hdr.l1_table_offset))

    def one(off: int) -> bool:
        c = off >> cb
        return c < len(counts) and counts[c] == 1

    l1_changed = False
    for i, e in enumerate(l1):
        off = e & OFFSET_MASK
        if not off:
            continue
        table = decode_u64_table(os.pread(fd, cs, off))
        changed = False
        for j, entry in enumerate(table):
            host = entry & OFFSET_MASK
            if not host or entry & COMPRESSED:
                continue
            want = entry | COPIED if one(host) else entry & ~COPIED
            if want != entry:
                table[j] = want
                changed = True
        if changed:
            os.pwrite(fd, encode_u64_table(table), off)
        want = e | COPIED if one(off) else e & ~COPIED
        if want != e:
            l1[i] = want
            l1_changed = True
    if l1_changed:
        os.fdatasync(fd)
        os.pwrite(fd, encode_u64_table(l1), hdr.l1_table_offset)
