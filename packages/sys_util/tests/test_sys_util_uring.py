"""IoUring: data lands where it should, completions carry their tags, the ring stays restricted."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sys_util import EventFd, InvalidArgument, IoUring, uring_supported
from sys_util._binding import ffi, lib

pytestmark = pytest.mark.skipif(not uring_supported(), reason="io_uring is disabled here")

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(SIZE)
    path = tmp_path / "data.img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    yield fd, data
    os.close(fd)


@pytest.fixture
def buf() -> Iterator[memoryview]:
    m = mmap.mmap(-1, SIZE)
    view = memoryview(m)
    yield view
    view.release()
    m.close()


def wait_for(ring: IoUring, count: int) -> dict[int, int]:
    ring.submit()
    got: dict[int, int] = {}
    while len(got) < count:
        got.update(ring.completions())
        if len(got) < count:
            ring.submit(1)
    return got


@pytest.mark.parametrize("punt", [False, True])
def test_readv_scatters_file_data_into_buffers(
    image: tuple[int, bytes], buf: memoryview, punt: bool
) -> None:
    fd, data = image
    with IoUring(8) as ring:
        assert ring.readv(fd, [buf[0:4096], buf[65536:73728]], 12288, 1, punt=punt)
        assert ring.readv(fd, [buf[8192 : 8192 + 512]], 0, 2, punt=punt)
        assert wait_for(ring, 2) == {1: 4096 + 8192, 2: 512}
        assert ring.in_flight == 0
    assert bytes(buf[0:4096]) + bytes(buf[65536:73728]) == data[12288 : 12288 + 12288]
    assert bytes(buf[8192:8704]) == data[:512]


def test_writev_then_fsync_lands_in_the_file(image: tuple[int, bytes], buf: memoryview) -> None:
    fd, data = image
    payload = os.urandom(8192)
    buf[:8192] = payload
    with IoUring(8) as ring:
        assert ring.writev(fd, [buf[:4096], buf[4096:8192]], 4096, 10)
        assert ring.fsync(fd, 11)
        assert wait_for(ring, 2) == {10: 8192, 11: 0}
    assert os.pread(fd, SIZE, 0) == data[:4096] + payload + data[12288:]


def test_errors_come_back_as_negative_errno(buf: memoryview, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with IoUring(4) as ring:
            assert ring.writev(fd, [buf[:512]], 0, 7)
            assert wait_for(ring, 1) == {7: -errno.EBADF}
    finally:
        os.close(fd)


def test_eventfd_is_signalled_on_completion(image: tuple[int, bytes], buf: memoryview) -> None:
    fd, _ = image
    with IoUring(4) as ring, EventFd(nonblocking=True) as evt:
        ring.register_eventfd(evt)
        assert ring.readv(fd, [buf[:4096]], 0, 3)
        ring.submit()
        assert evt.read_timeout(10) is not None
        assert wait_for(ring, 1) == {3: 4096}


def test_full_ring_refuses_and_tags_must_be_unique(
    image: tuple[int, bytes], buf: memoryview
) -> None:
    fd, _ = image
    with IoUring(2) as ring:
        assert ring.capacity == 2
        assert ring.readv(fd, [buf[:512]], 0, 1)
        with pytest.raises(InvalidArgument):
            ring.readv(fd, [buf[:512]], 0, 1)  # tag 1 is in flight
        assert ring.readv(fd, [buf[512:1024]], 0, 2)
        assert not ring.readv(fd, [buf[1024:1536]], 0, 3)  # full: the caller falls back
        assert not ring.fsync(fd, 4)
        assert wait_for(ring, 2) == {1: 512, 2: 512}
        assert ring.readv(fd, [buf[:512]], 0, 1)  # tags are free again
        wait_for(ring, 1)


def test_bad_arguments_are_refused(image: tuple[int, bytes], buf: memoryview) -> None:
    fd, _ = image
    with IoUring(4) as ring:
        with pytest.raises(InvalidArgument):
            ring.readv(fd, [], 0, 1)
        with pytest.raises(InvalidArgument):
            ring.readv(fd, [buf[:1]] * 1025, 0, 1)
        with pytest.raises(InvalidArgument):
            ring.readv(fd, [buf[:1]], -1, 1)
        with pytest.raises(InvalidArgument):
            ring.readv(fd, [buf[:1]], 0, -1)
        with pytest.raises(InvalidArgument):
            ring.submit(wait=1)  # nothing in flight to wait for
        ro = memoryview(b"read-only")
        with pytest.raises(BufferError):
            ring.readv(fd, [ro], 0, 1)  # a read needs writable buffers
    with pytest.raises(InvalidArgument):
        IoUring(0)


def test_ring_is_restricted_to_readv_writev_fsync(tmp_path: Path) -> None:
    """io_uring requests bypass seccomp: an opcode outside the list must be refused."""
    with IoUring(4) as ring:
        raw = ring._live()
        path = ffi.new("char[]", str(tmp_path / "created-by-uring").encode())
        # IORING_OP_NOP (0) is not on the list either; use it: any opcode but ours must fail
        rc = lib.sys_util_uring_prep(raw, 0, -1, ffi.NULL, 0, 0, 0, 0, 99)
        assert rc == 0
        assert lib.sys_util_uring_submit(raw, 1) >= 0
        tags = ffi.new("uint64_t[]", 4)
        res = ffi.new("int32_t[]", 4)
        assert lib.sys_util_uring_reap(raw, tags, res, 4) == 1
        assert tags[0] == 99 and res[0] == -errno.EACCES
        del path
    unrestricted = IoUring(4, restrict=False)
    try:
        raw = unrestricted._live()
        assert lib.sys_util_uring_prep(raw, 0, -1, ffi.NULL, 0, 0, 0, 0, 5) == 0
        assert lib.sys_util_uring_submit(raw, 1) >= 0
        tags = ffi.new("uint64_t[]", 4)
        res = ffi.new("int32_t[]", 4)
        assert lib.sys_util_uring_reap(raw, tags, res, 4) == 1 and res[0] == 0  # NOP allowed
    finally:
        unrestricted.close()


def test_fd_ownership(image: tuple[int, bytes], buf: memoryview) -> None:
    fd, _ = image
    ring = IoUring(4)
    ring_fd = ring.fileno()
    assert fcntl.fcntl(ring_fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert ring.readv(fd, [buf[:4096]], 0, 1)
    ring.close()  # waits for the read in flight before unmapping
    assert ring.closed and ring.in_flight == 0
    ring.close()  # idempotent
    with pytest.raises(OSError) as info:
        ring.fileno()
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError):
        ring.readv(fd, [buf[:4096]], 0, 2)
    with pytest.raises(OSError):
        os.fstat(ring_fd)  # the fd is really closed


def test_worker_limit(image: tuple[int, bytes], buf: memoryview) -> None:
    fd, data = image
    with IoUring(8, max_workers=64) as ring:  # a restricted ring may still set it (before)
        assert ring.readv(fd, [buf[:4096]], 0, 1, punt=True)
        assert wait_for(ring, 1) == {1: 4096}
    assert bytes(buf[:4096]) == data[:4096]
    for bad in (-1, 1025):
        with pytest.raises(InvalidArgument):
            IoUring(8, max_workers=bad)
