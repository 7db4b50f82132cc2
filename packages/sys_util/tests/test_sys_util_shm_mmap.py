from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile

import pytest

from sys_util import InvalidArgument, MemoryMapping, OwnedFd, Seals, SharedMemory, pagesize


def test_pagesize() -> None:
    assert pagesize() == os.sysconf("SC_PAGESIZE")


def test_shared_memory_seals() -> None:
    with SharedMemory("test", 8192) as shm:
        assert shm.size == 8192
        assert shm.name == "test"
        assert fcntl.fcntl(shm.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        shm.set_size(4096)
        shm.add_seals(Seals.GROW | Seals.SHRINK)
        assert shm.get_seals() == Seals.GROW | Seals.SHRINK
        with pytest.raises(PermissionError):
            shm.set_size(8192)
        with shm.try_clone() as clone:
            assert clone.size == 4096
            assert clone.get_seals() & Seals.GROW


def test_shared_memory_closed_ebadf() -> None:
    shm = SharedMemory("x", 4096)
    shm.close()
    shm.close()
    for call in (shm.fileno, shm.get_seals, lambda: shm.add_seals(Seals.SEAL), shm.try_clone):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_shared_memory_wrapping_closed_fd_ebadf() -> None:
    fd = os.memfd_create("y")
    os.close(fd)
    with pytest.raises(OSError) as info:
        SharedMemory.from_fd(fd)  # the kind check fails first
    assert info.value.errno == errno.EBADF
    # Built around the closed number by hand: every method still reports EBADF.
    shm = SharedMemory.__new__(SharedMemory)
    OwnedFd.__init__(shm, fd)
    for call in (
        shm.get_seals,
        lambda: shm.add_seals(Seals.SEAL),
        shm.try_clone,
        lambda: shm.set_size(1),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    shm.detach()


def test_shared_memory_from_fd_checks_kind() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            SharedMemory.from_fd(r)
        os.fstat(r)  # not taken
    finally:
        os.close(r)
        os.close(w)
    with SharedMemory("k", 4096) as shm, SharedMemory.from_fd(os.dup(shm.fileno())) as again:
        assert again.size == 4096


def test_anonymous_mapping_bounds() -> None:
    st = struct.Struct("<IH")
    with MemoryMapping.anonymous(4096) as m:
        m.write_obj(4090, st, 1, 2)
        assert m.read_obj(4090, st) == (1, 2)
        m.write_slice(0, b"abc")
        assert m.read_slice(0, 3) == b"abc"
        assert bytes(m.view(1, 2)) == b"bc"
        for call in (
            lambda: m.read_obj(4091, st),
            lambda: m.write_obj(-1, st, 1, 2),
            lambda: m.read_slice(4095, 2),
            lambda: m.write_slice(4095, b"ab"),
            lambda: m.view(0, 4097),
            lambda: m.read_slice(0, -1),
        ):
            with pytest.raises(InvalidArgument, match="outside"):
                call()
        assert m.host_address % pagesize() == 0


def test_file_mapping_shared_and_private() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 8192)
        f.flush()
        with MemoryMapping.from_fd(f, 4096, 4096) as shared:
            shared.write_slice(0, b"shared")
            shared.msync()
        assert os.pread(f.fileno(), 6, 4096) == b"shared"
        with MemoryMapping.from_fd(f, 4096, shared=False) as private:
            private.write_slice(0, b"private")
        assert os.pread(f.fileno(), 7, 0) == b"\0" * 7
        with MemoryMapping.from_fd(f, 4096, writable=False) as ro, pytest.raises(TypeError):
            ro.write_slice(0, b"x")
        with pytest.raises(InvalidArgument, match="aligned"):
            MemoryMapping.from_fd(f, 10, 1)


def test_remove_range_on_shared_memory() -> None:
    page = pagesize()
    with SharedMemory("rm", 2 * page) as shm, MemoryMapping.from_shared_memory(shm) as m:
        m.write_slice(0, b"\xaa" * 2 * page)
        m.remove_range(page, page)
        assert m.read_slice(page - 1, 2) == b"\xaa\0"
        with pytest.raises(InvalidArgument):
            m.remove_range(1, page)


def test_mapping_close_idempotent_and_ebadf() -> None:
    m = MemoryMapping.anonymous(4096)
    v = m.view(0, 4)
    m.close()
    m.close()
    assert m.closed
    v[:] = b"ok!!"  # outstanding views stay valid (unmapped when released)
    v.release()
    for call in (
        lambda: m.read_slice(0, 1),
        lambda: m.write_slice(0, b"a"),
        lambda: m.view(0, 1),
        lambda: m.host_address,
        lambda: m.mmap,
        m.msync,
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_mapping_a_closed_fd_ebadf() -> None:
    fd = os.memfd_create("z")
    os.ftruncate(fd, 4096)
    os.close(fd)
    with pytest.raises(OSError) as info:
        MemoryMapping.from_fd(fd, 4096)
    assert info.value.errno == errno.EBADF
