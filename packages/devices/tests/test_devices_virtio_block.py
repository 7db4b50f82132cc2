"""virtio-block against a temporary raw image, driven by the mock virtqueue driver."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import Block, DiskImageLocked, Interrupt, RawDisk
from devices.virtio.block import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from sys_util import EventFd

IMAGE_SIZE = 1 << 20
HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


class Harness:
    """A Block device activated on one queue of the mock driver."""

    def __init__(self, block: Block, indirect_ok: bool = True) -> None:
        self.mem = make_guest_memory(8 << 20)
        self.drv = VirtQueueDriver(self.mem, 0x10000, 64, data_size=4 << 20)
        self.block = block
        block.ack_features(block.features())
        self.queue = self.drv.make_queue(features=block.acked_features)
        self.kick_evt = EventFd()
        self.irq_evt = EventFd()
        self.interrupt = Interrupt(intx_evt=self.irq_evt)
        block.activate(self.mem, self.interrupt, [self.queue], [self.kick_evt])

    def request(
        self,
        req_type: int,
        sector: int = 0,
        data: bytes = b"",
        read_len: int = 0,
        *,
        indirect: bool = False,
    ) -> tuple[int, bytes, int]:
        """Submit one request; return (status, data read, used length)."""
        readable = [HDR.pack(req_type, 0, sector)] + ([data] if data else [])
        writable = ([read_len] if read_len else []) + [1]
        chain = self.drv.add_request(readable, writable, indirect=indirect)
        self.drv.kick(self.kick_evt)
        used = self.drv.wait_used(1)
        assert used[0][0] == chain.head
        out = self.drv.read_writable(chain)
        return out[-1], out[:-1], used[0][1]

    def close(self) -> None:
        self.block.close()
        self.kick_evt.close()
        self.irq_evt.close()
        self.mem.close()


@pytest.fixture
def rw(image: Path) -> Iterator[Harness]:
    h = Harness(Block.open(image))
    yield h
    h.close()


@pytest.mark.parametrize("indirect", [False, True])
def test_read_returns_image_data(rw: Harness, image: Path, indirect: bool) -> None:
    content = image.read_bytes()
    status, data, used_len = rw.request(VIRTIO_BLK_T_IN, 8, read_len=16384, indirect=indirect)
    assert status == VIRTIO_BLK_S_OK and used_len == 16385
    assert sha(data) == sha(content[4096 : 4096 + 16384])


@pytest.mark.parametrize("indirect", [False, True])
def test_write_reaches_image(rw: Harness, image: Path, indirect: bool) -> None:
    before = image.read_bytes()
    payload = os.urandom(12 * 512)
    status, _, used_len = rw.request(VIRTIO_BLK_T_OUT, 3, payload, indirect=indirect)
    assert status == VIRTIO_BLK_S_OK and used_len == 1
    after = image.read_bytes()
    expected = before[: 3 * 512] + payload + before[3 * 512 + len(payload) :]
    assert sha(after) == sha(expected)
    status, data, _ = rw.request(VIRTIO_BLK_T_IN, 3, read_len=len(payload))
    assert status == VIRTIO_BLK_S_OK and sha(data) == sha(payload)


def test_write_scattered_over_many_segments(rw: Harness, image: Path) -> None:
    parts = [os.urandom(512) for _ in range(20)]
    hdr = HDR.pack(VIRTIO_BLK_T_OUT, 0, 100)
    chain = rw.drv.add_request([hdr, *parts], [1])
    rw.drv.kick(rw.kick_evt)
    assert rw.drv.wait_used(1) == [(chain.head, 1)]
    assert image.read_bytes()[100 * 512 : 100 * 512 + 20 * 512] == b"".join(parts)


def test_flush_and_get_id(rw: Harness) -> None:
    status, _, _ = rw.request(VIRTIO_BLK_T_FLUSH)
    assert status == VIRTIO_BLK_S_OK
    status, ident, used_len = rw.request(VIRTIO_BLK_T_GET_ID, read_len=20)
    assert status == VIRTIO_BLK_S_OK and used_len == 21 and len(ident) == 20
    assert ident.rstrip(b"\x00")


def test_get_id_uses_serial(image: Path) -> None:
    h = Harness(Block(RawDisk(image), serial="my-disk-serial"))
    try:
        status, ident, _ = h.request(VIRTIO_BLK_T_GET_ID, read_len=20)
        assert status == VIRTIO_BLK_S_OK and ident == b"my-disk-serial".ljust(20, b"\x00")
    finally:
        h.close()


@pytest.mark.parametrize("req_type", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_discard_and_write_zeroes_zero_the_range(rw: Harness, image: Path, req_type: int) -> None:
    before = image.read_bytes()
    flags = 1 if req_type == VIRTIO_BLK_T_WRITE_ZEROES else 0
    segs = SEG.pack(16, 8, flags) + SEG.pack(64, 16, 0)
    status, _, _ = rw.request(req_type, data=segs)
    assert status == VIRTIO_BLK_S_OK
    after = bytearray(before)
    after[16 * 512 : 24 * 512] = bytes(8 * 512)
    after[64 * 512 : 80 * 512] = bytes(16 * 512)
    assert sha(image.read_bytes()) == sha(bytes(after))
    assert os.path.getsize(image) == IMAGE_SIZE


def test_discard_segment_errors(rw: Harness, image: Path) -> None:
    before = image.read_bytes()
    cap = IMAGE_SIZE // 512
    # beyond capacity, unmap flag on discard, malformed length, unknown flags
    assert rw.request(VIRTIO_BLK_T_DISCARD, data=SEG.pack(cap - 1, 2, 0))[0] == VIRTIO_BLK_S_IOERR
    assert rw.request(VIRTIO_BLK_T_DISCARD, data=SEG.pack(0, 1, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert rw.request(VIRTIO_BLK_T_DISCARD, data=SEG.pack(0, 1, 0)[:10])[0] == VIRTIO_BLK_S_IOERR
    assert rw.request(VIRTIO_BLK_T_WRITE_ZEROES, data=SEG.pack(0, 1, 6))[0] == VIRTIO_BLK_S_UNSUPP
    # a valid segment after an invalid one must not be applied either
    segs = SEG.pack(0, 1, 0) + SEG.pack(2**60, 1, 0)
    assert rw.request(VIRTIO_BLK_T_WRITE_ZEROES, data=segs)[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


def test_requests_beyond_capacity_fail(rw: Harness, image: Path) -> None:
    before = image.read_bytes()
    cap = IMAGE_SIZE // 512
    assert rw.request(VIRTIO_BLK_T_IN, cap, read_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert rw.request(VIRTIO_BLK_T_IN, cap - 1, read_len=1024)[0] == VIRTIO_BLK_S_IOERR
    assert rw.request(VIRTIO_BLK_T_OUT, cap - 1, b"x" * 1024)[0] == VIRTIO_BLK_S_IOERR
    assert rw.request(VIRTIO_BLK_T_OUT, 2**63, b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert rw.request(VIRTIO_BLK_T_OUT, 0, b"x" * 100)[0] == VIRTIO_BLK_S_IOERR  # not 512-multiple
    assert rw.request(VIRTIO_BLK_T_IN, cap - 1, read_len=512)[0] == VIRTIO_BLK_S_OK
    assert rw.request(99)[0] == VIRTIO_BLK_S_UNSUPP
    assert image.read_bytes() == before


def test_hostile_chains_do_not_stop_the_device(rw: Harness, image: Path) -> None:
    drv = rw.drv
    content = image.read_bytes()
    # 1. header in a device-writable buffer (write where a read is required) -> IOERR status
    bad = drv.add_request([], [16, 1])
    # 2. buffer outside guest RAM -> used with length 0
    drv.write_descriptor(60, 1 << 40, 512, 0, 0)
    drv._free.remove(60)
    drv.publish(60)
    # 3. no status byte at all
    nostatus = drv.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 0)])
    # 4. a valid read afterwards is served
    good = drv.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
    drv.kick(rw.kick_evt)
    used = dict(drv.wait_used(4))
    assert used[bad.head] == 1 and drv.read_writable(bad)[-1] == VIRTIO_BLK_S_IOERR
    assert used[60] == 0
    assert used[nostatus.head] == 0
    assert used[good.head] == 513
    assert drv.read_writable(good)[:512] == content[:512]
    assert rw.block.log.count >= 2


def test_read_only_refuses_writes(image: Path) -> None:
    before = image.read_bytes()
    h = Harness(Block.open(image, read_only=True))
    try:
        f = h.block.features()
        assert f >> VIRTIO_BLK_F_RO & 1
        assert not f >> VIRTIO_BLK_F_DISCARD & 1 and not f >> VIRTIO_BLK_F_WRITE_ZEROES & 1
        assert h.request(VIRTIO_BLK_T_OUT, 0, b"y" * 512)[0] == VIRTIO_BLK_S_IOERR
        assert h.request(VIRTIO_BLK_T_DISCARD, data=SEG.pack(0, 8, 0))[0] == VIRTIO_BLK_S_IOERR
        assert h.request(VIRTIO_BLK_T_WRITE_ZEROES, data=SEG.pack(0, 8, 0))[0] == VIRTIO_BLK_S_IOERR
        assert h.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
        status, data, _ = h.request(VIRTIO_BLK_T_IN, 0, read_len=512)
        assert status == VIRTIO_BLK_S_OK and data == before[:512]
        with pytest.raises(OSError):
            h.block.resize(2 * IMAGE_SIZE)
    finally:
        h.close()
    assert sha(image.read_bytes()) == sha(before)


def test_flock_exclusive_for_writers(image: Path) -> None:
    with RawDisk(image):
        with pytest.raises(DiskImageLocked) as info:
            RawDisk(image)
        assert str(image) in str(info.value) and info.value.exclusive
        with pytest.raises(DiskImageLocked):
            RawDisk(image, read_only=True)
    with (
        RawDisk(image, read_only=True),
        RawDisk(image, read_only=True),
        pytest.raises(DiskImageLocked),
    ):
        RawDisk(image)
    RawDisk(image).close()  # all released


def test_direct_io(image: Path) -> None:
    try:
        disk = RawDisk(image, direct=True)
    except OSError as err:  # tmpfs has no O_DIRECT
        pytest.skip(f"O_DIRECT unsupported here: {err}")
    h = Harness(Block(disk))
    try:
        payload = os.urandom(4096)
        assert h.request(VIRTIO_BLK_T_OUT, 8, payload)[0] == VIRTIO_BLK_S_OK
        status, data, _ = h.request(VIRTIO_BLK_T_IN, 8, read_len=4096)
        assert status == VIRTIO_BLK_S_OK and data == payload
    finally:
        h.close()


def test_resize_updates_capacity_and_interrupts(rw: Harness, image: Path) -> None:
    assert struct.unpack_from("<Q", rw.block.read_config(0, 8))[0] == IMAGE_SIZE // 512
    gen = rw.interrupt.config_generation
    rw.block.resize(2 * IMAGE_SIZE)
    assert os.path.getsize(image) == 2 * IMAGE_SIZE
    assert struct.unpack_from("<Q", rw.block.read_config(0, 8))[0] == 2 * IMAGE_SIZE // 512
    assert rw.interrupt.config_generation == gen + 1
    assert rw.interrupt.read_and_clear_isr() & 2
    assert rw.request(VIRTIO_BLK_T_IN, IMAGE_SIZE // 512, read_len=512)[0] == VIRTIO_BLK_S_OK


def test_config_space_layout(rw: Harness) -> None:
    cfg = rw.block.read_config(0, 60)
    assert len(cfg) == 60
    assert struct.unpack_from("<I", cfg, 12)[0] == 254  # seg_max = max queue size - 2
    assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
    max_discard_sectors, max_discard_seg, align, max_wz, max_wz_seg = struct.unpack_from(
        "<5I", cfg, 36
    )
    assert max_discard_seg == 32 and max_wz_seg == 32 and align >= 1
    assert max_discard_sectors > 0 and max_wz > 0
    assert cfg[56] == 1
    assert rw.block.read_config(4096, 4) == b"\x00" * 4


def test_reset_stops_worker_thread(image: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    h = Harness(Block.open(image))
    assert any(t.name == "virtio-block" for t in threading.enumerate())
    assert h.block.reset()
    h.close()
    assert {t.ident for t in threading.enumerate()} <= before


def test_discard_frees_blocks(rw: Harness, image: Path) -> None:
    os.fsync(os.open(image, os.O_RDONLY))
    before = os.stat(image).st_blocks
    assert rw.request(VIRTIO_BLK_T_DISCARD, data=SEG.pack(0, 1024, 0))[0] == VIRTIO_BLK_S_OK
    after = os.stat(image).st_blocks
    if after == before:
        pytest.skip("this filesystem does not punch holes")
    assert after < before
    assert image.read_bytes()[: 1024 * 512] == bytes(1024 * 512)


@pytest.mark.qemu
def test_qcow2_image_through_block(tmp_path: Path) -> None:
    """A qemu-img-made qcow2 image is detected, served, and what we wrote qemu-img reads back."""
    import shutil
    import subprocess

    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    pytest.importorskip("qcow")
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    h = Harness(Block.open(path))
    try:
        payload = os.urandom(8192)
        assert h.request(VIRTIO_BLK_T_OUT, 16, payload)[0] == VIRTIO_BLK_S_OK
        status, data, _ = h.request(VIRTIO_BLK_T_IN, 16, read_len=8192)
        assert status == VIRTIO_BLK_S_OK and data == payload
        assert h.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
        with pytest.raises(DiskImageLocked):
            Block.open(path)
    finally:
        h.close()
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    content = raw.read_bytes()
    assert sha(content[16 * 512 : 16 * 512 + 8192]) == sha(payload)
    assert content[: 16 * 512] == bytes(16 * 512)


@pytest.mark.parametrize("direct", [False, True])
def test_raw_disk_after_close_raises_ebadf(image: Path, direct: bool) -> None:
    import errno

    try:
        disk = RawDisk(image, direct=direct)
    except OSError as err:
        pytest.skip(f"O_DIRECT unsupported here: {err}")
    with disk:
        assert disk.fileno() >= 0 and not disk.closed
    disk.close()
    assert disk.closed
    buf = memoryview(bytearray(512))
    calls = [
        disk.fileno,
        disk.size,
        disk.flush,
        lambda: disk.read_into([buf], 0),
        lambda: disk.write_from([buf], 0),
        lambda: disk.discard(0, 512),
        lambda: disk.write_zeroes(0, 512),
        lambda: disk.resize(4096),
    ]
    for call in calls:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    assert image.stat().st_size == IMAGE_SIZE


class SlowDisk:
    """A raw disk whose writes take a while, recording what a flush has seen finish."""

    def __init__(self, disk: RawDisk) -> None:
        self._disk = disk
        self.lock = threading.Lock()
        self.writes_done = 0
        self.writes_seen_by_flush: list[int] = []
        self.concurrent = 0
        self.max_concurrent = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._disk, name)

    @property
    def read_only(self) -> bool:
        return self._disk.read_only

    def write_from(self, iovecs: list[memoryview], offset: int) -> int:
        with self.lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        import time

        time.sleep(0.05)
        written = self._disk.write_from(iovecs, offset)
        with self.lock:
            self.concurrent -= 1
            self.writes_done += 1
        return written

    def flush(self) -> None:
        with self.lock:
            self.writes_seen_by_flush.append(self.writes_done)
        self._disk.flush()


def test_a_batch_runs_concurrently_and_flush_waits_for_the_writes_before_it(image: Path) -> None:
    slow = SlowDisk(RawDisk(image))
    h = Harness(Block(slow))  # type: ignore[arg-type]
    try:
        chains = [
            h.drv.add_request([HDR.pack(VIRTIO_BLK_T_OUT, 0, 8 * i), os.urandom(4096)], [1])
            for i in range(4)
        ]
        chains.append(h.drv.add_request([HDR.pack(VIRTIO_BLK_T_FLUSH, 0, 0)], [1]))
        chains.append(h.drv.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 0)], [4096, 1]))
        h.drv.kick(h.kick_evt)  # one kick: the device pops all six as one batch
        used = h.drv.wait_used(6)
        assert [head for head, _ in used] == [c.head for c in chains]  # ring order kept
        assert slow.writes_seen_by_flush == [4]  # the flush came after every earlier write
        assert slow.max_concurrent > 1  # the writes overlapped
        assert all(h.drv.read_writable(c)[-1] == VIRTIO_BLK_S_OK for c in chains)
    finally:
        h.close()


@pytest.mark.parametrize("kind", ["read", "write"])
def test_a_host_io_error_fails_that_request_only(
    rw: Harness, image: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A lone request (the queue-depth-1 short path) whose host I/O fails completes with
    IOERR; the device keeps serving and the image is unchanged."""
    before = image.read_bytes()
    disk = rw.block.disk

    def failing(*args: object) -> int:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(disk, "read_into" if kind == "read" else "write_from", failing)
    if kind == "read":
        status, _data, _used = rw.request(VIRTIO_BLK_T_IN, 0, read_len=4096)
    else:
        status, _data, _used = rw.request(VIRTIO_BLK_T_OUT, 0, data=b"z" * 4096)
    assert status == VIRTIO_BLK_S_IOERR
    monkeypatch.undo()
    status, data, _used = rw.request(VIRTIO_BLK_T_IN, 0, read_len=4096)
    assert status == VIRTIO_BLK_S_OK and data == before[:4096]
    assert image.read_bytes() == before
