"""virtio-block (device type 2) over a :class:`~devices.virtio.DiskBackend`.

Requests are served in the device's worker thread; data moves between the image and guest RAM
with ``preadv``/``pwritev`` on memoryviews of the shared guest mapping (no intermediate copy).
Every guest-supplied number is checked: a request outside the disk, a malformed header or
segment list, or a write to a read-only disk completes with ``VIRTIO_BLK_S_IOERR`` (or
``UNSUPP`` for unknown types) and the image is left untouched.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from devices.virtio._block_ring import RingIo
from devices.virtio._constants import DeviceType
from devices.virtio._device import RING_FEATURES, ThreadedVirtioDevice
from devices.virtio._disk import DiskBackend, RawDisk, open_disk
from devices.virtio._errors import ChainTooShort
from devices.virtio._queue import DescriptorChain, Queue
from devices.virtio._reader_writer import Reader, Writer
from sys_util import AsRawFd

__all__ = [
    "QUEUE_SIZE",
    "SECTOR_SIZE",
    "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_DISCARD",
    "VIRTIO_BLK_F_FLUSH",
    "VIRTIO_BLK_F_RO",
    "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_WRITE_ZEROES",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "Block",
    "DiskBackend",
    "RawDisk",
    "open_disk",
]

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
QUEUE_SIZE = 256

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

MAX_DISCARD_SECTORS = 0x3FFF_FFFF
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB, the host page / typical fs block
MAX_WRITE_ZEROES_SECTORS = 0x3FFF_FFFF
MAX_WRITE_ZEROES_SEG = 32

_REQ_HEADER = struct.Struct("<IIQ")
#: What a request on the ring carries: its chain, the guest address of its status byte, and the
#: bytes written into the chain when it succeeds (data + status).
_Token = tuple[DescriptorChain, int, int]
#: A read or write ready for the ring: (type, byte offset, length, buffers, token).
_Plan = tuple[int, int, int, list[memoryview], _Token]
#: Requests that must not start before everything queued ahead of them finished.
_BARRIERS = (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES)
#: Requests of one batch served at once: preadv/pwritev release the GIL, so a guest with a deep
#: queue keeps the disk busy instead of waiting for one request at a time.
IO_WORKERS = 4
#: Adjacent reads (or writes) of one batch are merged into one transfer of at most this many
#: bytes and IOV_MAX buffers.
MERGE_MAX_BYTES = 32 << 20
MERGE_MAX_IOVECS = 1024
_SEGMENT = struct.Struct("<QII")
# capacity, size_max, seg_max, geometry(c,h,s), blk_size, topology(4 fields), writeback,
# unused0, num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3]
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert _CONFIG.size == 60


class _Run:
    """Adjacent requests of one type merged into one transfer (see ``Block._start_batch``)."""

    __slots__ = ("end", "iovecs", "kind", "length", "offset", "tokens")

    def __init__(
        self, kind: int, offset: int, length: int, iovecs: list[memoryview], token: _Token
    ) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        self.end = offset + length
        self.iovecs = iovecs
        self.tokens = [token]

    def add(self, length: int, iovecs: list[memoryview], token: _Token) -> None:
        self.length += length
        self.end += length
        self.iovecs += iovecs
        self.tokens.append(token)


class Block(ThreadedVirtioDevice):
    """A virtio-block device for one disk image.

    ``Block.open(path, read_only=...)`` opens (and locks) a raw image; or pass any
    :class:`DiskBackend`. :meth:`resize` changes the capacity and notifies the guest.
    """

    def __init__(
        self,
        disk: DiskBackend,
        *,
        serial: str | None = None,
        queue_size: int = QUEUE_SIZE,
        use_io_uring: bool = True,
    ) -> None:
        self._disk = disk
        self._queue_size = queue_size
        self._read_only = disk.read_only
        self._size = disk.size()
        self._id = self._make_id(serial)
        self._io: ThreadPoolExecutor | None = None
        self._use_ring = use_io_uring
        self._ring: RingIo[list[_Token]] | None = None
        super().__init__()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        direct: bool = False,
        cold_reads_direct: bool = True,
        serial: str | None = None,
        use_io_uring: bool = True,
    ) -> Block:
        """Open (and lock) a raw or qcow2 image; see :func:`open_disk` for ``direct`` and
        ``cold_reads_direct``. ``use_io_uring=False`` serves batches with a thread pool even
        where io_uring works."""
        disk = open_disk(
            path, read_only=read_only, direct=direct, cold_reads_direct=cold_reads_direct
        )
        return cls(disk, serial=serial, use_io_uring=use_io_uring)

    def _make_id(self, serial: str | None) -> bytes:
        if serial is not None:
            raw = serial.encode()
        else:
            try:
                st = os.fstat(self._disk.fileno())
                raw = f"{st.st_dev:x}{st.st_rdev:x}{st.st_ino:x}".encode()
            except (OSError, AttributeError):
                raw = b""
        return raw[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\x00")

    # -- VirtioDevice ------------------------------------------------------------------------

    def debug_label(self) -> str:
        return "virtio-block"

    @property
    def device_type(self) -> int:
        return DeviceType.BLOCK

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return [self._queue_size]

    @property
    def disk(self) -> DiskBackend:
        return self._disk

    @property
    def read_only(self) -> bool:
        return self._read_only

    def features(self) -> int:
        f = RING_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
        f |= 1 << VIRTIO_BLK_F_FLUSH
        if self._read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        else:
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        return f

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self._size >> SECTOR_SHIFT

    def config_space(self) -> bytes:
        return _CONFIG.pack(
            self.capacity,
            0,  # size_max (feature not offered)
            self._queue_size - 2,  # seg_max: header and status take two descriptors
            0, 0, 0,  # geometry
            SECTOR_SIZE,
            0, 0, 0, 0,  # topology
            0,  # writeback
            0,
            1,  # num_queues
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,  # write_zeroes_may_unmap
        )  # fmt: skip

    def keep_fds(self) -> list[int]:
        keep = getattr(self._disk, "keep_fds", None)
        if callable(keep):
            fds: list[int] = keep()
            return fds
        return [self._disk.fileno()]

    def close(self) -> None:
        self.reset()
        self._disk.close()

    # -- resize --------------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow or shrink the image to ``new_size`` bytes and raise a config-change interrupt."""
        self._disk.resize(new_size)
        self._size = self._disk.size()
        interrupt = self.interrupt
        if interrupt is not None:
            interrupt.signal_config_changed()

    # -- request processing ----------------------------------------------------------------------

    def process_queue(self, index: int, queue: Queue) -> None:
        interrupt = self.interrupt
        assert interrupt is not None
        ring = self._ring
        while True:
            before = queue.next_used
            batch: list[DescriptorChain] = []
            while (chain := queue.pop()) is not None:
                batch.append(chain)
            if ring is not None and (len(batch) > 1 or ring.in_flight):
                # Deep queue: everything goes to the ring at once; completions may come back
                # out of order (virtio allows it). One request alone is served in place below:
                # that is the lowest latency for a guest that waits for each request.
                self._start_batch(ring, queue, batch)
                ring.submit()
                self._publish(queue, ring.completions())
            else:
                # Completions are published here, in this one thread and in ring order; only
                # the requests' I/O runs on the pool.
                for chain, written in zip(batch, self._serve_batch(batch), strict=True):
                    queue.add_used(chain.head, written)
            if queue.next_used != before:  # served something (or completed a bad chain)
                queue.trigger_interrupt(interrupt)
            if not queue.enable_notification():
                return

    # -- the io_uring path (raw images) --------------------------------------------------------

    def on_activate(self) -> None:
        super().on_activate()
        if self._use_ring and isinstance(self._disk, RawDisk):
            try:
                self._ring = RingIo(self._disk)
            except OSError as err:  # no io_uring here (old kernel, sysctl, seccomp): threads
                self._ring = None
                self._use_ring = False
                self.log.warn("io_uring unavailable (%s): serving I/O with threads", err)

    def extra_poll_sources(self) -> list[tuple[int | AsRawFd, Callable[[], None]]]:
        ring = self._ring
        return [] if ring is None else [(ring.event, self._on_ring_event)]

    def _on_ring_event(self) -> None:
        ring, interrupt = self._ring, self.interrupt
        if ring is None or interrupt is None or not self.queues:
            return
        try:
            ring.event.read()
        except BlockingIOError:
            pass
        queue = self.queues[0]
        before = queue.next_used
        self._publish(queue, ring.completions())
        if queue.next_used != before:
            queue.trigger_interrupt(interrupt)

    def _start_batch(
        self, ring: RingIo[list[_Token]], queue: Queue, batch: list[DescriptorChain]
    ) -> None:
        """Queue ``batch`` on the ring, merging runs of adjacent reads (or writes) into one.

        A guest reading a file sequentially sends consecutive requests together; one ``readv``
        of their buffers end to end lets the disk see one large transfer instead of many
        (QEMU's virtio-blk does the same). Runs stop at IOV_MAX buffers or MERGE_MAX_BYTES;
        anything that is not a plain read or write ends the run first, so ordering holds.
        """
        run: _Run | None = None
        for chain in batch:
            plan = self._plan(chain)
            if plan is not None:
                kind, offset, length, iovecs, token = plan
                if (
                    run is not None
                    and run.kind == kind
                    and run.end == offset
                    and run.length + length <= MERGE_MAX_BYTES
                    and len(run.iovecs) + len(iovecs) <= MERGE_MAX_IOVECS
                ):
                    run.add(length, iovecs, token)
                    continue
                if run is not None:
                    self._queue_run(ring, queue, run)
                run = _Run(kind, offset, length, iovecs, token)
                continue
            if run is not None:
                self._queue_run(ring, queue, run)
                run = None
            self._start_other(ring, queue, chain)
        if run is not None:
            self._queue_run(ring, queue, run)

    def _plan(self, chain: DescriptorChain) -> _Plan | None:
        """``(type, offset, length, buffers, token)`` of a well-formed read or write, else None.

        Only the layout every driver uses is taken here: the 16-byte header alone in the first
        descriptor, the status byte last. Everything else goes the general way.
        """
        readable, writable, ram = chain.readable, chain.writable, chain.ram
        if not (readable and writable and readable[0][1] == _REQ_HEADER.size):
            return None
        header = ram.views(readable[0][0], _REQ_HEADER.size)
        if len(header) != 1:
            return None
        req_type, _reserved, sector = _REQ_HEADER.unpack(header[0])
        last_addr, last_len = writable[-1]
        status_addr = last_addr + last_len - 1
        if req_type == VIRTIO_BLK_T_IN:
            length = chain.writable_len - 1
            offset = self._check_range(sector, length)
            if offset is None or not length:
                return None
            segs = writable[:-1]
            if last_len > 1:
                segs.append((last_addr, last_len - 1))
            iovecs = [v for addr, n in segs for v in ram.views(addr, n)]
            return req_type, offset, length, iovecs, (chain, status_addr, length + 1)
        if req_type == VIRTIO_BLK_T_OUT and not self._read_only:
            length = chain.readable_len - _REQ_HEADER.size
            offset = self._check_range(sector, length)
            if offset is None or not length:
                return None
            iovecs = [v for addr, n in readable[1:] for v in ram.views(addr, n)]
            return req_type, offset, length, iovecs, (chain, status_addr, 1)
        return None

    def _queue_run(self, ring: RingIo[list[_Token]], queue: Queue, run: _Run) -> None:
        """Hand a run to the ring; if the ring is full, serve its requests in place."""
        if run.kind == VIRTIO_BLK_T_IN:
            queued = ring.read(run.tokens, run.iovecs, run.offset, run.length)
        else:
            queued = ring.write(run.tokens, run.iovecs, run.offset, run.length)
        if not queued:
            for chain, _status, _written in run.tokens:
                queue.add_used(chain.head, self.handle_request(chain))

    def _start_other(
        self, ring: RingIo[list[_Token]], queue: Queue, chain: DescriptorChain
    ) -> None:
        """A flush goes on the ring (drained behind everything before it); anything else, and
        anything malformed, is served in place, exactly as the synchronous path does."""
        req_type = self._request_type(chain)
        if req_type == VIRTIO_BLK_T_FLUSH and not self._read_only:
            writable = chain.writable
            if writable:
                last_addr, last_len = writable[-1]
                if ring.flush([(chain, last_addr + last_len - 1, 1)]):
                    return
        if ring.in_flight and req_type in _BARRIERS:
            # An ordering barrier: what was queued before must reach the disk first.
            self._publish(queue, ring.wait_all())
        queue.add_used(chain.head, self.handle_request(chain))

    def _publish(self, queue: Queue, done: list[tuple[list[_Token], str | None]]) -> None:
        for tokens, error in done:
            for chain, status_addr, written in tokens:
                if error is None:
                    status, length = VIRTIO_BLK_S_OK, written
                else:
                    self.log.warn("I/O error on request %d: %s", chain.head, error)
                    status, length = VIRTIO_BLK_S_IOERR, 1
                chain.ram.views(status_addr, 1)[0][0] = status
                queue.add_used(chain.head, length)

    def _serve_one(self, chain: DescriptorChain) -> int:
        """:meth:`handle_request` for a request alone (a guest at queue depth 1), a plain read
        or write taken the short way (:meth:`_plan`: no Reader/Writer objects, ~14 us less per
        request here). Returns what handle_request returns for the same chain."""
        plan = self._plan(chain)
        if plan is None:
            return self.handle_request(chain)
        kind, offset, length, iovecs, (_chain, status_addr, written) = plan
        status = VIRTIO_BLK_S_OK
        try:
            if kind == VIRTIO_BLK_T_IN:
                if self._disk.read_into(iovecs, offset) != length:
                    status = VIRTIO_BLK_S_IOERR
            else:
                self._disk.write_from(iovecs, offset)
        except OSError as err:
            self.log.warn("I/O error on request %d: %s", chain.head, err)
            status = VIRTIO_BLK_S_IOERR
        chain.ram.views(status_addr, 1)[0][0] = status
        return written

    def _serve_batch(self, batch: list[DescriptorChain]) -> Iterator[int]:
        """Bytes written into each chain, in order. Reads and writes run concurrently; a flush,
        discard or write-zeroes waits for everything before it (an ordering barrier)."""
        if len(batch) == 1:
            yield self._serve_one(batch[0])
            return
        if self._io is None:
            self._io = ThreadPoolExecutor(IO_WORKERS, thread_name_prefix=self.debug_label())
        run: list[DescriptorChain] = []
        for chain in batch:
            if self._request_type(chain) in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
                run.append(chain)
                continue
            yield from self._io.map(self.handle_request, run)
            run = []
            yield self.handle_request(chain)
        yield from self._io.map(self.handle_request, run)

    @staticmethod
    def _request_type(chain: DescriptorChain) -> int | None:
        try:
            req_type: int = _REQ_HEADER.unpack(chain.reader().read_exact(_REQ_HEADER.size))[0]
        except ChainTooShort:
            return None  # handle_request reports it, in order
        return req_type

    def on_reset(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()  # waits for requests in flight: they write guest memory
        io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=True)
        super().on_reset()

    def handle_request(self, chain: DescriptorChain) -> int:
        """Execute one request; return the number of bytes written into the chain."""
        writable = chain.writable
        room = chain.writable_len
        if room < 1:
            self.log.warn("request %d has no room for a status byte", chain.head)
            return 0
        # The status byte is the last writable byte; the data area is everything before it.
        last_addr, last_len = writable[-1]
        data_segs = writable[:-1]
        if last_len > 1:
            data_segs.append((last_addr, last_len - 1))
        writer = Writer(chain.ram, data_segs, room - 1)
        reader = chain.reader()
        try:
            status = self._execute(reader, writer)
        except ChainTooShort as err:
            self.log.warn("malformed request %d: %s", chain.head, err)
            status = VIRTIO_BLK_S_IOERR
        except OSError as err:
            self.log.warn("I/O error on request %d: %s", chain.head, err)
            status = VIRTIO_BLK_S_IOERR
        chain.ram.views(last_addr + last_len - 1, 1)[0][0] = status
        return writer.bytes_written + 1

    def _check_range(self, sector: int, length: int) -> int | None:
        offset = sector << SECTOR_SHIFT
        if length % SECTOR_SIZE or offset + length > self._size:
            return None
        return offset

    def _execute(self, reader: Reader, writer: Writer) -> int:
        req_type, _reserved, sector = _REQ_HEADER.unpack(reader.read_exact(_REQ_HEADER.size))
        disk = self._disk
        if req_type == VIRTIO_BLK_T_IN:
            length = writer.available_bytes()
            offset = self._check_range(sector, length)
            if offset is None:
                self.log.warn("read of %d bytes at sector %d beyond capacity", length, sector)
                return VIRTIO_BLK_S_IOERR
            if length == 0:
                return VIRTIO_BLK_S_OK
            got = disk.read_into(writer.get_iovecs(length), offset)
            return VIRTIO_BLK_S_OK if got == length else VIRTIO_BLK_S_IOERR
        if req_type == VIRTIO_BLK_T_OUT:
            if self._read_only:
                return VIRTIO_BLK_S_IOERR
            length = reader.available_bytes()
            offset = self._check_range(sector, length)
            if offset is None:
                self.log.warn("write of %d bytes at sector %d beyond capacity", length, sector)
                return VIRTIO_BLK_S_IOERR
            if length:
                disk.write_from(reader.get_iovecs(length), offset)
            return VIRTIO_BLK_S_OK
        if req_type == VIRTIO_BLK_T_FLUSH:
            if not self._read_only:
                disk.flush()
            return VIRTIO_BLK_S_OK
        if req_type == VIRTIO_BLK_T_GET_ID:
            n = min(writer.available_bytes(), VIRTIO_BLK_ID_BYTES)
            writer.write(self._id[:n])
            return VIRTIO_BLK_S_OK
        if req_type in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            if self._read_only:
                return VIRTIO_BLK_S_IOERR
            return self._discard_or_zero(req_type, reader)
        return VIRTIO_BLK_S_UNSUPP

    def _discard_or_zero(self, req_type: int, reader: Reader) -> int:
        discard = req_type == VIRTIO_BLK_T_DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.acked_features >> feature & 1:
            return VIRTIO_BLK_S_UNSUPP
        size = reader.available_bytes()
        nseg = size // _SEGMENT.size
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if nseg == 0 or size % _SEGMENT.size or nseg > max_seg:
            self.log.warn("bad segment list of %d bytes", size)
            return VIRTIO_BLK_S_IOERR
        segments = [_SEGMENT.unpack(reader.read_exact(_SEGMENT.size)) for _ in range(nseg)]
        ranges: list[tuple[int, int, bool]] = []
        for sector, num_sectors, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
            if num_sectors > max_sectors:
                return VIRTIO_BLK_S_IOERR
            length = num_sectors << SECTOR_SHIFT
            offset = self._check_range(sector, length)
            if offset is None:
                return VIRTIO_BLK_S_IOERR
            ranges.append((offset, length, bool(flags)))
        for offset, length, unmap in ranges:
            if discard:
                self._disk.discard(offset, length)
            else:
                self._disk.write_zeroes(offset, length, unmap=unmap)
        return VIRTIO_BLK_S_OK
