"""QcowFile: reading and writing qcow2 images (versions 2 and 3).

Crash safety rests on one invariant, explained in DESIGN.md: the refcounts in memory are never
lower than the references held by the tables on disk. Refcount increments reach the disk before
the L2/L1 entries that need them (with ``fdatasync`` in between), and decrements are applied only
after the tables that dropped the reference are durable. A killed process therefore leaves at
worst leaked clusters, never a cluster used twice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import zlib
from array import array
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from qcow import _header as H
from qcow._backing import BackingFile, RawBacking, detect_image_type, zero_fill
from qcow._mapping import MappingLayer
from qcow._state import pwrite_all
from qcow._tables import (
    COMPRESSED,
    COPIED,
    L2_RESERVED,
    OFFSET_MASK,
    ZERO,
    encode_u64_table,
)
from qcow.errors import (
    CorruptImage,
    Error,
    InvalidChain,
    InvalidImage,
    OutOfRange,
    ReadOnlyImage,
    UnsupportedFeature,
)

if TYPE_CHECKING:
    from qcow._check import CheckResult

__all__ = ["QcowFile"]

MAX_CHAIN_DEPTH = 32
DEFAULT_CLUSTER_SIZE = 65536


class QcowFile(MappingLayer):
    """An open qcow2 image: a virtual disk of :attr:`virtual_size` bytes.

    Use :meth:`open` or :meth:`create`. Thread-safe: one lock serialises requests, because a
    write may reallocate the clusters a concurrent read would be reading.

    The object also satisfies ``devices``' ``DiskBackend`` protocol (``read_into``,
    ``write_from``, ``size``, ``read_only``...), so virtio-block can use it directly.
    """

    def __init__(
        self,
        path: str,
        fd: int,
        header: H.Header,
        writable: bool,
        backing: BackingFile | None,
        cache_bytes: int | None = None,
    ) -> None:
        super().__init__(path, fd, header, writable, backing, cache_bytes)
        self._load_tables()

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        writable: bool = False,
        *,
        lock: bool = True,
        cache_bytes: int | None = None,
        _depth: int = 0,
        _seen: frozenset[str] = frozenset(),
    ) -> QcowFile:
        """Open an existing image; its backing chain is opened read-only.

        An image whose dirty bit is set (lazy refcounts, not closed cleanly) has its refcounts
        rebuilt when opened writable, as the spec requires; read-only opens do not need them.

        ``cache_bytes`` bounds each metadata cache (L2 tables, refcount blocks; 8 MiB each by
        default, which maps 4 TiB of guest disk at 64 KiB clusters). ``lock`` takes a
        ``flock`` (exclusive when writable), as crosvm does.
        """
        spath = os.fspath(path)
        real = os.path.realpath(spath)
        if real in _seen:
            raise InvalidChain(spath, "the backing chain contains a loop")
        if _depth > MAX_CHAIN_DEPTH:
            raise InvalidChain(spath, f"backing chain deeper than {MAX_CHAIN_DEPTH}")
        fd = os.open(spath, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        backing: BackingFile | None = None
        try:
            if lock:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                except BlockingIOError as err:
                    raise Error(
                        f"{spath}: image is in use by another process", errno.EAGAIN
                    ) from err
            hdr = H.read_header(fd, os.fstat(fd).st_size)
            if writable and hdr.incompatible_features & H.INCOMPAT_CORRUPT:
                raise CorruptImage("image is marked corrupt; it may only be opened read-only")
            if hdr.backing_file:
                backing = _open_backing(spath, hdr, _depth, _seen | {real}, lock)
            qf = cls(spath, fd, hdr, writable, backing, cache_bytes)
        except BaseException:
            if backing is not None:
                backing.close()
            os.close(fd)
            raise
        if writable and hdr.incompatible_features & H.INCOMPAT_DIRTY:
            try:
                qf._repair_dirty()
            except BaseException:
                qf.close()
                raise
        return qf

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size: int | None = None,
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
        backing_file: str | None = None,
        backing_format: str | None = None,
        refcount_bits: int = 16,
        *,
        version: int = 3,
        lazy_refcounts: bool = False,
        cache_bytes: int | None = None,
    ) -> QcowFile:
        """Create a new, empty image (replacing ``path``) and return it open for writing.

        ``size`` may be omitted when ``backing_file`` is given: the backing file's size is used.
        A relative ``backing_file`` is stored as given and resolved against the image's
        directory, as qemu-img does.
        """
        from qcow._create import write_new_image

        spath = os.fspath(path)
        if size is None:
            if backing_file is None:
                raise ValueError("size is required without a backing file")
            size = _backing_size(spath, backing_file, backing_format)
        write_new_image(
            spath,
            size,
            cluster_size=cluster_size,
            backing_file=backing_file,
            backing_format=backing_format,
            refcount_bits=refcount_bits,
            version=version,
            lazy_refcounts=lazy_refcounts,
        )
        return cls.open(spath, writable=True, cache_bytes=cache_bytes)

    # ------------------------------------------------------------------ fd protocol

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "qcow2 image is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def keep_fds(self) -> list[int]:
        """Every fd this image needs, backing chain included (for a sandbox closing the rest)."""
        fds = [self.fileno()]
        if self._backing is not None:
            fds.extend(self._backing.keep_fds())
        return fds

    def close(self) -> None:
        """Write back all metadata, clear the dirty bit, and close the chain. Idempotent."""
        if self._fd < 0:
            return
        try:
            with self._lock:
                if self._writable:
                    self._write_metadata()
                    self._persist_refcounts()  # the deferred decrements
                    if self._lazy and self._modified:
                        self._persist_refcounts(force_sync=True)
                        self._set_incompat(self._hdr.incompatible_features & ~H.INCOMPAT_DIRTY)
                    if self._data_unsynced or self._modified:
                        self._sync()
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)
            if self._backing is not None:
                self._backing.close()

    def __enter__(self) -> QcowFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self._writable else "ro")
        return f"<QcowFile {self._path!r} {self._hdr.size} bytes {state}>"

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        return self._path

    @property
    def virtual_size(self) -> int:
        return self._hdr.size

    def size(self) -> int:
        """The virtual size (DiskBackend protocol)."""
        return self._hdr.size

    @property
    def read_only(self) -> bool:
        return not self._writable

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def header(self) -> H.Header:
        """The decoded header (read it, do not modify it)."""
        return self._hdr

    @property
    def backing(self) -> BackingFile | None:
        return self._backing

    def allocated_bytes(self) -> int:
        """Guest bytes stored in this image itself (not the backing file, not zero clusters)."""
        with self._lock:
            self.fileno()
            total = 0
            for l1i, e in enumerate(self._l1):
                if not e & OFFSET_MASK:
                    continue
                table = self._load_l2(l1i)
                for entry in table:
                    if entry & COMPRESSED or (entry & OFFSET_MASK and not entry & ZERO):
                        total += self._cs
            return min(total, -(-self._hdr.size // self._cs) * self._cs)

    # ------------------------------------------------------------------ reads

    def read_at(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (short only at the end of the disk)."""
        length = max(0, min(length, self._hdr.size - offset))
        buf = bytearray(length)
        n = self.readinto_at(memoryview(buf), offset)
        return bytes(buf[:n])

    def readinto_at(self, buf: memoryview | bytearray, offset: int) -> int:
        """Fill ``buf`` from guest ``offset``; returns bytes read (short only at end of disk).

        Allocated clusters are read with ``os.preadv`` straight into ``buf`` (no copy), and
        physically contiguous clusters are read with one call.
        """
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if offset < 0 or offset > self._hdr.size:
            raise OutOfRange(offset, len(mv), self._hdr.size)
        n = min(len(mv), self._hdr.size - offset)
        with self._lock:
            self.fileno()
            self._read(mv[:n], offset)
        return n

    def _read(self, mv: memoryview, offset: int) -> None:
        n = len(mv)
        cb, cs, cmask, l2b, l2mask, l2n = (
            self._cb,
            self._cs,
            self._cmask,
            self._l2b,
            self._l2mask,
            self._l2n,
        )
        fd = self._fd
        pos = 0
        while pos < n:
            guest = offset + pos
            cl = guest >> cb
            l1i = cl >> l2b
            l2i = cl & l2mask
            in_off = guest & cmask
            table = (
                self._load_l2(l1i) if l1i < len(self._l1) and self._l1[l1i] & OFFSET_MASK else None
            )
            # the bytes of this request covered by this L2 table
            span_end = min(n, pos + ((l2n - l2i) << cb) - in_off)
            if table is None:
                self._read_unallocated(mv[pos:span_end], guest)
                pos = span_end
                continue
            while pos < span_end:
                chunk = min(cs - in_off, span_end - pos)
                e = table[l2i]
                host = e & OFFSET_MASK
                if host and not e & (ZERO | COMPRESSED):
                    self._check_host(host, e, offset + pos)
                    # extend over physically contiguous clusters
                    end = pos + chunk
                    nxt = host + cs
                    j = l2i + 1
                    while end < span_end and nxt < self._file_end:
                        e2 = table[j]
                        if e2 & (OFFSET_MASK | ZERO | COMPRESSED | L2_RESERVED) != nxt:
                            break
                        end = min(span_end, end + cs)
                        nxt += cs
                        j += 1
                    want = end - pos
                    got = os.preadv(fd, [mv[pos:end]], host + in_off)
                    if got < want:
                        self._short_read(mv[pos:end], got, host + in_off)
                    l2i = j
                    pos = end
                    in_off = 0
                    continue
                if e & COMPRESSED:
                    data = self._decompress(e)
                    mv[pos : pos + chunk] = data[in_off : in_off + chunk]
                elif e & ZERO and self._v3:
                    zero_fill(mv[pos : pos + chunk])
                elif host:
                    # v2 image with bit 0 set: reserved, ignore it
                    self._check_host(host, e, offset + pos)
                    got = os.preadv(fd, [mv[pos : pos + chunk]], host + in_off)
                    if got < chunk:
                        self._short_read(mv[pos : pos + chunk], got, host + in_off)
                else:
                    if e:  # COPIED (or reserved bits) without an offset
                        raise CorruptImage(
                            f"L2 entry for guest offset {offset + pos:#x} is invalid", e
                        )
                    # unallocated: extend over following unallocated entries
                    end = pos + chunk
                    j = l2i + 1
                    while end < span_end and not table[j]:
                        end = min(span_end, end + cs)
                        j += 1
                    self._read_unallocated(mv[pos:end], offset + pos)
                    l2i = j
                    pos = end
                    in_off = 0
                    continue
                pos += chunk
                l2i += 1
                in_off = 0

    def _short_read(self, mv: memoryview, got: int, host: int) -> None:
        """Finish a read interrupted early: retry, and read zeros past the end of the file."""
        want = len(mv)
        while got < want:
            more = os.preadv(self._fd, [mv[got:]], host + got)
            if more <= 0:
                zero_fill(mv[got:])
                return
            got += more

    def _read_unallocated(self, mv: memoryview, guest: int) -> None:
        b = self._backing
        if b is None:
            zero_fill(mv)
            return
        bsize = b.virtual_size
        inside = max(0, min(len(mv), bsize - guest))
        if inside:
            b.readinto_at(mv[:inside], guest)
        if inside < len(mv):
            zero_fill(mv[inside:])

    def _check_host(self, host: int, entry: int, guest: int) -> None:
        """Reject an L2 entry that points into the header or past the end of the file."""
        if host < self._cs or host >= self._file_end or entry & L2_RESERVED or host & self._cmask:
            if host & self._cmask:
                raise CorruptImage(f"L2 entry for guest offset {guest:#x} is misaligned", host)
            # the file may have grown behind our back (another process cannot: we hold a lock)
            self._file_end = max(self._file_end, os.fstat(self._fd).st_size)
            if host < self._cs or host >= self._file_end:
                raise CorruptImage(
                    f"L2 entry for guest offset {guest:#x} points outside the image", host
                )
            if entry & L2_RESERVED:
                raise CorruptImage(f"L2 entry for guest offset {guest:#x} has reserved bits", host)

    def _decompress(self, entry: int) -> bytes:
        host, length = self._compressed_range(entry)
        if host == self._zc_host:
            return self._zc_data
        if host < self._cs or host >= self._file_end:
            raise CorruptImage("compressed cluster points outside the image", host)
        raw = os.pread(self._fd, length, host)
        try:
            d = zlib.decompressobj(-15)
            data = d.decompress(raw, self._cs)
        except zlib.error as err:
            raise CorruptImage(f"compressed cluster does not inflate: {err}", host) from err
        if len(data) != self._cs:
            raise CorruptImage("compressed cluster inflates to less than a cluster", host)
        self._zc_host, self._zc_data = host, data
        return data

    # ------------------------------------------------------------------ DiskBackend

    def read_into(self, iovecs: Sequence[memoryview], offset: int) -> int:
        """Fill several buffers from consecutive guest bytes (virtio-block's request shape)."""
        total = 0
        for iov in iovecs:
            got = self.readinto_at(iov, offset + total)
            total += got
            if got < len(iov):
                break
        return total

    def write_from(self, iovecs: Sequence[memoryview], offset: int) -> int:
        """Write several buffers to consecutive guest bytes."""
        total = sum(len(iov) for iov in iovecs)
        if offset < 0 or offset + total > self._hdr.size:
            raise OutOfRange(offset, total, self._hdr.size)
        done = 0
        for iov in iovecs:
            done += self.write_at(iov, offset + done)
        return done

    # ------------------------------------------------------------------ writes

    def _check_writable(self, offset: int, length: int) -> None:
        self.fileno()
        if not self._writable:
            raise ReadOnlyImage()
        if offset < 0 or length < 0 or offset + length > self._hdr.size:
            raise OutOfRange(offset, length, self._hdr.size)

    def write_at(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at guest ``offset``; returns ``len(data)``.

        Data goes straight to clusters this image owns alone; anything else (unallocated, zero,
        compressed or shared clusters) gets a new cluster, filled by copy-on-write.
        """
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        with self._lock:
            self._check_writable(offset, n)
            if n == 0:
                return 0
            if self._write_in_place_fast(mv, offset):
                return n
            self._validate_range(offset, n)
            self._begin_modify()
            self._write(mv, offset)
            self._data_unsynced = True
        return n

    def _write_in_place_fast(self, mv: memoryview, offset: int) -> bool:
        """A request inside one cluster we own alone, whose L2 table is cached: just pwrite.

        The common case of a guest rewriting its own blocks; it skips the general path's
        bookkeeping but makes exactly the same checks (a data cluster with refcount 1 can only
        be reached through one L2 table, so that table needs no copy-on-write).
        """
        cb = self._cb
        cl = offset >> cb
        if (offset + len(mv) - 1) >> cb != cl or not self._modified:
            return False
        table = self._l2.get(self._l1[cl >> self._l2b] & OFFSET_MASK)
        if table is None:
            return False
        e = table[cl & self._l2mask]
        host = e & OFFSET_MASK
        if (
            not e & COPIED
            or e & (ZERO | COMPRESSED | L2_RESERVED)
            or host & self._cmask
            or not self._cs <= host < self._file_end
            or (host >> cb) in self._meta
            or self._get_refcount(host >> cb) != 1
        ):
            return False
        self._pwritev(mv, host + (offset & self._cmask))
        return True

    def _validate_range(self, offset: int, length: int) -> None:
        """Load and check every table entry a request will use, before anything is written.

        This is what makes "an error never leaves the file modified" true: corrupt metadata in
        the middle of a request is found before the first byte of the request is written.
        """
        cb, l2b, l2mask = self._cb, self._l2b, self._l2mask
        first = offset >> cb
        last = (offset + length - 1) >> cb
        for cl in range(first, last + 1):
            l1i = cl >> l2b
            if l1i >= len(self._l1) or not self._l1[l1i] & OFFSET_MASK:
                continue
            e = self._load_l2(l1i)[cl & l2mask]
            if not e:
                continue
            if e & COMPRESSED:
                host, _ = self._compressed_range(e)
                if host < self._cs or host >= self._file_end:
                    raise CorruptImage("compressed cluster points outside the image", host)
                continue
            host = e & OFFSET_MASK
            if not host and e & ~ZERO:
                raise CorruptImage(f"L2 entry for guest offset {cl << cb:#x} is invalid", e)
            if host:
                self._check_host(host, e, cl << cb)
                if (host >> cb) in self._meta:
                    raise CorruptImage("a data cluster overlaps image metadata", host)
                if e & COPIED and self._get_refcount(host >> cb) == 0:
                    raise CorruptImage("allocated cluster has refcount 0", host)

    def _begin_modify(self) -> None:
        """First modification: clear unknown autoclear bits; with lazy refcounts, set dirty."""
        if self._modified:
            return
        hdr = self._hdr
        if hdr.autoclear_features:
            # We do not maintain bitmaps: the spec says clear the bit before writing.
            hdr.autoclear_features = 0
            self._write_header_fixed()
        if self._lazy:
            self._set_incompat(hdr.incompatible_features | H.INCOMPAT_DIRTY)
        self._modified = True

    def _write(self, mv: memoryview, offset: int) -> None:
        n = len(mv)
        cb, cs, cmask, l2b, l2mask, l2n = (
            self._cb,
            self._cs,
            self._cmask,
            self._l2b,
            self._l2mask,
            self._l2n,
        )
        pos = 0
        while pos < n:
            guest = offset + pos
            cl = guest >> cb
            l1i = cl >> l2b
            l2i = cl & l2mask
            in_off = guest & cmask
            table = self._writable_l2(l1i)
            span_end = min(n, pos + ((l2n - l2i) << cb) - in_off)
            while pos < span_end:
                chunk = min(cs - in_off, span_end - pos)
                e = table[l2i]
                if self._owned(e):
                    host = e & OFFSET_MASK
                    end = pos + chunk
                    nxt = host + cs
                    j = l2i + 1
                    while end < span_end and table[j] & (OFFSET_MASK | ZERO | COMPRESSED) == nxt:
                        if not self._owned(table[j]):
                            break
                        end = min(span_end, end + cs)
                        nxt += cs
                        j += 1
                    self._pwritev(mv[pos:end], host + in_off)
                    l2i, pos, in_off = j, end, 0
                    continue
                if chunk == cs:
                    # whole clusters needing allocation: allocate a run, write it in one go
                    k = 1
                    while pos + (k + 1) * cs <= span_end and not self._owned(table[l2i + k]):
                        k += 1
                    hosts = [self._alloc() for _ in range(k)]
                    start = 0
                    while start < k:
                        stop = start + 1
                        while stop < k and hosts[stop] == hosts[stop - 1] + 1:
                            stop += 1
                        self._pwritev(mv[pos + start * cs : pos + stop * cs], hosts[start] << cb)
                        start = stop
                    for i, h in enumerate(hosts):
                        old = table[l2i + i]
                        table[l2i + i] = (h << cb) | COPIED
                        self._release(old)
                    self._l2.dirty.add(self._l1[l1i] & OFFSET_MASK)
                    l2i += k
                    pos += k * cs
                    continue
                # partial cluster: copy-on-write of whatever the cluster reads as now
                h = self._alloc()
                if (
                    self._reads_zero(e, offset + pos - in_off)
                    and (h << cb) >= os.fstat(self._fd).st_size
                ):
                    # a cluster past the end of the file is a hole: only the data is written
                    self._pwritev(mv[pos : pos + chunk], (h << cb) + in_off)
                else:
                    base = bytearray(cs)
                    self._cluster_content(memoryview(base), e, offset + pos - in_off)
                    base[in_off : in_off + chunk] = mv[pos : pos + chunk]
                    self._pwritev(memoryview(base), h << cb)
                table[l2i] = (h << cb) | COPIED
                self._release(e)
                self._l2.dirty.add(self._l1[l1i] & OFFSET_MASK)
                pos += chunk
                l2i += 1
                in_off = 0

    def _owned(self, e: int) -> bool:
        """True if the cluster may be written in place: ours alone (COPIED, refcount 1)."""
        if not e & COPIED or e & (ZERO | COMPRESSED):
            return False
        host = e & OFFSET_MASK
        return bool(host) and self._get_refcount(host >> self._cb) == 1

    def _reads_zero(self, e: int, guest: int) -> bool:
        """True if a guest cluster with L2 entry ``e`` reads as zeros without any I/O."""
        if e & ZERO and self._v3 and not e & COMPRESSED:
            return True
        return not e and self._reads_zero_unallocated(guest >> self._cb)

    def _cluster_content(self, out: memoryview, e: int, guest: int) -> None:
        """What a guest cluster reads as now (for copy-on-write of a partial write)."""
        if e & COMPRESSED:
            out[:] = self._decompress(e)
        elif e & ZERO and self._v3:
            return  # out is already zeros
        elif e & OFFSET_MASK:
            host = e & OFFSET_MASK
            got = os.preadv(self._fd, [out], host)
            if got < len(out):
                self._short_read(out, got, host)
        else:
            end = min(len(out), self._hdr.size - guest)
            self._read_unallocated(out[:end], guest)

    # ------------------------------------------------------------------ discard / zeroes

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads as zeros afterwards (as write_zeroes with unmap)."""
        self.write_zeroes(offset, length, unmap=True)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make a range read as zeros, with zero clusters (v3) rather than written zeros.

        Whole clusters lose their data cluster (freed once the L2 update is durable) and get
        the zero flag; the edges of the range are written as zeros. On version 2 images, which
        have no zero flag, a cluster can only be deallocated if there is no backing file.
        ``unmap`` is accepted for the DiskBackend protocol: clusters are always released.
        """
        del unmap
        with self._lock:
            self._check_writable(offset, length)
            if length == 0:
                return
            self._validate_range(offset, length)
            self._begin_modify()
            self._zero_range(offset, length)

    def _zero_range(self, offset: int, length: int) -> None:
        """write_zeroes without the checks (the caller validated the range)."""
        cb, cmask = self._cb, self._cmask
        end = offset + length
        first_full = (offset + cmask) & ~cmask
        # the disk's last cluster may be partial: zeroing up to the end zeroes all of it
        full_end = (end + cmask) & ~cmask if end == self._hdr.size else end & ~cmask
        if offset < first_full:
            self._zero_partial(offset, min(end, first_full) - offset)
        if first_full <= full_end < end:
            self._zero_partial(full_end, end - full_end)
        cl, last = first_full >> cb, full_end >> cb
        while cl < last:
            l1i = cl >> self._l2b
            if not self._l1[l1i] & OFFSET_MASK and self._reads_zero_unallocated(cl):
                cl = (l1i + 1) << self._l2b  # a whole L2 range that already reads as zeros
                continue
            self._zero_cluster(cl)
            cl += 1

    def _zero_partial(self, offset: int, length: int) -> None:
        cl = offset >> self._cb
        e = self._entry(cl)
        if (e & ZERO and self._v3) or (not e and self._reads_zero_unallocated(cl)):
            return
        self._write(memoryview(bytes(length)), offset)
        self._data_unsynced = True

    def _reads_zero_unallocated(self, cl: int) -> bool:
        b = self._backing
        return b is None or (cl << self._cb) >= b.virtual_size

    def _zero_cluster(self, cl: int) -> None:
        e = self._entry(cl)
        unalloc_zero = self._reads_zero_unallocated(cl)
        if self._v3:
            if e & ZERO and not e & (OFFSET_MASK | COMPRESSED):
                return
            if not e and unalloc_zero:
                return  # unallocated without backing data: already zeros
            new = ZERO
        else:
            if not unalloc_zero:
                self._write(memoryview(bytes(self._cs)), cl << self._cb)
                self._data_unsynced = True
                return
            if not e:
                return
            new = 0
        table = self._writable_l2(cl >> self._l2b)
        l2i = cl & self._l2mask
        old = table[l2i]
        table[l2i] = new
        self._release(old)
        self._l2.dirty.add(self._l1[cl >> self._l2b] & OFFSET_MASK)

    # ------------------------------------------------------------------ resize / flush

    def resize(self, new_size: int) -> None:
        """Grow the virtual disk (shrinking is not supported: it would drop guest data)."""
        with self._lock:
            self.fileno()
            if not self._writable:
                raise ReadOnlyImage()
            if new_size < self._hdr.size:
                raise UnsupportedFeature("shrinking an image")
            if new_size > H.MAX_VIRTUAL_SIZE:
                raise OutOfRange(new_size, 0, H.MAX_VIRTUAL_SIZE)
            old = self._hdr.size
            if new_size == old:
                return
            per_l1 = self._cs * self._l2n
            need = -(-new_size // per_l1)
            if need * 8 > H.MAX_L1_BYTES:
                raise OutOfRange(new_size, 0, H.MAX_L1_BYTES // 8 * per_l1)
            # The new area must read as zeros, but two things could show through: the rest of
            # a partial last cluster, and a backing file larger than the old size.
            zero_end = min(new_size, (old + self._cmask) & ~self._cmask)
            if self._backing is not None:
                zero_end = max(zero_end, min(new_size, self._backing.virtual_size))
            if zero_end > old:
                self._validate_range(old, zero_end - old)
            self._begin_modify()
            if need > len(self._l1):
                self._grow_l1(need)
            if zero_end > old:
                # zeroed (and made durable) before the header shows the new size
                self._hdr.size = new_size
                try:
                    self._zero_range(old, zero_end - old)
                finally:
                    self._hdr.size = old
                self._write_metadata()
                self._persist_refcounts()
            self._hdr.size = new_size
            self._write_header_fixed()
            self._sync()

    def _grow_l1(self, entries: int) -> None:
        # Everything the new L1 will point to must be on disk first.
        self._write_metadata()
        cs, cb = self._cs, self._cb
        nclusters = -(-(entries * 8) // cs)
        first = self._alloc_contiguous(nclusters)
        self._meta.update(range(first, first + nclusters))
        new_l1 = array("Q", self._l1)
        new_l1.extend([0] * (entries - len(self._l1)))
        self._persist_refcounts(force_sync=True)
        raw = encode_u64_table(new_l1)
        pwrite_all(self._fd, raw + bytes(nclusters * cs - len(raw)), first << cb)
        self._file_end = max(self._file_end, (first + nclusters) << cb)
        self._sync()
        old_off, old_size = self._hdr.l1_table_offset, self._hdr.l1_size
        self._hdr.l1_table_offset = first << cb
        self._hdr.l1_size = entries
        self._write_header_fixed()
        self._sync()
        self._l1 = new_l1
        self._l1_dirty.clear()
        if old_size:
            for c in range(old_off >> cb, (old_off + old_size * 8 - 1 >> cb) + 1):
                self._pending_free.append(c)

    def flush(self) -> None:
        """Make every completed write durable (metadata in crash-safe order, then fdatasync)."""
        with self._lock:
            self.fileno()
            if not self._writable:
                return
            self._write_metadata()
            if not self._lazy:
                self._persist_refcounts()  # the deferred decrements: no leaks after a flush
            if self._data_unsynced:
                self._sync()

    # ------------------------------------------------------------------ check

    def check(self, *, repair: bool = False) -> CheckResult:
        """Cross-check refcounts against every reference; optionally rebuild the refcounts.

        Returns a :class:`qcow.CheckResult` with the counts of leaks and corruptions.
        """
        from qcow._check import check_image

        with self._lock:
            self.fileno()
            if repair and not self._writable:
                raise ReadOnlyImage("repair needs the image opened writable")
            if self._writable:
                self._write_metadata()
                self._persist_refcounts()
            result = check_image(self, repair=repair)
            return result

    def _repair_dirty(self) -> None:
        from qcow._check import check_image

        check_image(self, repair=True)
        self._set_incompat(self._hdr.incompatible_features & ~H.INCOMPAT_DIRTY)
        self._sync()

    # ------------------------------------------------------------------ L1 / L2 tables

    # ------------------------------------------------------------------ refcounts

    # ------------------------------------------------------------------ metadata write-back

    # ------------------------------------------------------------------ header


def _resolve_backing(image_path: str, name: str) -> str:
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def _open_backing(
    image_path: str, hdr: H.Header, depth: int, seen: frozenset[str], lock: bool
) -> BackingFile:
    assert hdr.backing_file is not None
    name = hdr.backing_file
    if ":" in name.split("/", 1)[0] and not os.path.exists(_resolve_backing(image_path, name)):
        raise InvalidChain(name, "protocol prefixes (json:, nbd:...) are not supported")
    path = _resolve_backing(image_path, name)
    if not os.path.exists(path):
        raise InvalidChain(name, f"not found (looked at {path})")
    fmt = hdr.backing_format or detect_image_type(path)
    if fmt == "raw":
        return RawBacking(path)
    if fmt != "qcow2":
        raise UnsupportedFeature(f"backing format {fmt!r}")
    try:
        return QcowFile.open(path, writable=False, lock=lock, _depth=depth + 1, _seen=seen)
    except InvalidImage as err:
        raise InvalidChain(name, str(err)) from err


def _backing_size(image_path: str, backing_file: str, backing_format: str | None) -> int:
    path = _resolve_backing(image_path, backing_file)
    if not os.path.exists(path):
        raise InvalidChain(backing_file, f"not found (looked at {path})")
    fmt = backing_format or detect_image_type(path)
    if fmt == "raw":
        return os.stat(path).st_size
    with QcowFile.open(path, writable=False, lock=False) as b:
        return b.virtual_size
