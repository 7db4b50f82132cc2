"""Split virtqueue: ring math, EVENT_IDX across u16 wraparound, chain validation, Reader/Writer."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import (
    RING_FEATURES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    ChainTooShort,
    Features,
    InvalidQueue,
    Queue,
    vring_need_event,
)
from sys_util import GuestMemory

MEM_SIZE = 4 << 20
RING = 0x1000


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(MEM_SIZE) as m:
        yield m


def make(
    mem: GuestMemory, size: int = 16, features: int = RING_FEATURES
) -> tuple[VirtQueueDriver, Queue]:
    drv = VirtQueueDriver(mem, RING, size)
    return drv, drv.make_queue(features=features)


# -- event idx math -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # crossed exactly
        (5, 5, 4, False),  # event 5 means "after idx passes 5", i.e. new must be > 5
        (5, 6, 5, True),
        (5, 10, 6, False),  # event already passed before old
        (0xFFFF, 0, 0xFFFE, True),  # wraparound: event at 65535 crossed going 65534 -> 0
        (0xFFFE, 0x0001, 0xFFFD, True),
        (0x0001, 0x0003, 0xFFFF, True),  # old before wrap, event after
        (0x0005, 0x0003, 0xFFFF, False),  # event not reached yet
        (0xFFF0, 0x0002, 0xFFF8, False),  # event long before old, across the wrap
        (0, 0, 0, False),  # nothing new
    ],
)
def test_vring_need_event_wraparound(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_vring_need_event_matches_reference_for_all_offsets() -> None:
    # Reference: an interrupt is needed iff event is in [old, new) walking forward mod 2^16.
    for old in (0, 1, 0x7FFF, 0xFFF0, 0xFFFF):
        for step in (1, 2, 7, 300):
            new = (old + step) & 0xFFFF
            for delta in range(-5, step + 5):
                event = (old + delta) & 0xFFFF
                crossed = 0 <= delta < step
                assert vring_need_event(event, new, old) is crossed, (old, step, delta)


def test_event_idx_suppression_across_wraparound(mem: GuestMemory) -> None:
    drv, q = make(mem, 16)
    assert q.event_idx
    # Pretend 65534 buffers have already been used and signalled.
    start = 0xFFFE
    q.next_used = start
    q.next_avail = start
    drv.avail_idx = start
    drv.last_used = start
    mem.write_u16(drv.used_ring + 2, start)
    q._signalled_used = start
    # Driver wants an interrupt once used idx passes 0x0000 (i.e. after entry index 0 is used).
    drv.set_used_event(0x0000)
    heads = [drv.add_request([b"x"]).head for _ in range(4)]
    chains = [q.pop() for _ in heads]
    assert all(c is not None for c in chains)
    assert q.pop() is None
    assert drv.avail_event() == (start + 4) & 0xFFFF  # device asks for kicks past what it saw
    q.add_used(heads[0], 0)  # used idx 0xFFFF: event 0 not crossed yet
    assert not q.needs_interrupt()
    q.add_used(heads[1], 0)  # used idx 0x0000 -> crosses... needs new > event: not yet
    assert not q.needs_interrupt()
    q.add_used(heads[2], 0)  # used idx 0x0001: entry 0x0000 now used -> interrupt
    assert q.needs_interrupt()
    q.add_used(heads[3], 0)
    assert not q.needs_interrupt()  # event already passed
    assert [h for h, _ in drv.pop_used()] == heads


def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    drv, q = make(mem, 8, features=0)
    c = drv.add_request([b"a"])
    assert q.pop() is not None
    q.add_used(c.head, 0)
    assert q.needs_interrupt()
    drv.set_avail_flags(1)
    assert not q.needs_interrupt()


# -- chains ------------------------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
def test_pop_direct_and_indirect_chain(mem: GuestMemory, indirect: bool) -> None:
    drv, q = make(mem)
    sub = drv.add_request([b"hello ", b"world"], [3, 5], indirect=indirect)
    chain = q.pop()
    assert chain is not None and chain.head == sub.head
    assert chain.readable == sub.readable and chain.writable == sub.writable
    r = chain.reader()
    assert r.available_bytes() == 11
    assert r.read_exact(8) == b"hello wo"
    assert r.read(100) == b"rld"
    w = chain.writer()
    w.write(b"ABCDEFGH")
    with pytest.raises(ChainTooShort):
        w.write(b"!")
    q.add_used(chain.head, w.bytes_written)
    assert drv.pop_used() == [(sub.head, 8)]
    assert drv.read_writable(sub) == b"ABCDEFGH"


def test_reader_writer_iovecs_and_split(mem: GuestMemory) -> None:
    drv, q = make(mem)
    drv.add_request([b"0123", b"456789"], [4, 4, 4])
    chain = q.pop()
    assert chain is not None
    r = chain.reader()
    views = r.get_iovecs(7)
    assert [bytes(v) for v in views] == [b"0123", b"456"]
    tail = r.split_at(2)
    assert r.read_exact(2) == b"78" and tail.read_exact(1) == b"9"
    w = chain.writer()
    status = w.split_at(w.available_bytes() - 1)
    assert w.available_bytes() == 11 and status.available_bytes() == 1
    for v in w.get_iovecs(11):
        v[:] = b"z" * len(v)
    status.write(b"\x07")
    assert b"".join(mem.read(a, n) for a, n in chain.writable) == b"z" * 11 + b"\x07"


def _hostile(drv: VirtQueueDriver, kind: str) -> int:
    """Publish one hostile chain of class ``kind``; return its head."""
    mem = drv.mem
    buf = drv.alloc(64)
    head = 10
    if kind == "outside_ram":
        drv.write_descriptor(head, MEM_SIZE - 8, 64, 0, 0)
    elif kind == "length_overflow":
        # addr + len wraps past 2^64 back into RAM
        drv.write_descriptor(head, buf, 8, VIRTQ_DESC_F_NEXT, 11)
        drv.write_descriptor(11, 2**64 - 16, 32, 0, 0)
    elif kind == "loop":
        drv.write_descriptor(head, buf, 8, VIRTQ_DESC_F_NEXT, 11)
        drv.write_descriptor(11, buf, 8, VIRTQ_DESC_F_NEXT, head)
    elif kind == "next_out_of_range":
        drv.write_descriptor(head, buf, 8, VIRTQ_DESC_F_NEXT, 999)
    elif kind == "readable_after_writable":
        drv.write_descriptor(head, buf, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 11)
        drv.write_descriptor(11, buf, 8, 0, 0)
    elif kind == "indirect_in_indirect":
        table = drv.alloc(32)
        mem.write_struct(table, struct.Struct("<QIHH"), table, 16, VIRTQ_DESC_F_INDIRECT, 0)
        drv.write_descriptor(head, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    elif kind == "indirect_bad_length":
        drv.write_descriptor(head, buf, 17, VIRTQ_DESC_F_INDIRECT, 0)
    elif kind == "indirect_outside_ram":
        drv.write_descriptor(head, MEM_SIZE + 0x1000, 64, VIRTQ_DESC_F_INDIRECT, 0)
    elif kind == "indirect_too_long":
        drv.write_descriptor(head, buf, 16 * 20_000, VIRTQ_DESC_F_INDIRECT, 0)
    elif kind == "indirect_loop":
        table = drv.alloc(32)
        st = struct.Struct("<QIHH")
        mem.write_struct(table, st, buf, 8, VIRTQ_DESC_F_NEXT, 1)
        mem.write_struct(table + 16, st, buf, 8, VIRTQ_DESC_F_NEXT, 0)
        drv.write_descriptor(head, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    elif kind == "indirect_with_next":
        table = drv.alloc(16)
        mem.write_struct(table, struct.Struct("<QIHH"), buf, 8, 0, 0)
        drv.write_descriptor(head, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 11)
        drv.write_descriptor(11, buf, 8, 0, 0)
    elif kind == "head_out_of_range":
        head = 500
    else:  # pragma: no cover
        raise AssertionError(kind)
    drv.publish(head)
    return head


HOSTILE = [
    "outside_ram",
    "length_overflow",
    "loop",
    "next_out_of_range",
    "readable_after_writable",
    "indirect_in_indirect",
    "indirect_bad_length",
    "indirect_outside_ram",
    "indirect_too_long",
    "indirect_loop",
    "indirect_with_next",
    "head_out_of_range",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_chain_fails_only_that_request(mem: GuestMemory, kind: str) -> None:
    drv, q = make(mem, 16)
    drv._free = [i for i in drv._free if i not in (10, 11, 12)]
    head = _hostile(drv, kind)
    good = drv.add_request([b"fine"], [4])
    chain = q.pop()
    assert chain is not None and chain.head == good.head
    assert chain.reader().read_exact(4) == b"fine"
    assert q.invalid_chains == 1
    q.add_used(chain.head, 0)
    used = drv.pop_used()
    if kind == "head_out_of_range":
        assert used == [(good.head, 0)]  # no id to return for a head that does not exist
    else:
        assert used == [(head, 0), (good.head, 0)]


def test_indirect_refused_when_not_negotiated(mem: GuestMemory) -> None:
    drv, q = make(mem, 8, features=1 << Features.VERSION_1)
    drv.add_request([b"abc"], indirect=True)
    assert q.pop() is None
    assert q.invalid_chains == 1


def test_avail_index_jump_breaks_the_queue_until_reset(mem: GuestMemory) -> None:
    drv, q = make(mem, 8)
    reasons: list[str] = []
    q.on_broken = reasons.append
    drv.set_avail_idx(100)  # claims 100 new entries on an 8-entry ring
    assert q.pop() is None
    assert q.broken and len(reasons) == 1 and "100 entries" in reasons[0]
    # Nothing is pending any more, so a device's serve loop (pop until None, then
    # enable_notification) ends instead of spinning on the bad index.
    assert q.pending() == 0 and q.enable_notification() is False
    assert q.pop() is None and len(reasons) == 1
    q.reset()
    assert not q.broken


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        ("desc_table", MEM_SIZE - 16),
        ("avail_ring", MEM_SIZE - 2),
        ("used_ring", MEM_SIZE + 0x10000),
        ("desc_table", 2**64 - 16),
        ("used_ring", RING + 0x1002),  # misaligned
    ],
)
def test_rings_outside_ram_are_refused(mem: GuestMemory, attr: str, value: int) -> None:
    drv = VirtQueueDriver(mem, RING, 16)
    q = drv.configure(Queue(16))
    setattr(q, attr, value)
    with pytest.raises(InvalidQueue):
        q.activate(mem, RING_FEATURES)
    assert not q.active
    assert q.pop() is None


def test_queue_size_must_be_power_of_two(mem: GuestMemory) -> None:
    drv = VirtQueueDriver(mem, RING, 16)
    q = drv.configure(Queue(16))
    q.size = 12
    with pytest.raises(InvalidQueue):
        q.validate(mem)
    q.size = 32  # above max
    with pytest.raises(InvalidQueue):
        q.validate(mem)


def test_used_index_is_never_seen_going_backwards(mem: GuestMemory) -> None:
    """A reader in another process (truly parallel, like a guest vCPU) polls used->idx while we
    publish. struct.pack_into zeroes its target before writing, so publishing with it let such
    a reader see a transient 0; the index must only ever move forward."""
    import os
    import struct

    drv, q = make(mem, 8)
    chain = drv.add_request([b"x"], [1])
    popped = q.pop()
    assert popped is not None
    used_idx_addr = drv.used_ring + 2
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "guest": poll until told to stop, report the first backwards step
        try:
            os.close(ready_r)
            view = mem.view(used_idx_addr, 2)
            unpack = struct.Struct("<H").unpack_from
            last, bad = 0, b"ok"
            os.write(ready_w, b"r")
            for _ in range(6_000_000):
                value = unpack(view)[0]
                if value < last and last - value < 30000:  # not the u16 wraparound
                    bad = f"{last}->{value}".encode()
                    break
                last = value
            os.write(result_w, bad)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(result_w)
    assert os.read(ready_r, 1) == b"r"
    for _ in range(300_000):
        q.add_used(chain.head, 1)
    os.waitpid(pid, 0)
    verdict = os.read(result_r, 64)
    os.close(ready_r)
    os.close(result_r)
    assert verdict == b"ok", f"a parallel reader saw used idx go {verdict.decode()}"


def test_kicks_are_asked_for_only_once_the_ring_is_empty(mem: GuestMemory) -> None:
    """EVENT_IDX: while the device still finds chains it leaves avail_event alone (the driver
    need not kick for entries we are about to pop anyway); an empty pop arms it at next_avail,
    and a chain added after that is found (by the re-check or the next pop)."""
    drv, q = make(mem, 16)
    assert q.event_idx
    for _ in range(3):
        drv.add_request([b"x"])
    before = drv.avail_event()
    assert q.pop() is not None and q.pop() is not None
    assert drv.avail_event() == before  # busy: no kick requested yet
    assert q.pop() is not None
    assert q.pop() is None
    assert drv.avail_event() == q.next_avail == 3  # empty: armed
    late = drv.add_request([b"y"]).head
    chain = q.pop()
    assert chain is not None and chain.head == late
    assert q.pop() is None and drv.avail_event() == 4
