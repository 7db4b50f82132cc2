from __future__ import annotations

import errno
import fcntl
import os
import tempfile

import pytest

from sys_util import (
    InvalidArgument,
    OwnedFd,
    PollContext,
    TimerFd,
    allocate,
    fallocate,
    punch_hole,
    write_zeroes,
)


def test_timer_fires_and_counts() -> None:
    with TimerFd() as t:
        assert fcntl.fcntl(t.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not t.is_armed()
        t.reset(0.001)
        assert t.wait() == 1
        assert not t.is_armed()


def test_timer_in_poll_context_and_interval() -> None:
    with TimerFd(nonblocking=True) as t, PollContext[str]() as ctx:
        ctx.add(t, "timer")
        with pytest.raises(BlockingIOError):
            t.wait()
        t.reset(0, interval=0.001)
        assert ctx.wait(5)[0][0] == "timer"
        assert t.wait() >= 1
        assert t.is_armed()
        t.clear()
        assert not t.is_armed()
        assert t.remaining() == 0.0


def test_timer_try_clone_shares_the_timer() -> None:
    with TimerFd() as t, t.try_clone() as clone:
        t.reset(100)
        assert clone.is_armed()
        assert fcntl.fcntl(clone.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_timer_remaining_and_bad_args() -> None:
    with TimerFd() as t:
        t.reset(100)
        assert 99 < t.remaining() <= 100
        with pytest.raises(InvalidArgument):
            t.reset(-1)


def test_timer_closed_ebadf() -> None:
    t = TimerFd()
    t.close()
    t.close()
    for call in (t.fileno, t.wait, t.clear, t.is_armed, lambda: t.reset(1)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_timer_wrapping_closed_fd_ebadf() -> None:
    t = TimerFd()
    fd = t.detach()
    os.close(fd)
    with pytest.raises(OSError) as info:
        TimerFd.from_fd(fd)
    assert info.value.errno == errno.EBADF
    w = TimerFd.__new__(TimerFd)
    OwnedFd.__init__(w, fd)
    for call in (w.wait, w.clear, w.is_armed, lambda: w.reset(1)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    w.detach()


@pytest.fixture
def datafile() -> object:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/var/tmp")) as f:
        f.write(b"\xab" * 65536)
        f.flush()
        yield f


def test_punch_hole_reads_zeros(datafile: object) -> None:
    fd = datafile.fileno()  # type: ignore[attr-defined]
    try:
        punch_hole(fd, 4096, 8192)
    except OSError as err:
        if err.errno == errno.EOPNOTSUPP:
            pytest.skip("filesystem cannot punch holes")
        raise
    assert os.pread(fd, 4096, 0) == b"\xab" * 4096
    assert os.pread(fd, 8192, 4096) == b"\0" * 8192
    assert os.pread(fd, 4096, 12288) == b"\xab" * 4096
    assert os.fstat(fd).st_size == 65536


def test_write_zeroes_keeps_size(datafile: object) -> None:
    fd = datafile.fileno()  # type: ignore[attr-defined]
    write_zeroes(fd, 100, 1000)
    assert os.pread(fd, 1200, 0) == b"\xab" * 100 + b"\0" * 1000 + b"\xab" * 100
    write_zeroes(fd, 65000, 10_000)  # past EOF: size unchanged
    assert os.fstat(fd).st_size == 65536
    assert os.pread(fd, 600, 65000).count(0) == 536


def test_allocate_grows_unless_keep_size(datafile: object) -> None:
    fd = datafile.fileno()  # type: ignore[attr-defined]
    allocate(fd, 65536, 4096, keep_size=True)
    assert os.fstat(fd).st_size == 65536
    allocate(fd, 65536, 4096)
    assert os.fstat(fd).st_size == 65536 + 4096


def test_fallocate_errors() -> None:
    with pytest.raises(InvalidArgument):
        fallocate(0, 0, -1, 10)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            punch_hole(w, 0, 4096)
        assert info.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as info:
        punch_hole(fd, 0, 4096)
    assert info.value.errno == errno.EBADF


def test_write_zeroes_falls_back_to_writing(
    datafile: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys_util._falloc as falloc

    modes: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(falloc, "fallocate", unsupported)
    fd = datafile.fileno()  # type: ignore[attr-defined]
    write_zeroes(fd, 10, 200_000)  # runs past EOF: clamped, the size does not change
    assert len(modes) == 2  # zero range, then punch hole, then plain writes
    assert os.fstat(fd).st_size == 65536
    assert os.pread(fd, 65536, 0) == b"\xab" * 10 + b"\0" * (65536 - 10)


def test_write_zeroes_other_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys_util._falloc as falloc

    def failing(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(falloc, "fallocate", failing)
    with pytest.raises(OSError) as info:
        write_zeroes(0, 0, 10)
    assert info.value.errno == errno.EIO
