from __future__ import annotations

import errno
import os
import pickle
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sys_util import (
    GuestAddress,
    GuestMemory,
    GuestMemoryError,
    InvalidArgument,
    MemoryMapping,
    pagesize,
    shmem_hugepages_enabled,
)

MB = 1 << 20
PAGE = pagesize()


@pytest.fixture
def mem() -> GuestMemory:
    with GuestMemory([(0, MB)]) as m:
        yield m  # type: ignore[misc]


@pytest.fixture
def mem3() -> GuestMemory:
    # Two adjacent regions and one after a hole.
    with GuestMemory([(4 * MB, MB), (0, MB), (MB, MB)]) as m:
        yield m  # type: ignore[misc]


def test_regions_sorted_and_laid_end_to_end(mem3: GuestMemory) -> None:
    regions = mem3.regions
    assert [int(r.guest_base) for r in regions] == [0, MB, 4 * MB]
    assert [r.file_offset for r in regions] == [0, MB, 2 * MB]
    base = regions[0].host_address
    assert base % PAGE == 0
    assert [r.host_address - base for r in regions] == [0, MB, 2 * MB]
    assert mem3.size == 3 * MB
    assert mem3.end_addr() == 5 * MB
    assert repr(regions[1].guest_base) == "GuestAddress(0x100000)"


def test_host_address_points_at_the_mapping(mem: GuestMemory) -> None:
    from sys_util._binding import ffi

    mem.write(0x1234, b"xyz")
    # SAFETY: the GuestMemory `mem` is alive for the whole test, so the address is mapped.
    ptr = ffi.cast("char *", mem.regions[0].host_address + 0x1234)
    assert ffi.buffer(ptr, 3)[:] == b"xyz"


def test_memfd_is_sealed_and_shared(mem: GuestMemory) -> None:
    with pytest.raises(PermissionError):
        os.ftruncate(mem.memfd.fileno(), 0)
    mem.write_u32(0x2000, 0xDEADBEEF)
    with MemoryMapping.from_shared_memory(mem.memfd) as other:
        assert other.read_obj(0x2000, struct.Struct("<I")) == (0xDEADBEEF,)


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([], "at least one"),
        ([(0, 0)], "non-positive"),
        ([(1, PAGE)], "aligned"),
        ([(0, PAGE + 1)], "aligned"),
        ([(0, 2 * PAGE), (PAGE, PAGE)], "overlaps"),
        ([((1 << 64) - PAGE, 2 * PAGE)], "64-bit"),
    ],
)
def test_bad_layouts_are_refused(regions: list[tuple[int, int]], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        GuestMemory(regions)


def test_scalar_round_trip_little_endian(mem3: GuestMemory) -> None:
    for addr in (0, MB - 8, MB, 4 * MB, 5 * MB - 8):
        mem3.write_u8(addr, 0xAB)
        assert mem3.read_u8(addr) == 0xAB
        mem3.write_u16(addr, 0xBEEF)
        assert mem3.read_u16(addr) == 0xBEEF
        mem3.write_u32(addr, 0x12345678)
        assert mem3.read_u32(addr) == 0x12345678
        assert mem3.read(addr, 4) == bytes.fromhex("78563412")
        mem3.write_u64(addr, 0x0102030405060708)
        assert mem3.read_u64(addr) == 0x0102030405060708
    st = struct.Struct("<QIHH")
    mem3.write_struct(4 * MB + 16, st, 1, 2, 3, 4)
    assert mem3.read_struct(4 * MB + 16, st) == (1, 2, 3, 4)


@pytest.mark.parametrize("which", ["mem", "mem3"])
@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (2 * MB - 1, 2),  # crosses the end of the last adjacent region into the hole
        (MB - 1, 2 * MB),  # starts inside, runs into the hole
        (-1, 1),
        (2 * MB, 1),  # the hole
        (5 * MB - 1, 2),
        ((1 << 64) - 1, 2),  # overflows u64
        (1 << 70, 1),
        (0, -1),
    ],
)
def test_out_of_range_raises_guest_memory_error(
    which: str, addr: int, length: int, request: pytest.FixtureRequest
) -> None:
    m: GuestMemory = request.getfixturevalue(which)
    with pytest.raises(GuestMemoryError) as info:
        m.view(addr, length)
    assert info.value.address == addr
    assert info.value.length == length
    assert info.value.errno == errno.EFAULT
    assert f"{addr:#x}" in str(info.value)
    for call in (
        lambda: m.read(addr, length),
        lambda: m.iovecs(addr, length),
        lambda: m.write(addr, b"\0" * max(length, 0)) if length >= 0 else m.view(addr, length),
        lambda: (
            m.read_struct(addr, struct.Struct(f"<{max(length, 0)}s"))
            if length >= 0
            else m.view(addr, length)
        ),
    ):
        with pytest.raises(GuestMemoryError):
            call()
    assert not m.checked_range(addr, length)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_scalars_refuse_the_last_partial_bytes(mem3: GuestMemory, size: int) -> None:
    reader = {1: mem3.read_u8, 2: mem3.read_u16, 4: mem3.read_u32, 8: mem3.read_u64}[size]
    writer = {1: mem3.write_u8, 2: mem3.write_u16, 4: mem3.write_u32, 8: mem3.write_u64}[size]
    reader(5 * MB - size)
    for addr in (5 * MB - size + 1, 2 * MB, 3 * MB - 1, -1, 1 << 64):
        with pytest.raises(GuestMemoryError):
            reader(addr)
        with pytest.raises(GuestMemoryError):
            writer(addr, 0)
    with pytest.raises(GuestMemoryError):
        # A scalar may not straddle two regions even when they are adjacent.
        reader(MB - 1) if size > 1 else reader(-1)


def test_single_region_scalars_bounds(mem: GuestMemory) -> None:
    mem.write_u64(MB - 8, 7)
    assert mem.read_u64(MB - 8) == 7
    for addr in (MB - 7, MB, -8):
        with pytest.raises(GuestMemoryError):
            mem.read_u64(addr)
        with pytest.raises(GuestMemoryError):
            mem.write_u64(addr, 1)


def test_view_is_zero_copy_and_writable(mem: GuestMemory) -> None:
    v = mem.view(0x100, 4)
    v[:] = b"abcd"
    assert mem.read(0x100, 4) == b"abcd"
    mem.write(0x100, b"wxyz")
    assert bytes(v) == b"wxyz"
    v.release()


def test_view_refuses_spanning_but_iovecs_span_adjacent(mem3: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        mem3.view(MB - 2, 4)
    vecs = mem3.iovecs(MB - 2, 4)
    assert [len(v) for v in vecs] == [2, 2]
    mem3.write(MB - 2, b"1234")
    assert b"".join(bytes(v) for v in vecs) == b"1234"
    assert mem3.read(MB - 2, 4) == b"1234"
    assert mem3.checked_range(MB - 2, 4)
    # Across the hole: refused even though both ends are in RAM.
    assert not mem3.checked_range(2 * MB - 2, 4 * MB)
    with pytest.raises(GuestMemoryError):
        mem3.iovecs(2 * MB - 2, 4 * MB)


def test_preadv_pwritev_into_guest_memory(mem3: GuestMemory) -> None:
    payload = os.urandom(3 * 4096)
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 4096 + payload)
        f.flush()
        addr = 2 * MB - 4096  # starts one page before the end of region 1, ends in nothing
        with pytest.raises(GuestMemoryError):
            mem3.iovecs(addr, len(payload))
        addr = MB - 4096  # spans region 0 -> region 1
        vecs = mem3.iovecs(addr, len(payload))
        assert len(vecs) == 2
        assert os.preadv(f.fileno(), vecs, 4096) == len(payload)
        assert mem3.read(addr, len(payload)) == payload
        mem3.write(addr, b"Z" * 10)
        assert os.pwritev(f.fileno(), mem3.iovecs(addr, 10), 0) == 10
        f.seek(0)
        assert f.read(10) == b"Z" * 10


def test_address_in_range_and_find_region(mem3: GuestMemory) -> None:
    assert mem3.address_in_range(0)
    assert mem3.address_in_range(2 * MB - 1)
    assert not mem3.address_in_range(2 * MB)
    assert not mem3.address_in_range(-1)
    assert mem3.find_region(4 * MB + 5).file_offset == 2 * MB
    with pytest.raises(GuestMemoryError):
        mem3.find_region(3 * MB)


def test_remove_range_reads_zeros(mem3: GuestMemory) -> None:
    mem3.write(MB - PAGE, b"\xff" * (2 * PAGE))
    mem3.remove_range(MB - PAGE, 2 * PAGE)
    assert mem3.read(MB - PAGE, 2 * PAGE) == b"\0" * (2 * PAGE)
    with pytest.raises(InvalidArgument):
        mem3.remove_range(1, PAGE)
    with pytest.raises(GuestMemoryError):
        mem3.remove_range(2 * MB, PAGE)


def test_child_write_visible_to_parent(mem: GuestMemory) -> None:
    mem.write(0x80, b"parent")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0 if mem.read(0x80, 6) == b"parent" else 1
        mem.write(0x80, b"child!")
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mem.read(0x80, 6) == b"child!"


def test_close_is_idempotent_and_ebadf(mem3: GuestMemory) -> None:
    v = mem3.view(0, 4)  # an outstanding view keeps its pages mapped
    mem3.close()
    mem3.close()
    assert mem3.closed
    v[:] = b"safe"
    for call in (
        lambda: mem3.read_u16(0),
        lambda: mem3.read(0, 1),
        lambda: mem3.view(0, 1),
        lambda: mem3.write_u64(0, 1),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        mem3.memfd.fileno()
    assert info.value.errno == errno.EBADF


def test_guest_memory_error_pickles() -> None:
    err = GuestMemoryError(0x1000, 8)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is GuestMemoryError
    assert (clone.address, clone.length, str(clone)) == (0x1000, 8, str(err))


def test_guest_address_helpers() -> None:
    a = GuestAddress(0x1001)
    assert isinstance(a, int)
    assert a.checked_add(0xFFF) == 0x2000
    assert type(a.checked_add(1)) is GuestAddress
    assert a.align_up(0x1000) == 0x2000
    assert a.align_down(0x1000) == 0x1000
    assert GuestAddress(0x2000).align_up(0x1000) == 0x2000
    assert a.offset_from(0x1000) == 1
    assert repr(a) == "GuestAddress(0x1001)"
    with pytest.raises(GuestMemoryError):
        GuestAddress((1 << 64) - 1).checked_add(1)
    with pytest.raises(GuestMemoryError):
        GuestAddress((1 << 64) - 1).align_up(16)
    with pytest.raises(InvalidArgument):
        a.align_up(3)
    with pytest.raises(InvalidArgument):
        a.offset_from(0x2000)
    with pytest.raises(InvalidArgument):
        GuestAddress(-1)
    with pytest.raises(InvalidArgument):
        GuestAddress(1 << 64)


_LAYOUT = [(0, MB), (MB, MB), (4 * MB, MB)]


def _model_ok(addr: int, length: int) -> bool:
    """Reference: every byte of [addr, addr+length) is in some region."""
    if length < 0:
        return False
    if length == 0:
        return any(b <= addr <= b + n for b, n in _LAYOUT)
    spans = [(max(addr, b), min(addr + length, b + n)) for b, n in _LAYOUT]
    covered = sum(max(0, hi - lo) for lo, hi in spans)
    return covered == length


@settings(max_examples=300, deadline=None)
@given(
    addr=st.one_of(
        st.sampled_from([0, MB, 2 * MB, 4 * MB, 5 * MB]).flatmap(
            lambda b: st.integers(b - 16, b + 16)
        ),
        st.integers(-(1 << 65), 1 << 65),
    ),
    length=st.integers(-2, 3 * MB),
)
def test_translation_matches_a_reference_model(addr: int, length: int) -> None:
    with GuestMemory(_LAYOUT) as m:
        ok = _model_ok(addr, length)
        assert m.checked_range(addr, length) == ok
        if ok:
            assert sum(len(v) for v in m.iovecs(addr, length)) == length
        else:
            with pytest.raises(GuestMemoryError):
                m.iovecs(addr, length)
            with pytest.raises(GuestMemoryError):
                m.read(addr, length)
        one_region = length >= 0 and any(b <= addr and addr + length <= b + n for b, n in _LAYOUT)
        if one_region:
            assert len(m.view(addr, length)) == length
        else:
            with pytest.raises(GuestMemoryError):
                m.view(addr, length)
        for size, reader, writer in (
            (1, m.read_u8, m.write_u8),
            (2, m.read_u16, m.write_u16),
            (4, m.read_u32, m.write_u32),
            (8, m.read_u64, m.write_u64),
        ):
            if any(b <= addr and addr + size <= b + n for b, n in _LAYOUT):
                writer(addr, size)
                assert reader(addr) == size
                assert m.read(addr, size) == size.to_bytes(size, "little")
            else:
                with pytest.raises(GuestMemoryError):
                    reader(addr)
                with pytest.raises(GuestMemoryError):
                    writer(addr, 0)


def test_from_shared_memory_in_another_process() -> None:
    from sys_util import EventFd, SharedMemory, UnixSeqpacket

    layout = [(0, MB), (4 * MB, MB)]
    with GuestMemory(layout) as mem:
        a, b = UnixSeqpacket.pair()
        with a, b, EventFd() as done:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child: adopt the memfd received over the socket
                code = 1
                try:
                    _, fds = b.recv(16, maxfds=1)
                    with GuestMemory.from_shared_memory(SharedMemory.from_fd(fds[0]), layout) as m:
                        m.write_u64(4 * MB + 8, m.read_u64(8) + 1)
                    code = 0
                finally:
                    done.write()
                    os._exit(code)
            mem.write_u64(8, 41)
            a.send(b"mem", [mem.memfd])
            done.read()
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert mem.read_u64(4 * MB + 8) == 42


def test_from_shared_memory_refuses_unsealed_or_wrong_size() -> None:
    from sys_util import Seals, SharedMemory

    with SharedMemory("unsealed", MB) as shm:
        with pytest.raises(InvalidArgument, match="sealed"):
            GuestMemory.from_shared_memory(shm, [(0, MB)])
        assert not shm.closed
        shm.add_seals(Seals.SHRINK | Seals.GROW)
        with pytest.raises(InvalidArgument, match="holds"):
            GuestMemory.from_shared_memory(shm, [(0, 2 * MB)])
        assert not shm.closed


def test_keep_fds_names_the_memfd_and_the_mmap_duplicate(mem: GuestMemory) -> None:
    fds = mem.keep_fds()
    assert mem.memfd.fileno() in fds
    assert len(fds) == 2  # CPython 3.11 mmap holds a dup of the fd it maps
    for fd in fds:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:crosvm_guest")


def _vm_flags(mem: GuestMemory) -> list[str]:
    start = f"{mem.regions[0].host_address:x}-"
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            for flag_line in lines[i + 1 :]:
                if flag_line.startswith("VmFlags:"):
                    return flag_line.split()[1:]
    raise AssertionError("guest memory mapping not found in smaps")


def test_hugepages_marks_the_mapping_for_transparent_huge_pages() -> None:
    with GuestMemory([(0, 4 << 20)], hugepages=True) as mem:
        assert "hg" in _vm_flags(mem)  # MADV_HUGEPAGE (used if the host allows shmem THP)
        mem.write_u64(3 << 20, 42)
        assert mem.read_u64(3 << 20) == 42
    with GuestMemory([(0, 4 << 20)]) as mem:
        assert "hg" not in _vm_flags(mem)


@pytest.mark.parametrize(
    ("text", "enabled"),
    [
        ("always within_size advise [never] deny force\n", False),
        ("always within_size [advise] never deny force\n", True),
        ("[always] within_size advise never deny force\n", True),
        ("always [within_size] advise never deny force\n", True),
        ("always within_size advise never [deny] force\n", False),
        ("garbage\n", False),
    ],
)
def test_shmem_hugepages_enabled_reads_the_bracketed_setting(
    tmp_path: Path, text: str, enabled: bool
) -> None:
    setting = tmp_path / "shmem_enabled"
    setting.write_text(text)
    assert shmem_hugepages_enabled(str(setting)) is enabled
    assert shmem_hugepages_enabled(str(tmp_path / "missing")) is False
