"""virtio-block's io_uring path: a batch of requests goes to the ring, completions come back in
any order, and every rule of the synchronous path (ranges, read-only, barriers, hostile chains)
still holds."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import sys_util
from devices.testing import SubmittedChain, VirtQueueDriver, make_guest_memory
from devices.virtio import Block, Interrupt, RawDisk
from devices.virtio import _block_ring as block_ring
from devices.virtio import block as block_mod
from devices.virtio.block import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from sys_util import EventFd, uring_supported

pytestmark = pytest.mark.skipif(not uring_supported(), reason="io_uring is disabled here")

IMAGE_SIZE = 1 << 20
HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")


class Ring:
    """A Block device on one queue of the mock driver; requests are queued, then one kick."""

    def __init__(self, block: Block) -> None:
        self.mem = make_guest_memory(8 << 20)
        self.drv = VirtQueueDriver(self.mem, 0x10000, 64, data_size=4 << 20)
        self.block = block
        block.ack_features(block.features())
        self.queue = self.drv.make_queue(features=block.acked_features)
        self.kick_evt = EventFd()
        self.irq_evt = EventFd()
        block.activate(self.mem, Interrupt(intx_evt=self.irq_evt), [self.queue], [self.kick_evt])
        self.chains: list[SubmittedChain] = []

    def add(
        self, req_type: int, sector: int = 0, data: bytes = b"", read_len: int = 0,
        align: int = 16,
    ) -> int:  # fmt: skip
        readable = [HDR.pack(req_type, 0, sector)] + ([data] if data else [])
        writable = ([read_len] if read_len else []) + [1]
        self.chains.append(self.drv.add_request(readable, writable, align=align))
        return len(self.chains) - 1

    def run(self) -> list[tuple[int, bytes, int]]:
        """Kick once; return (status, data, used length) per request, in submission order."""
        self.drv.kick(self.kick_evt)
        used = dict(self.drv.wait_used(len(self.chains)))
        out = []
        for chain in self.chains:
            raw = self.drv.read_writable(chain)
            out.append((raw[-1], raw[:-1], used[chain.head]))
        self.chains = []
        return out

    def close(self) -> None:
        self.block.close()
        self.kick_evt.close()
        self.irq_evt.close()
        self.mem.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


@pytest.fixture
def ring(image: Path) -> Iterator[Ring]:
    r = Ring(Block.open(image))
    yield r
    r.close()


def no_sync_io(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the synchronous data path fail, so a passing test proves the ring served it."""

    def refuse(*args: object) -> int:
        raise AssertionError("served synchronously")

    disk = block.disk
    monkeypatch.setattr(disk, "read_into", refuse)
    monkeypatch.setattr(disk, "write_from", refuse)


def test_a_batch_of_writes_flush_and_reads_goes_through_the_ring(
    ring: Ring, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_sync_io(ring.block, monkeypatch)
    payloads = [os.urandom(4096 * (1 + i % 3)) for i in range(8)]
    sectors = [i * 64 for i in range(8)]
    for sector, data in zip(sectors, payloads, strict=True):
        ring.add(VIRTIO_BLK_T_OUT, sector, data)
    ring.add(VIRTIO_BLK_T_FLUSH)
    results = ring.run()
    assert [r[0] for r in results] == [VIRTIO_BLK_S_OK] * 9
    assert [r[2] for r in results] == [1] * 9
    content = image.read_bytes()
    for sector, data in zip(sectors, payloads, strict=True):
        assert content[sector * 512 : sector * 512 + len(data)] == data
    os.posix_fadvise(ring.block.disk.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # make reads miss
    for sector, data in zip(sectors, payloads, strict=True):
        ring.add(VIRTIO_BLK_T_IN, sector, read_len=len(data))
    results = ring.run()
    for (status, got, used), data in zip(results, payloads, strict=True):
        assert status == VIRTIO_BLK_S_OK and got == data and used == len(data) + 1
    assert ring.block._ring is not None and ring.block._ring.in_flight == 0


def test_bad_requests_in_a_batch_fail_alone(ring: Ring, image: Path) -> None:
    content = image.read_bytes()
    good = ring.add(VIRTIO_BLK_T_IN, 8, read_len=4096)
    beyond = ring.add(VIRTIO_BLK_T_IN, IMAGE_SIZE // 512 - 1, read_len=4096)
    odd = ring.add(VIRTIO_BLK_T_OUT, 0, b"x" * 100)  # not a whole sector
    ring.chains.append(ring.drv.add_request([b"short"], [1]))  # header too short
    ident = ring.add(VIRTIO_BLK_T_GET_ID, read_len=20)
    write = ring.add(VIRTIO_BLK_T_OUT, 16, b"w" * 512)
    results = ring.run()
    assert results[good][0] == VIRTIO_BLK_S_OK and results[good][1] == content[4096:8192]
    assert results[beyond][0] == VIRTIO_BLK_S_IOERR
    assert results[odd][0] == VIRTIO_BLK_S_IOERR
    assert results[3][0] == VIRTIO_BLK_S_IOERR
    assert results[ident][0] == VIRTIO_BLK_S_OK
    assert results[write][0] == VIRTIO_BLK_S_OK
    after = image.read_bytes()
    assert after[16 * 512 : 17 * 512] == b"w" * 512
    assert after[: 16 * 512] == content[: 16 * 512] and after[17 * 512 :] == content[17 * 512 :]


@pytest.mark.parametrize("one_descriptor", [False, True])
def test_discard_waits_for_the_writes_queued_before_it(
    ring: Ring, image: Path, one_descriptor: bool
) -> None:
    """Write then discard the same range in one batch: the discard is a barrier, so the range
    must end up zero (were it run first, the write would survive). Also when the discard's
    header and segment share one descriptor (a layout the fast path does not take)."""
    for i in range(16):
        ring.add(VIRTIO_BLK_T_OUT, i * 8, os.urandom(4096))
    segment = SEG.pack(0, 16 * 8, 0)
    if one_descriptor:
        header = HDR.pack(VIRTIO_BLK_T_DISCARD, 0, 0)
        ring.chains.append(ring.drv.add_request([header + segment], [1]))
    else:
        ring.add(VIRTIO_BLK_T_DISCARD, data=segment)
    assert all(r[0] == VIRTIO_BLK_S_OK for r in ring.run())
    assert image.read_bytes()[: 16 * 4096] == bytes(16 * 4096)


def test_read_only_disk_refuses_writes_in_a_batch(image: Path) -> None:
    before = image.read_bytes()
    r = Ring(Block.open(image, read_only=True))
    try:
        r.add(VIRTIO_BLK_T_OUT, 0, b"y" * 512)
        r.add(VIRTIO_BLK_T_OUT, 8, b"y" * 512)
        r.add(VIRTIO_BLK_T_FLUSH)
        r.add(VIRTIO_BLK_T_IN, 0, read_len=512)
        results = r.run()
        assert [x[0] for x in results] == [VIRTIO_BLK_S_IOERR] * 2 + [VIRTIO_BLK_S_OK] * 2
        assert results[3][1] == before[:512]
    finally:
        r.close()
    assert image.read_bytes() == before


def test_direct_io_with_unaligned_buffers_falls_back(image: Path) -> None:
    try:
        disk = RawDisk(image, direct=True)
    except OSError as err:  # tmpfs has no O_DIRECT
        pytest.skip(f"O_DIRECT unsupported here: {err}")
    r = Ring(Block(disk))
    try:
        data = [os.urandom(512) for _ in range(4)]  # 512-byte buffers: not 4 KiB aligned
        for i, d in enumerate(data):
            r.add(VIRTIO_BLK_T_OUT, i, d)
        assert all(x[0] == VIRTIO_BLK_S_OK for x in r.run())
        for i in range(4):
            r.add(VIRTIO_BLK_T_IN, i, read_len=512)
        assert [x[1] for x in r.run()] == data
    finally:
        r.close()


def test_full_ring_falls_back_to_synchronous_io(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_ring, "RING_ENTRIES", 2)
    original = block_ring.RingIo.__init__

    def small(self: block_ring.RingIo[object], disk: RawDisk, entries: int = 2) -> None:
        original(self, disk, 2)

    monkeypatch.setattr(block_ring.RingIo, "__init__", small)
    r = Ring(Block.open(image))
    try:
        data = [os.urandom(4096) for _ in range(10)]
        for i, d in enumerate(data):
            r.add(VIRTIO_BLK_T_OUT, i * 8, d)
        assert all(x[0] == VIRTIO_BLK_S_OK for x in r.run())
        content = image.read_bytes()
        assert all(content[i * 4096 : (i + 1) * 4096] == d for i, d in enumerate(data))
    finally:
        r.close()


def test_without_io_uring_the_thread_pool_serves(image: Path) -> None:
    r = Ring(Block.open(image, use_io_uring=False))
    try:
        for i in range(4):
            r.add(VIRTIO_BLK_T_OUT, i * 8, b"z" * 4096)
        assert all(x[0] == VIRTIO_BLK_S_OK for x in r.run())
        assert r.block._ring is None
    finally:
        r.close()
    assert image.read_bytes()[: 4 * 4096] == b"z" * 4 * 4096


def test_ring_creation_failure_is_logged_and_threads_serve(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "io_uring_setup refused")

    monkeypatch.setattr(block_ring.RingIo, "__init__", fail)
    r = Ring(Block.open(image))
    try:
        assert r.block._ring is None and r.block.log.count == 1
        r.add(VIRTIO_BLK_T_OUT, 0, b"q" * 512)
        r.add(VIRTIO_BLK_T_IN, 0, read_len=512)
        assert [x[1] for x in r.run()] == [b"", b"q" * 512]
    finally:
        r.close()


def test_reset_with_requests_in_flight_releases_the_ring(image: Path) -> None:
    r = Ring(Block.open(image))
    for i in range(16):
        r.add(VIRTIO_BLK_T_OUT, i * 8, os.urandom(4096))
    r.drv.kick(r.kick_evt)
    r.block.reset()  # may catch writes in flight: close() waits for them
    assert r.block._ring is None
    r.close()


class _CountingRing:
    """Wraps a RingIo and records each read/write it is handed: (offset, length, requests)."""

    def __init__(self, inner: block_ring.RingIo[list[object]]) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int, int, int]] = []

    def read(self, tokens: list[object], iovecs: object, offset: int, length: int) -> bool:
        self.calls.append(("read", offset, length, len(tokens)))
        return self.inner.read(tokens, iovecs, offset, length)  # type: ignore[arg-type]

    def write(self, tokens: list[object], iovecs: object, offset: int, length: int) -> bool:
        self.calls.append(("write", offset, length, len(tokens)))
        return self.inner.write(tokens, iovecs, offset, length)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def counting(ring: Ring) -> _CountingRing:
    assert ring.block._ring is not None
    wrapped = _CountingRing(ring.block._ring)
    ring.block._ring = wrapped  # type: ignore[assignment]
    return wrapped


def test_adjacent_requests_are_merged_into_one_transfer(
    ring: Ring, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three adjacent writes, a gap, one more; then the same as reads: two transfers each, and
    every request gets its own data and status."""
    no_sync_io(ring.block, monkeypatch)
    calls = counting(ring)
    payloads = [os.urandom(8192) for _ in range(4)]
    sectors = [16, 32, 48, 128]  # 8 KiB = 16 sectors: the first three touch
    for sector, data in zip(sectors, payloads, strict=True):
        ring.add(VIRTIO_BLK_T_OUT, sector, data)
    assert [r[0] for r in ring.run()] == [VIRTIO_BLK_S_OK] * 4
    content = image.read_bytes()
    for sector, data in zip(sectors, payloads, strict=True):
        assert content[sector * 512 : sector * 512 + 8192] == data
    os.posix_fadvise(ring.block.disk.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    for sector in sectors:
        ring.add(VIRTIO_BLK_T_IN, sector, read_len=8192)
    results = ring.run()
    assert [(r[0], r[1], r[2]) for r in results] == [(VIRTIO_BLK_S_OK, d, 8193) for d in payloads]
    assert calls.calls == [
        ("write", 16 * 512, 3 * 8192, 3), ("write", 128 * 512, 8192, 1),
        ("read", 16 * 512, 3 * 8192, 3), ("read", 128 * 512, 8192, 1),
    ]  # fmt: skip


def test_a_flush_ends_a_run_of_writes(ring: Ring, image: Path) -> None:
    calls = counting(ring)
    a, b = os.urandom(4096), os.urandom(4096)
    ring.add(VIRTIO_BLK_T_OUT, 0, a)
    ring.add(VIRTIO_BLK_T_FLUSH)
    ring.add(VIRTIO_BLK_T_OUT, 8, b)
    assert [r[0] for r in ring.run()] == [VIRTIO_BLK_S_OK] * 3
    assert calls.calls == [("write", 0, 4096, 1), ("write", 4096, 4096, 1)]
    assert image.read_bytes()[:8192] == a + b


def test_runs_stop_at_the_transfer_limit(
    ring: Ring, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_mod, "MERGE_MAX_BYTES", 2 * 4096)
    calls = counting(ring)
    for i in range(5):
        ring.add(VIRTIO_BLK_T_IN, 8 * i, read_len=4096)
    results = ring.run()
    content = image.read_bytes()
    assert [r[1] for r in results] == [content[4096 * i : 4096 * (i + 1)] for i in range(5)]
    assert [c[3] for c in calls.calls] == [2, 2, 1]


def test_a_failed_merged_transfer_fails_each_of_its_requests(
    ring: Ring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ring reports the merged read failed (after its retry): every request of the run
    completes with IOERR; the write after it is unaffected."""
    inner = ring.block._ring
    assert inner is not None
    finish = inner._finish

    def failing(request: block_ring._Request[list[object]], result: int) -> str | None:
        if request.kind == block_ring._READ:
            return f"read of {request.length} bytes at {request.offset}: injected EIO"
        return finish(request, result)  # type: ignore[arg-type]

    monkeypatch.setattr(inner, "_finish", failing)
    fd = ring.block.disk.fileno()
    os.fsync(fd)  # dirty pages cannot be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the reads miss and go to the ring
    ring.add(VIRTIO_BLK_T_IN, 0, read_len=4096)
    ring.add(VIRTIO_BLK_T_IN, 8, read_len=4096)
    ring.add(VIRTIO_BLK_T_OUT, 64, os.urandom(512))
    results = ring.run()
    assert [(r[0], r[2]) for r in results] == [
        (VIRTIO_BLK_S_IOERR, 1), (VIRTIO_BLK_S_IOERR, 1), (VIRTIO_BLK_S_OK, 1),
    ]  # fmt: skip


def test_small_cold_reads_stay_in_the_ring_and_large_ones_go_to_workers(
    ring: Ring, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = ring.block._ring
    assert inner is not None
    uring = inner._ring
    punts: list[tuple[int, bool]] = []
    readv = uring.readv

    def recording(fd: int, buffers: list[memoryview], offset: int, tag: int, *,
                  punt: bool = False) -> bool:  # fmt: skip
        punts.append((sum(len(b) for b in buffers), punt))
        return readv(fd, buffers, offset, tag, punt=punt)

    monkeypatch.setattr(uring, "readv", recording)
    fd = ring.block.disk.fileno()
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    ring.add(VIRTIO_BLK_T_IN, 0, read_len=4096)
    ring.add(VIRTIO_BLK_T_IN, 1024, read_len=128 << 10)
    results = ring.run()
    content = image.read_bytes()
    assert [r[1] for r in results] == [
        content[:4096],
        content[1024 * 512 : 1024 * 512 + (128 << 10)],
    ]
    assert punts == [(4096, False), (128 << 10, True)]


def test_large_cold_reads_go_to_the_ring_through_o_direct(
    ring: Ring, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = ring.block.disk
    assert isinstance(disk, RawDisk)
    if not disk.cold_reads_direct:
        pytest.skip("no O_DIRECT on this filesystem")
    inner = ring.block._ring
    assert inner is not None
    uring = inner._ring
    calls: list[tuple[int, int, bool]] = []
    readv = uring.readv

    def recording(fd: int, buffers: list[memoryview], offset: int, tag: int, *,
                  punt: bool = False) -> bool:  # fmt: skip
        calls.append((fd, sum(len(b) for b in buffers), punt))
        return readv(fd, buffers, offset, tag, punt=punt)

    monkeypatch.setattr(uring, "readv", recording)
    fd = disk.fileno()
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        cold = sys_util.cachestat(fd, 0, 512 << 10).cached == 0
    except OSError:
        cold = False
    if not cold:
        pytest.skip("no cachestat, or clean pages stay cached here")
    content = image.read_bytes()
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    half = 512 << 10
    expected = [(VIRTIO_BLK_S_OK, content[:half]), (VIRTIO_BLK_S_OK, content[-half:])]

    def read_both() -> list[tuple[int, bytes]]:
        # Two requests: a batch (one request alone is served in place); the ring may merge
        # them (they are adjacent) into one transfer.
        ring.add(VIRTIO_BLK_T_IN, 0, read_len=half, align=4096)
        ring.add(VIRTIO_BLK_T_IN, (IMAGE_SIZE - half) // 512, read_len=half, align=4096)
        return [r[:2] for r in ring.run()]

    assert read_both() == expected
    assert calls and sum(c[1] for c in calls) == 2 * half
    assert all(c[0] != fd and not c[2] for c in calls)
    ring_calls = len(calls)
    assert sys_util.cachestat(fd, 0, IMAGE_SIZE).cached == 0  # O_DIRECT left the cache alone
    # Cached: served inline with RWF_NOWAIT, the ring never sees them.
    os.pread(fd, IMAGE_SIZE, 0)
    assert read_both() == expected
    assert len(calls) == ring_calls
    # Buffers O_DIRECT refuses (16-byte aligned): the same data, through the cache.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    ring.add(VIRTIO_BLK_T_IN, 0, read_len=half)
    ring.add(VIRTIO_BLK_T_IN, (IMAGE_SIZE - half) // 512, read_len=half)
    assert [r[:2] for r in ring.run()] == expected
