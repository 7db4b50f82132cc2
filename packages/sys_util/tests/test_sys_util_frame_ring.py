"""FrameRing: batches of frames between a datagram socket (standing in for a tap) and rings."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sys_util import FrameRing
from sys_util.errors import InvalidArgument

SIZE = 8
BASE = 0x10000  # guest address of the RAM view
RAM = 0x8000
GUARD = 256  # bytes either side of RAM that must never change
DESC, AVAIL, USED, BUFS = 0x0, 0x100, 0x200, 0x1000
F_NEXT, F_WRITE = 1, 2
HDR = 12


class Rings:
    """A queue laid out in one bytearray: guard | RAM (rings + buffers) | guard."""

    def __init__(self) -> None:
        self.backing = bytearray(b"\xa5" * GUARD + bytes(RAM) + b"\xa5" * GUARD)
        self.ram = memoryview(self.backing)[GUARD : GUARD + RAM]
        self.avail_idx = 0
        self.ring = FrameRing(
            self.ram, BASE, self.ram[DESC : DESC + 16 * SIZE],
            self.ram[AVAIL : AVAIL + 4 + 2 * SIZE], self.ram[USED : USED + 4 + 8 * SIZE], SIZE,
        )  # fmt: skip

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.ram, DESC + 16 * i, addr, length, flags, nxt)

    def offer(self, head: int) -> None:
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % SIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)

    def used(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.ram, USED + 4 + 8 * (slot % SIZE))  # type: ignore[return-value]

    @property
    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.ram, USED + 2)[0])

    def guards_intact(self) -> bool:
        return self.backing[:GUARD] == b"\xa5" * GUARD and self.backing[-GUARD:] == b"\xa5" * GUARD

    def close(self) -> None:
        self.ring.close()
        self.ram.release()


@pytest.fixture
def rings() -> Iterator[Rings]:
    r = Rings()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b


def frame(n: int, size: int) -> bytes:
    return bytes([n]) * HDR + os.urandom(size)


def test_tx_writes_each_frame_and_completes_it(
    rings: Rings, pair: tuple[socket.socket, socket.socket]
) -> None:
    dev, peer = pair
    frames = [frame(i, 100 + i) for i in range(3)]
    for i, data in enumerate(frames):
        addr = BUFS + 0x400 * i
        rings.ram[addr : addr + len(data)] = data
        rings.desc(i, BASE + addr, len(data))
        rings.offer(i)
    batch = rings.ring.tx(dev.fileno(), 0, 0, 64, HDR, 1600)
    assert batch.status == FrameRing.DONE
    assert (batch.next_avail, batch.next_used, batch.frames, batch.errors) == (3, 3, 3, 0)
    assert batch.nbytes == sum(map(len, frames))
    assert [peer.recv(4096) for _ in frames] == frames
    assert [rings.used(i) for i in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert rings.used_idx == 3


def test_tx_respects_budget_and_wraps_indices(
    rings: Rings, pair: tuple[socket.socket, socket.socket]
) -> None:
    dev, peer = pair
    data = frame(7, 60)
    rings.ram[BUFS : BUFS + len(data)] = data
    rings.desc(0, BASE + BUFS, len(data))
    rings.avail_idx = 0xFFFE
    for _ in range(4):
        rings.offer(0)
    batch = rings.ring.tx(dev.fileno(), 0xFFFE, 0xFFFE, 3, HDR, 1600)
    assert (batch.frames, batch.next_avail, batch.next_used) == (3, 1, 1)
    assert rings.used_idx == 1
    batch = rings.ring.tx(dev.fileno(), batch.next_avail, batch.next_used, 64, HDR, 1600)
    assert (batch.frames, batch.next_avail) == (1, 2)
    assert [peer.recv(4096) for _ in range(4)] == [data] * 4


@pytest.mark.parametrize(
    ("addr", "length", "flags", "head"),
    [
        (BASE + BUFS, 100, F_NEXT, 1),  # a chain of more than one descriptor
        (BASE + BUFS, 100, F_WRITE, 1),  # a write-only buffer where a frame is expected
        (BASE + RAM - 50, 100, 0, 1),  # runs off the end of RAM
        (BASE - 16, 100, 0, 1),  # starts below RAM
        (2**64 - 8, 100, 0, 1),  # address + length overflows 64 bits
        (BASE + BUFS, 4, 0, 1),  # shorter than a virtio-net header
        (BASE + BUFS, 5000, 0, 1),  # longer than max_len
        (BASE + BUFS, 100, 0, SIZE + 3),  # head beyond the table
    ],
)
def test_tx_stops_before_any_other_chain(
    rings: Rings, pair: tuple[socket.socket, socket.socket], addr: int, length: int, flags: int,
    head: int,
) -> None:  # fmt: skip
    dev, peer = pair
    good = frame(1, 64)
    rings.ram[BUFS : BUFS + len(good)] = good
    rings.desc(0, BASE + BUFS, len(good))
    rings.desc(1, addr, length, flags)
    rings.offer(0)
    rings.offer(head)
    batch = rings.ring.tx(dev.fileno(), 0, 0, 64, HDR, 1600)
    assert batch.status == FrameRing.SLOW
    assert (batch.frames, batch.next_avail, batch.next_used) == (1, 1, 1)
    assert peer.recv(4096) == good
    with pytest.raises(BlockingIOError):
        peer.recv(4096)
    assert rings.guards_intact()


def test_tx_completes_refused_frames_with_an_error_count(rings: Rings) -> None:
    r, w = os.pipe()
    os.close(r)  # writes now fail with EPIPE (SIGPIPE is ignored by CPython)
    try:
        rings.desc(0, BASE + BUFS, 64)
        rings.offer(0)
        batch = rings.ring.tx(w, 0, 0, 64, HDR, 1600)
    finally:
        os.close(w)
    assert (batch.frames, batch.errors, batch.next_used) == (0, 1, 1)
    assert batch.last_errno != 0
    assert rings.used(0) == (0, 0)


def test_a_driver_index_too_far_ahead_moves_nothing(
    rings: Rings, pair: tuple[socket.socket, socket.socket]
) -> None:
    rings.desc(0, BASE + BUFS, 64)
    struct.pack_into("<H", rings.ram, AVAIL + 2, SIZE + 1)
    batch = rings.ring.tx(pair[0].fileno(), 0, 0, 64, HDR, 1600)
    assert (batch.frames, batch.next_avail, rings.used_idx) == (0, 0, 0)


def rx_setup(rings: Rings, count: int, length: int) -> None:
    rings.ring.set_stage(bytearray(65536))
    for i in range(count):
        rings.desc(i, BASE + BUFS + 0x800 * i, length, F_WRITE)
        rings.offer(i)


def test_rx_reads_frames_into_buffers(
    rings: Rings, pair: tuple[socket.socket, socket.socket]
) -> None:
    dev, peer = pair
    rx_setup(rings, 3, 0x800)
    sent = [b"\x01" + bytes(11) + os.urandom(200 + i) for i in range(2)]
    for data in sent:
        peer.send(data)
    batch = rings.ring.rx(dev.fileno(), 0, 0, 64, HDR, True)
    assert batch.status == FrameRing.EMPTY_FD  # the third buffer is still waiting
    assert (batch.frames, batch.next_avail, batch.next_used) == (2, 2, 2)
    for i, data in enumerate(sent):
        got = bytes(rings.ram[BUFS + 0x800 * i : BUFS + 0x800 * i + len(data)])
        assert got[0] == 0  # flags cleared
        assert got[10:12] == b"\x01\x00"  # num_buffers = 1
        assert got[12:] == data[12:]
        assert rings.used(i) == (i, len(data))
    assert rings.used_idx == 2


def test_rx_keeps_flags_when_asked(rings: Rings, pair: tuple[socket.socket, socket.socket]) -> None:
    dev, peer = pair
    rx_setup(rings, 1, 0x800)
    peer.send(b"\x01" + bytes(11) + b"x" * 60)
    assert rings.ring.rx(dev.fileno(), 0, 0, 64, HDR, False).frames == 1
    assert rings.ram[BUFS] == 1


def test_rx_reports_a_frame_longer_than_its_buffer(
    rings: Rings, pair: tuple[socket.socket, socket.socket]
) -> None:
    dev, peer = pair
    stage = bytearray(65536)
    rings.ring.set_stage(stage)
    rings.desc(0, BASE + BUFS, 100, F_WRITE)
    rings.offer(0)
    data = bytes(HDR) + os.urandom(300)
    peer.send(data)
    batch = rings.ring.rx(dev.fileno(), 0, 0, 64, HDR, True)
    assert batch.status == FrameRing.OVERSIZE
    assert batch.oversize == (0, BUFS, 100, len(data))
    assert (batch.frames, batch.next_avail, batch.next_used) == (0, 1, 0)
    assert bytes(rings.ram[BUFS + HDR : BUFS + 100]) == data[HDR:100]
    assert bytes(stage[: len(data) - 100]) == data[100:]


def test_rx_needs_a_stage(rings: Rings, pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(InvalidArgument):
        rings.ring.rx(pair[0].fileno(), 0, 0, 64, HDR, True)


def test_closed_ring_refuses_work(pair: tuple[socket.socket, socket.socket]) -> None:
    r = Rings()
    r.close()
    r.ring.close()  # idempotent
    assert r.ring.closed
    with pytest.raises(InvalidArgument):
        r.ring.tx(pair[0].fileno(), 0, 0, 64, HDR, 1600)


@pytest.mark.parametrize(("size", "desc_len"), [(6, 16 * 6), (0, 0), (65536, 16), (8, 16 * 8 - 1)])
def test_bad_geometry_is_refused(size: int, desc_len: int) -> None:
    buf = bytearray(4096)
    view = memoryview(buf)
    with pytest.raises(InvalidArgument):
        FrameRing(view, 0, view[:desc_len], view[:100], view[:200], size)


@settings(max_examples=150, deadline=None)
@given(
    descs=st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1) | st.integers(BASE - 64, BASE + RAM + 64),
            st.integers(0, 2**32 - 1) | st.integers(0, 3000),
            st.integers(0, 0xFFFF) | st.sampled_from([0, F_WRITE, F_NEXT]),
            st.integers(0, 0xFFFF),
        ),
        min_size=SIZE, max_size=SIZE,
    ),
    heads=st.lists(st.integers(0, 0xFFFF) | st.integers(0, SIZE - 1), min_size=SIZE, max_size=SIZE),
    avail_idx=st.integers(0, 0xFFFF),
)  # fmt: skip
def test_hostile_rings_never_touch_memory_outside_ram(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int
) -> None:
    rings = Rings()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        a.setblocking(False)
        b.setblocking(False)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            rings.desc(i, addr, length, flags, nxt)
        for i, head in enumerate(heads):
            struct.pack_into("<H", rings.ram, AVAIL + 4 + 2 * i, head)
        struct.pack_into("<H", rings.ram, AVAIL + 2, avail_idx)
        rings.ring.set_stage(bytearray(65536))
        for _ in range(4):
            b.send(os.urandom(1500))
        tx = rings.ring.tx(a.fileno(), 0, 0, 64, HDR, 65550)
        rx = rings.ring.rx(a.fileno(), tx.next_avail, tx.next_used, 64, HDR, True)
        assert rx.frames + tx.frames + tx.errors <= SIZE
        assert rings.guards_intact()
    finally:
        a.close()
        b.close()
        rings.close()
